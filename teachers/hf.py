"""Hugging Face teacher backend: teacher-forced log-probs of student responses with a plain
``transformers`` forward pass.

A plain class, usable in-process (tests, ``TeacherPool(local=True)``) or wrapped by ``ray.remote``
in ``teachers.pool``:

    worker = HFTeacherWorker("math", teacher_cfg, seed=0)
    scores = worker.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=0)
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mopd.batching import PackedRows, row_spans, token_budget_groups
from mopd.config import TeacherConfig
from mopd.dist.devices import worker_device
from mopd.dist.runtime import set_torch_threads
from mopd.logprobs import align_to_tokens, chunked_scores, head_scoring, next_token_targets
from mopd.models import forward_logits, load_model, load_tokenizer, token_logprobs, topk_logprobs
from mopd.types import TeacherScores
from mopd.vocab import config_vocab_size, tokenizer_signature
from teachers.common import active_columns, check_score_inputs, empty_scores, row_chunks


class HFTeacherWorker:
    """One teacher model scoring (B, T) batches at temperature 1 on its device (``mopd.dist.devices``:
    a GPU when ``teachers.<domain>.resources.num_gpus > 0``, else the CPU); inputs and scores stay
    on the CPU. ``max_logprobs`` is accepted for the common constructor (``teachers.backend``) and
    unused: any top-k up to the vocabulary can be scored."""

    def __init__(
        self,
        name: str,
        cfg: TeacherConfig,
        seed: int,
        *,
        max_logprobs: int = 64,
        set_threads: bool = True,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        # In-process workers (local pools, tests) leave the caller's thread count alone.
        if set_threads:
            set_torch_threads(cfg.resources.num_cpus)
        self.name = name
        self.cfg = cfg
        self.device = worker_device(cfg.resources, f"teachers.{name}.resources")
        model = load_model(cfg, seed)
        # Adapter teachers: the base once, one PEFT adapter per domain (``score``'s ``domains`` picks).
        self.adapters = dict(adapters) if adapters else ({name: cfg.adapter} if cfg.adapter else {})
        # Most causal LMs accept `logits_to_keep`: the LM head then skips prompt positions.
        self._can_trim_head = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self.adapters:
            model = with_adapters(model, self.adapters)
        self.model = model.eval().to(self.device)
        self.tokenizer = load_tokenizer(cfg)

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """None of its own: torch's thread count comes with every actor (``mopd.dist.runtime``)."""
        return {}

    def vocab_signature(self) -> dict[str, Any]:
        return tokenizer_signature(self.tokenizer, config_vocab_size(self.model.config))

    @torch.no_grad()
    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        topk: int = 0,
        domains: Sequence[str] | None = None,
    ) -> TeacherScores:
        """Teacher log-probs of the response tokens.

        input_ids (B, T) int64, attention_mask (B, T) bool, response_mask (B, T) bool; ``domains``
        the domain of each row, which picks its adapter (required with several adapters, else
        unused). Returns logprobs (B, T) f32, 0 outside the response; with ``topk`` > 0 also
        topk_ids / topk_logprobs (B, T, K), K = min(topk, V), position t holding the distribution of
        token t, 0 outside the response. Rows go through the model ``cfg.batch_size`` at a time, or
        grouped by length under ``cfg.max_tokens_per_batch`` padded positions; rows of several
        domains share a pass, each through its own adapter.
        """
        start = time.perf_counter()
        check_score_inputs(input_ids, attention_mask, response_mask, topk)
        B, T = input_ids.shape
        names = self._adapter_names(domains, B)
        k = min(topk, config_vocab_size(self.model.config))
        out = empty_scores(B, T, k)
        for rows in self._passes(attention_mask, names):
            cols = active_columns(attention_mask[rows])
            if cols is None or not bool(response_mask[rows].any()):
                continue  # nothing to score: the zeros stand
            idx = range(B)[rows] if isinstance(rows, slice) else rows.tolist()
            pass_names = None if names is None else [names[i] for i in idx]
            lp, top = self._score_chunk(
                input_ids[rows, cols], attention_mask[rows, cols], response_mask[rows, cols], k, pass_names
            )
            out.logprobs[rows, cols] = lp
            if top is not None:
                assert out.topk_ids is not None and out.topk_logprobs is not None  # empty_scores(k > 0)
                out.topk_ids[rows, cols], out.topk_logprobs[rows, cols] = top
        out.latency_s = time.perf_counter() - start
        return out

    def _adapter_names(self, domains: Sequence[str] | None, rows: int) -> list[str] | None:
        """The adapter of each row (None: the model as loaded, with its one adapter if any)."""
        if len(self.adapters) <= 1:
            return None
        if domains is None or len(domains) != rows:
            raise ValueError(
                f"teacher '{self.name}' serves {len(self.adapters)} adapters: score needs each row's domain"
            )
        unknown = sorted(set(domains) - set(self.adapters))
        if unknown:
            raise ValueError(
                f"teacher '{self.name}' has no adapter for {', '.join(unknown)}; it serves {', '.join(self.adapters)}"
            )
        return list(domains)

    def _passes(self, attention_mask: torch.Tensor, names: list[str] | None = None) -> list[slice] | list[torch.Tensor]:
        """The rows of each forward pass: ``batch_size`` consecutive rows, or with
        ``max_tokens_per_batch`` the rows grouped by length under that many padded positions. Packed
        rows go through one adapter: with ``pack_sequences`` a pass holds one domain's rows."""
        B = attention_mask.shape[0]
        passes: list[slice] | list[torch.Tensor]
        if self.cfg.max_tokens_per_batch > 0:
            spans = row_spans(attention_mask)
            groups = token_budget_groups(spans, self.cfg.max_tokens_per_batch, self.cfg.pack_sequences)
            passes = [torch.tensor(g, dtype=torch.long) for g in groups]
        else:
            passes = list(row_chunks(B, self.cfg.batch_size))
        if names is None or not self.cfg.pack_sequences:
            return passes
        split = []
        for p in passes:
            idx = list(range(B)[p]) if isinstance(p, slice) else p.tolist()
            for a in dict.fromkeys(names[i] for i in idx):
                split.append(torch.tensor([i for i in idx if names[i] == a], dtype=torch.long))
        return split

    def _score_chunk(
        self, ids: torch.Tensor, am: torch.Tensor, rm: torch.Tensor, k: int, names: list[str] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Scores of one trimmed chunk: ids/am/rm (b, t) -> logprobs (b, t) and optional top-k
        (b, t, k) ids and log-probs, all 0 outside ``rm``. Inputs and outputs on the CPU; the forward
        on the model's device. With ``pack_sequences`` the rows go through the model as one
        packed row (mopd.batching.PackedRows). ``names``: each row's adapter (PEFT's mixed batch)."""
        if self.cfg.pack_sequences:
            return self._score_packed(ids, am, rm, k, None if names is None else names[:1])
        b, t = ids.shape
        # Token c is predicted by the logits at c - 1: keep logits from one column before the first
        # response token (the model returns the last `keep` positions).
        first = int(rm.any(0).nonzero()[0])
        keep = t - max(first - 1, 0)
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._can_trim_head else {}
        if names is not None:
            kwargs["adapter_names"] = names
        dev_ids = ids.to(self.device)
        window_lp, window_top = self._window_scores(dev_ids, am.to(self.device), keep, k, kwargs)
        tail = slice(t - keep, t)
        lp = torch.zeros(b, t, dtype=torch.float32)
        # Column 0 of the kept window is a prompt token (or column 0 itself): its score is 0.
        lp[:, tail] = window_lp.cpu()
        lp = torch.where(rm, lp, torch.zeros_like(lp))
        if window_top is None:
            return lp, None
        top_ids = torch.zeros(b, t, k, dtype=torch.int64)
        top_lp = torch.zeros(b, t, k, dtype=torch.float32)
        top_ids[:, tail], top_lp[:, tail] = (x.cpu() for x in window_top)
        keep_mask = rm[..., None]
        return lp, (torch.where(keep_mask, top_ids, 0), torch.where(keep_mask, top_lp, 0.0))

    def _score_packed(
        self, ids: torch.Tensor, am: torch.Tensor, rm: torch.Tensor, k: int, names: list[str] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``_score_chunk`` with the rows' real tokens laid end to end: no padding is computed; the
        one packed row goes through ``names[0]``'s adapter."""
        packed = PackedRows(am)
        pos = packed.position_ids.to(self.device)
        n = pos.shape[1]
        kwargs: dict[str, Any] = {} if names is None else {"adapter_names": names}
        lp, top = self._window_scores(packed.pack(ids).to(self.device), None, n, k, kwargs, position_ids=pos)
        keep = rm[..., None]
        lp = torch.where(rm, packed.unpack(lp.cpu()), 0.0)
        if top is None:
            return lp, None
        top_ids, top_lp = (packed.unpack(x.cpu()) for x in top)
        return lp, (torch.where(keep, top_ids, 0), torch.where(keep, top_lp, 0.0))

    def _window_scores(
        self,
        ids: torch.Tensor,
        am: torch.Tensor | None,
        keep: int,
        k: int,
        kwargs: dict[str, Any],
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Scores of the last ``keep`` columns of ``ids``/``am`` (b, t) on the model's device:
        log-probs (b, keep) and, with k > 0, top-k ids / log-probs (b, keep, k); column 0 of the
        window is 0. In chunks of ``logprob_chunk_size`` positions from the last hidden states
        (mopd/logprobs.py), or from the full logits with chunk size 0. Packed rows: ``am`` None
        and ``position_ids`` (see ``forward_logits``)."""
        chunk = self.cfg.logprob_chunk_size
        if chunk == 0:
            logits = forward_logits(self.model, ids, am, position_ids, **kwargs).logits[:, -keep:]
            top = topk_logprobs(logits, k) if k > 0 else None
            return token_logprobs(logits, ids[:, -keep:]), top
        targets = next_token_targets(ids)
        top_box: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []

        def fn(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            tail = targets[:, -x.shape[1] :]  # x: the positions the model kept (at least `keep`)
            picked, top_ids, top_lp = chunked_scores(x, chunk=chunk, weight=w, targets=tail, topk=k)
            top_box.append((top_ids, top_lp))
            assert picked is not None  # targets given
            return picked

        with head_scoring(self.model, fn) as finish:
            out = forward_logits(self.model, ids, am, position_ids, **kwargs).logits
        lp = align_to_tokens(finish(out)[:, -keep:])[..., 0]
        top_ids, top_lp = top_box[-1]
        if top_ids is None or top_lp is None:
            return lp, None
        return lp, (align_to_tokens(top_ids[:, -keep:]), align_to_tokens(top_lp[:, -keep:]))

    def shutdown(self) -> None:
        """Nothing to release beyond the Python objects (kept for interface parity with vLLM)."""


def with_adapters(model: Any, adapters: Mapping[str, str]) -> Any:
    """``model`` wrapped by PEFT with every adapter loaded under its domain's name (the base's
    weights once); a forward with ``adapter_names`` sends each row through its own."""
    from peft import PeftModel

    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, path, adapter_name=first, is_trainable=False)
    for name, p in rest:
        model.load_adapter(p, adapter_name=name, is_trainable=False)
    return model


if TYPE_CHECKING:  # mypy holds the class to the contract TeacherPool calls (teachers/backend.py)
    from teachers.backend import TeacherBackend, TeacherWorker

    _backend: TeacherBackend = HFTeacherWorker  # the constructor, as the pool calls it

    def _conforms(worker: HFTeacherWorker) -> TeacherWorker:  # an error here names the method that differs
        return worker
