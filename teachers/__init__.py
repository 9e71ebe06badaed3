"""Teacher workers and the pool that routes rollout rows to them.

    from teachers import TeacherPool
    pool = TeacherPool(cfg.teachers, seed=cfg.run.seed, student_tokenizer_signature=sig)
    scores, metrics = pool.score(batch)

Backends: ``teachers.hf`` (transformers forward) and ``teachers.vllm`` (vLLM prompt log-probs),
named in ``teachers.backend.TEACHER_BACKENDS``; ``teachers.backend.TeacherWorker`` is what the pool
calls on each.
Importing this package loads neither torch models, Ray nor vLLM: the names below resolve lazily.
"""

from __future__ import annotations

from mopd.dist.lazy import lazy_exports

_EXPORTS = {
    "TeacherPool": "teachers.pool",
    "HFTeacherWorker": "teachers.hf",
    "VLLMTeacherWorker": "teachers.vllm",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports("teachers", _EXPORTS)
