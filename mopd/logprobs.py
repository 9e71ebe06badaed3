"""Log-probs and top-k of a causal LM's next-token distributions, computed in chunks of positions so
that no (positions x vocabulary) tensor ever exists: the one implementation behind the trainer's
loss (per-token log-probs and the student's log-probs at the teacher's top-k ids, with gradients)
and the HF teacher's scores (log-probs of the sampled tokens and its own top-k, no gradients).

    targets = next_token_targets(input_ids, teacher_topk_ids)     # (B, T, 1 + K) int64
    fn = lambda x, w: chunked_logprobs(x, targets, chunk=1024, weight=w)
    with head_scoring(model, fn) as finish:
        out = model(input_ids=ids, attention_mask=am).logits       # (B, T, 1 + K) f32, not (B, T, V)
    scores = align_to_tokens(finish(out))   # [..., 0]: log-prob of token t; [..., 1:]: at the top-k ids

Why from the hidden states and not from the logits: the logits are the big tensor. At V = 151,936
one sequence of 8K tokens has 2.5 GB of bf16 logits, and their gradient is as large again; chunking
only the log-softmax of given logits still keeps both (the logits' gradient is a (T, V) tensor by
definition). So, as NeMo-RL, Liger and prime-rl do, the LM head's projection runs per chunk:
``head_scoring`` makes the model's own ``lm_head`` module return ``fn(hidden, lm_head.weight)``
instead of its logits while the model runs. Replacing the head's ``forward`` (and not calling
the backbone and the weight by hand) keeps everything the model does around the head: the final
norm, ``logits_to_keep``, tied embeddings (the head's weight is the embedding, and its gradient
reaches both), and DeepSpeed ZeRO-3, whose hooks gather the partitioned weight around the head's
forward and backward exactly as for the plain projection.

Why a custom ``torch.autograd.Function``: autograd would keep each chunk's fp32 log-softmax for the
backward, i.e. the whole (T, V) again. ``chunked_logprobs`` saves only its inputs (the hidden
states, which the plain head keeps too, and the weight), the targets and one log-sum-exp per
position; the backward recomputes each chunk's logits. Extra memory: about 6 bytes x chunk x V
(a chunk's fp32 logits and its half-precision GEMM output or gradient), independent of T; the cost
is one more head GEMM (the forward one) in the backward.

Precision: each chunk's logits are the head's GEMM in the weight's dtype, rounded like the model's
(bf16 logits for a bf16 model), then fp32 for the softmax, as ``mopd.models.token_logprobs`` does
on the model's logits; the logits' gradient goes into the head's GEMMs in the weight's dtype, as
autograd does for the plain head. Only the weight's gradient is summed chunk by chunk (in the
weight's dtype), where the plain head sums all positions in one GEMM. On a CPU in bf16/fp16 the
GEMMs run in fp32 on upcast operands instead (``_gemm_dtype``), with the same rounding of the
logits, at the cost of an fp32 copy of the weight and of its gradient. Values and gradients equal
the unchunked ones within float tolerance.

Models whose logits are more than ``hidden @ lm_head.weight.T`` (Gemma's final soft-capping,
Cohere's ``logit_scale``, Granite's ``logits_scaling``, a head with a bias or a wrapped forward)
keep their head: ``head_scoring`` then hands ``fn`` the model's logits (``weight=None``), still
chunked, which saves the fp32 copies but not the logits and their gradient.

Tests: ``pytest tests/test_chunked_logprobs.py``; memory and time at V = 151,936:
``python benchmarks/logprob_memory.py`` (figures in docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)
# Config attributes of models whose head does more than the projection; a neutral value is fine.
_LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# --------------------------------------------------------------------------- per chunk


def _gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in: the weight's, except half precision on a CPU, where fp32
    (a CPU without bf16 units, e.g. AVX2 only, runs a bf16 GEMM 10-300x slower than an fp32 one:
    benchmarks/logprob_memory.py). The fp32 copy of the weight and the fp32 accumulator of its
    gradient (2 x V x H x 4 bytes) are small at the model sizes a CPU trains."""
    return torch.float32 if weight.device.type == "cpu" and weight.dtype in HALF else weight.dtype


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, w_gemm: torch.Tensor | None) -> torch.Tensor:
    """(c, V) f32 logits of one chunk, a new tensor (callers overwrite it): a copy of ``x`` (c, V),
    or ``x`` (c, H) @ weight.T rounded to the weight's dtype (what the model's head returns)."""
    if weight is None or w_gemm is None:
        return x.to(torch.float32, copy=True)
    out = F.linear(x.to(w_gemm.dtype), w_gemm)
    if out.dtype == torch.float32:  # fp32 weight, or a half one on a CPU: round in place
        return out if weight.dtype == torch.float32 else out.copy_(out.to(weight.dtype))
    return out.float()


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """(c,) log-sum-exp of each row of ``z`` (c, V) f32; overwrites ``z`` (no second (c, V) tensor)."""
    m = z.amax(-1, keepdim=True)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _spans(n: int, chunk: int) -> Iterator[slice]:
    step = chunk if chunk > 0 else max(n, 1)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _flat(x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (..., D) as (N, D) and ``targets`` (..., K) as (N, K): views for contiguous inputs."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2, None if targets is None else targets.reshape(x2.shape[0], -1)


def _check(x: torch.Tensor, targets: torch.Tensor | None, weight: torch.Tensor | None) -> None:
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != x.shape[-1]):
        raise ValueError(f"weight {tuple(weight.shape)} is not (V, {x.shape[-1]}) for hidden states {tuple(x.shape)}")
    if targets is not None and targets.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match the positions of {tuple(x.shape)}")


