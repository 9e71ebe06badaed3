"""The teacher backend contract: what ``TeacherPool`` calls on a worker, and the table of backends.

    cls = worker_class(cfg.backend)                      # the plain class; the pool makes it a Ray actor
    worker = cls("math", cfg, seed, max_logprobs=64)     # TeacherWorker (in-process: TeacherPool(local=True))

A backend is a class in ``teachers/<name>.py`` that satisfies ``TeacherBackend`` (its constructor
builds a ``TeacherWorker``), plus one line in ``TEACHER_BACKENDS``. The module states the contract
for mypy at its end (copy ``teachers/hf.py``):

    if TYPE_CHECKING:
        _backend: TeacherBackend = MyTeacherWorker    # its constructor

        def _conforms(worker: MyTeacherWorker) -> TeacherWorker:  # its methods, named where they differ
            return worker

The table names classes by ``"module:Class"``, so importing it loads no backend (vLLM is optional
and heavy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from mopd.dist.lazy import lazy_exports

if TYPE_CHECKING:
    import torch

    from mopd.config import TeacherConfig
    from mopd.types import TeacherScores

# teachers.<domain>.backend -> "module:Class". Keep the names in step with ``TeacherBackendName`` in
# mopd/config.py (the recipe's schema, which the core cannot take from here); tests/test_teachers.py
# checks they agree.
TEACHER_BACKENDS: Mapping[str, str] = {
    "hf": "teachers.hf:HFTeacherWorker",
    "vllm": "teachers.vllm:VLLMTeacherWorker",
    "remote": "teachers.remote:RemoteTeacherWorker",
}


class TeacherWorker(Protocol):
    """One teacher replica: every method ``TeacherPool`` calls on it (through Ray or in-process).

    Tensors go in and come back on the CPU; position t of every (B, T) tensor is token
    ``input_ids[:, t]`` (prompts left-padded, responses right-padded, see ``mopd.types``)."""

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """Environment variables the worker's Ray actor starts with (before ``ray.env``), given
        ``teachers.<domain>.resources.num_gpus``; read by the pool before the actor exists."""
        ...

    def vocab_signature(self) -> dict[str, Any]:
        """``mopd.vocab.tokenizer_signature`` of the teacher: checked against the student's at start-up."""
        ...

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        topk: int = 0,
        domains: Sequence[str] | None = None,
    ) -> TeacherScores:
        """Teacher log-probs of the response tokens at temperature 1.

        input_ids (B, T) int64, attention_mask (B, T) bool, response_mask (B, T) bool; ``domains``
        each row's domain, given to a worker that serves several adapters (it picks the row's
        adapter). Returns logprobs (B, T) f32, 0 outside the response; with ``topk`` > 0 also
        topk_ids (B, T, K) int64 and topk_logprobs (B, T, K) f32, K = min(topk, V); ``latency_s``
        the call's wall time."""
        ...

    def shutdown(self) -> None:
        """Release the model or engine; the pool calls it once before the actor goes."""
        ...


class TeacherBackend(Protocol):
    """A teacher backend class; the pool builds each worker as
    ``cls(domain, cfg, seed, max_logprobs=max_topk)`` (in-process: also ``set_threads=False``).

    max_logprobs  the largest ``topk`` ``score`` will be asked for (a backend with a fixed cap sizes it)
    set_threads   size torch's thread pool to ``cfg.resources.num_cpus`` (False: leave the caller's)
    adapters      domain -> PEFT adapter directory over ``cfg.path``, for a group of adapter teachers
                  (``mopd.config.teacher_groups``); a backend without adapters refuses them
    """

    def __call__(
        self,
        name: str,
        cfg: TeacherConfig,
        seed: int,
        *,
        max_logprobs: int,
        set_threads: bool = True,
        adapters: Mapping[str, str] | None = None,
    ) -> TeacherWorker: ...


def worker_class(backend: str) -> type[TeacherWorker]:
    """The worker class of ``backend`` (its module imported now: vLLM is optional)."""
    if backend not in TEACHER_BACKENDS:
        raise ValueError(f"unknown teacher backend {backend!r}; valid: {', '.join(TEACHER_BACKENDS)}")
    module, _, name = TEACHER_BACKENDS[backend].partition(":")
    return lazy_exports("teachers", {name: module})(name)