def _scan(
    x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor | None, topk: int, chunk: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over (N, D) ``x`` in chunks of positions: log-probs at ``targets`` (N, K) f32 or
    None, the log-sum-exp (N,) f32, and the ``topk`` ids (N, k) int64 / log-probs (N, k) f32 or None."""
    n, dev = x.shape[0], x.device
    w_gemm = None if weight is None else weight.to(_gemm_dtype(weight))
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    picked = None if targets is None else torch.empty(targets.shape, dtype=torch.float32, device=dev)
    top_ids = torch.empty(n, topk, dtype=torch.int64, device=dev) if topk else None
    top_vals = torch.empty(n, topk, dtype=torch.float32, device=dev) if topk else None
    for s in _spans(n, chunk):
        z = _chunk_logits(x[s], weight, w_gemm)
        if picked is not None and targets is not None:
            picked[s] = z.gather(-1, targets[s])
        if top_ids is not None and top_vals is not None:
            # The softmax is monotone: the top-k logits are the top-k log-probs.
            top_vals[s], top_ids[s] = z.topk(topk, dim=-1)
        lse[s] = _logsumexp_(z)
        del z  # before the next chunk's logits exist: one (chunk, V) buffer at a time
    if picked is not None:
        picked.sub_(lse[:, None])
    if top_vals is not None:
        top_vals.sub_(lse[:, None])
    return picked, lse, top_ids, top_vals


def _backward_chunk(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    lse: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor,
    rows: slice,
    grad_x: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> None:
    """One chunk's backward: recompute its logits, write its rows of ``grad_x`` and add its share
    of ``grad_w``. A function of its own so that its (chunk, V) buffers are gone when it returns."""
    # d/dz log_softmax(z)[t] = onehot(t) - softmax(z), weighted by the K targets' gradients, in place.
    dz = _chunk_logits(x, weight, w_gemm).sub_(lse[:, None]).exp_()
    dz.mul_(-grad.sum(-1, keepdim=True)).scatter_add_(-1, targets, grad)
    if weight is None or w_gemm is None:
        if grad_x is not None:
            grad_x[rows] = dz
        return
    dz = dz.to(w_gemm.dtype)  # the logits' gradient as the head's GEMMs see it
    if grad_x is not None:
        grad_x[rows] = dz @ w_gemm
    if grad_w is not None:
        grad_w.addmm_(dz.t(), x.to(w_gemm.dtype))


class _ChunkedLogprobs(torch.autograd.Function):
    """log_softmax(logits).gather(-1, targets) with logits = x or x @ weight.T, chunk by chunk;
    the backward recomputes each chunk's logits (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor, chunk: int):
        x2, t2 = _flat(x, targets)
        assert t2 is not None
        picked, lse, _, _ = _scan(x2, weight, t2, 0, chunk)
        assert picked is not None
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk = chunk
        return picked.view(targets.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, targets, lse = ctx.saved_tensors
        x2, t2 = _flat(x, targets)
        assert t2 is not None
        g = grad.reshape(t2.shape).float()
        need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        w_gemm = None if weight is None else weight.to(_gemm_dtype(weight))
        grad_x = torch.zeros_like(x2) if need_x else None
        grad_w = torch.zeros_like(w_gemm) if need_w and w_gemm is not None else None
        for s in _spans(x2.shape[0], ctx.chunk):
            if bool(g[s].any()):  # else the positions are unused by the loss (prompt, padding): 0
                _backward_chunk(x2[s], weight, w_gemm, lse[s], t2[s], g[s], s, grad_x, grad_w)
        gx = None if grad_x is None else grad_x.view_as(x)
        gw = None if grad_w is None or weight is None else grad_w.to(weight.dtype)
        return gx, gw, None, None


def chunked_logprobs(
    x: torch.Tensor, targets: torch.Tensor, *, chunk: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., K) f32 log-probs of ``targets`` (..., K) int64 under softmax(logits) at each position.

    ``weight`` None: ``x`` (..., V) are the logits. Otherwise ``x`` (..., H) are the hidden states
    that the head ``weight`` (V, H) projects. ``chunk`` positions at a time (0: all at once).
    Differentiable w.r.t. ``x`` and ``weight``; keeps no (positions x V) tensor for the backward."""
    _check(x, targets, weight)
    return _ChunkedLogprobs.apply(x, weight, targets, chunk)


@torch.no_grad()
def chunked_scores(
    x: torch.Tensor,
    *,
    chunk: int,
    weight: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    topk: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Scores without gradient, one pass: (..., K) f32 log-probs at ``targets`` (or None) and the
    (..., k) ids int64 / log-probs f32 of the ``topk`` most likely tokens (or None), k = min(topk, V).
    ``x`` and ``weight`` as in ``chunked_logprobs``."""
    _check(x, targets, weight)
    x2, t2 = _flat(x, targets)
    vocab = x.shape[-1] if weight is None else weight.shape[0]
    k = min(topk, vocab)
    picked, _, ids, vals = _scan(x2, weight, t2, k, chunk)
    lead = x.shape[:-1]
    return (
        None if picked is None else picked.view(*lead, -1),
        None if ids is None else ids.view(*lead, k),
        None if vals is None else vals.view(*lead, k),
    )


# --------------------------------------------------------------------------- causal-LM alignment


def next_token_targets(input_ids: torch.Tensor, extra_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, 1 + K) int64 ids that output row t of a causal LM (which predicts token t + 1) is
    scored at: ``input_ids[:, t + 1]``, then ``extra_ids[:, t + 1]`` (B, T, K) if given; the last
    row gets 0s (it predicts past the sequence; ``align_to_tokens`` drops it)."""
    nxt = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], 1)[..., None]
    if extra_ids is None:
        return nxt
    ext = torch.cat([extra_ids[:, 1:], torch.zeros_like(extra_ids[:, :1])], 1)
    return torch.cat([nxt, ext.to(nxt.dtype)], -1)


def align_to_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Output rows (B, T, ...) -> positions: position t holds row t - 1 (the distribution of token
    t), position 0 holds 0, as ``mopd.models.token_logprobs`` aligns them."""
    return torch.cat([torch.zeros_like(scores[:, :1]), scores[:, :-1]], 1)


# --------------------------------------------------------------------------- the model's head


def output_projection(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head if its logits are exactly ``hidden @ head.weight.T`` (a bias-free
    ``nn.Linear``, nothing after it in the config, its ``forward`` not wrapped by someone else);
    None otherwise."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or "forward" in head.__dict__:
        return None
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)]
    for c in (c for c in configs if c is not None):
        for attr, neutral in _LOGIT_POSTPROCESSING.items():
            if getattr(c, attr, neutral) not in (neutral, None):
                return None
    return head


@contextmanager
def head_scoring(model: torch.nn.Module, fn: ScoreFn) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While active, the model's head returns ``fn(hidden, head.weight)`` in place of its logits
    (``output_projection``), so the model's ``logits`` output is ``fn``'s result. Yields ``finish``,
    which turns that output into ``fn``'s result for either kind of head: as it is, or, for a head
    that must stay, ``fn(logits, None)`` (``fn`` then gets the model's logits)."""
    head = output_projection(model)
    if head is None:
        yield lambda logits: fn(logits, None)
        return
    proj = head  # bound for the closure (mypy: not None)
    head.__dict__["forward"] = lambda hidden: fn(hidden, proj.weight)  # shadows nn.Linear.forward
    try:
        yield lambda out: out
    finally:
        head.__dict__.pop("forward", None)
