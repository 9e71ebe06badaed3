"""Ulysses sequence parallelism (DeepSpeed's ALST integration for Hugging Face models) for the
student's forward: ``trainer.sequence_parallel_size``.

With SP size S, the S consecutive ranks of one SP group hold the same rows (one data-parallel
shard: ``TrainerWorker`` cuts the batch into world_size / S shards) and each runs the model on a
contiguous slice of T / S positions of them. The attention layers exchange heads <-> positions with
DeepSpeed's all-to-all (``UlyssesSPAttentionHF``: each rank attends over the whole sequence for
H / S heads); everything else (embeddings, norms, RoPE, MLP / MoE, the LM head and the chunked
log-probs) is per position and runs on the rank's own slice. ZeRO partitions and reduces over all
ranks; DeepSpeed divides the sum of the gradients by the data-parallel size only (world_size / S),
so the SP ranks' shares of a loss add up (not ZeRO-3's reduce-scatter in DeepSpeed 0.19.8, which
divides by all ranks: ``TrainerWorker._grad_scale`` makes up for it).

    sp = SequenceParallel(model, size=2, micro_batch_size=4)   # before deepspeed.initialize(mpu=sp.mpu)
    sl = sp.shard(input_ids, attention_mask, shifted={"topk": topk_ids})   # this rank's (b, L) slice
    out = model(input_ids=sl.input_ids, position_ids=sl.position_ids)      # no attention mask
    logp = sl.to_rows(scores)   # (b, L, ...) scores of sl.targets -> the rows' (b, t, ...) layout, 0
                                # where another rank scores (TrainerWorker._sp_scores does all this)

What DeepSpeed's Ulysses HF supports, and what this module does about it (DeepSpeed 0.19.8):

* No attention mask. ``register_with_transformers`` wraps the core attention function and drops
  the mask the model built (for the local length: meaningless after the exchange); sdpa then runs
  plain causal attention over the gathered sequence (``is_causal``), and ``position_ids``
  (all-gathered inside the wrapper) only feed RoPE. Left padding would be attended to. So
  ``shard_sequence`` moves each row's real tokens to its front (a stable compaction; a row's
  positions 0..n-1 are what ``mopd.models.position_ids_for`` gives them) and pads on the right up to
  a multiple of S: under causal attention no real token sees a pad on its right, so every real
  position's output equals the masked forward of the padded row. Packed rows (several sequences in
  one row) would attend across sequences: refused (``mopd.config``).
* The next-token target of a slice's last position is the first token of the next rank's slice.
  ``shard_sequence`` shifts on the whole row before slicing: ``targets[p]`` is token p + 1, and
  every tensor in ``shifted`` is moved the same way (row p pairs with token p + 1), so each rank
  scores its own output rows and no log-prob crosses ranks. ``SPSlice.to_rows`` puts the scores
  back at their tokens' columns of the rows given (zeros at the tokens other ranks score).
* A fixed number of rows per forward: ``UlyssesSPAttentionHF`` asserts the (seq, batch, heads,
  head_dim) shapes with the ``micro_batch_size`` given at setup, so ``shard`` pads the rows to it
  with empty rows. The sequence length may vary (``seq_length_is_variable``). Token-budget
  micro-batches (a varying row count) are refused.
* ``position_ids`` must be passed: without them HF makes local 0..L-1 positions and the results are
  silently wrong.
* Core attention ``sdpa`` (or flash / flex on GPUs); ``eager`` is refused by DeepSpeed, which
  rules out MiMoV2Flash (eager only: attention sinks, V head dim != QK head dim; the all-to-all
  assumes one head size for q, k and v). The dropped mask also drops sliding windows.
  ``mopd.config.sequence_parallel_errors`` says all that before a run starts.
* The MoE balance loss is a product of two token means (expert load x router probability), not
  a sum over tokens: ``balance_parts`` / ``balance_share`` make each rank's share from the SP
  group's summed counts and its own probability sums, so the shares add up to the whole rows'
  loss exactly (values and gradients).

``register_with_transformers`` replaces the process-wide ``ALL_ATTENTION_FUNCTIONS[impl]``, with
the student's head counts baked in: every model of that attention implementation in the process
goes through the SP wrapper afterwards (a trainer rank holds only the student), and it can run once
per process (DeepSpeed's SP groups are module globals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mopd.config import sequence_parallel_errors

_REGISTERED: list[int] = []  # the SP size this process registered Ulysses with (at most once)


@dataclass
class SPSlice:
    """One SP rank's slice of some rows (see ``shard_sequence``). All (b, L, ...) with L = T' / S,
    T' the compacted length rounded up to a multiple of S; ``start`` is the slice's first column.

    input_ids, position_ids: the model's inputs (no attention mask). real: input positions that are
    real tokens. targets: the next token of each position (output-aligned: row p predicts
    ``targets[p]``), 0 past a row's end; valid: rows whose target is a real token. columns: the
    column of the given rows (t wide) that holds each row's target token; t where ``valid`` is False.
    aligned: the caller's per-token tensors at the input positions (e.g. MoE routes to replay);
    shifted: the caller's per-token tensors moved to the output rows (row p holds token p + 1's
    value, e.g. the teachers' top-k ids).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    real: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    columns: torch.Tensor
    width: int
    start: int
    seq_len: int
    aligned: dict[str, torch.Tensor] = field(default_factory=dict)
    shifted: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(b, L, ...) scores of this slice's output rows -> (b, t, ...) in the given rows' layout,
        token-aligned like ``mopd.logprobs.align_to_tokens`` (the column of the token each output
        row predicts), 0 at every other column. Differentiable (a scatter)."""
        idx = self.columns.view(*self.columns.shape, *([1] * (x.dim() - 2))).expand_as(x)
        out = x.new_zeros((x.shape[0], self.width + 1, *x.shape[2:]))  # column t: the invalid rows
        return out.scatter(1, idx, x)[:, : self.width]


def _compaction(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) column order that puts each row's real tokens first, in order (stable)."""
    return torch.sort((~attention_mask.bool()).to(torch.int8), dim=1, stable=True).indices


def _gather_cols(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, idx)


def _slice_bounds(n_real: torch.Tensor, sp_rank: int, sp_size: int) -> tuple[int, int, int]:
    """(total, lo, hi): the compacted width (the longest row rounded up to a multiple of
    ``sp_size``) and this rank's columns [lo, hi) of it."""
    width = max(int(n_real.max()) if n_real.numel() else 0, 1)
    total = -(-width // sp_size) * sp_size
    L = total // sp_size
    return total, sp_rank * L, (sp_rank + 1) * L


def shard_sequence(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    sp_rank: int,
    sp_size: int,
    aligned: dict[str, torch.Tensor] | None = None,
    shifted: dict[str, torch.Tensor] | None = None,
    aligned_fill: int = 0,
    pad_id: int = 0,
) -> SPSlice:
    """This SP rank's slice of the rows ``input_ids`` (b, t) with ``attention_mask`` (b, t) (any
    padding: left-padded prompts and right-padded responses). Real tokens go to the front of each
    row (positions 0..n-1), the rows are padded on the right to a multiple of ``sp_size``, the
    next-token targets and ``shifted`` are moved one position left on the whole row, then every
    tensor is cut to columns ``[sp_rank * L, (sp_rank + 1) * L)``. Padding holds ``pad_id`` in the
    inputs, ``aligned_fill`` in ``aligned`` and 0 in ``shifted``. Every rank of the SP group must
    get the same rows."""
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank {sp_rank} is not in [0, {sp_size})")
    am = attention_mask.bool()
    b, t = am.shape
    order = _compaction(am)
    n_real = am.sum(1)
    total, lo, hi = _slice_bounds(n_real, sp_rank, sp_size)
    width = min(total, t)
    cols = torch.arange(total, device=input_ids.device)
    real = cols[None, :] < n_real[:, None]  # (b, total) after compaction

    def compact(x: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """(b, t, ...) -> (b, total, ...): real tokens first, ``fill`` after."""
        y = _gather_cols(x, order)[:, :width]
        if total > width:
            pad = y.new_full((y.shape[0], total - width, *y.shape[2:]), fill)
            y = torch.cat([y, pad], 1)
        keep = real.view(*real.shape, *([1] * (y.dim() - 2)))
        return torch.where(keep, y, torch.as_tensor(fill, dtype=y.dtype, device=y.device))

    def shift(x: torch.Tensor) -> torch.Tensor:
        """Row p gets column p + 1; the last row gets zeros."""
        return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)

    ids = compact(input_ids, pad_id)
    valid = shift(real)
    # The column (of the rows given) of the token at compacted index p + 1; t for no token.
    where = torch.cat([order[:, :width], order.new_full((b, total - width), t)], 1)
    columns = torch.where(valid, shift(where), torch.full_like(where, t))
    positions = cols[None, :].expand(b, total)
    return SPSlice(
        input_ids=ids[:, lo:hi].contiguous(),
        position_ids=positions[:, lo:hi].contiguous(),
        real=real[:, lo:hi].contiguous(),
        targets=shift(ids)[:, lo:hi].contiguous(),
        valid=valid[:, lo:hi].contiguous(),
        columns=columns[:, lo:hi].contiguous(),
        width=t,
        start=lo,
        seq_len=total,
        aligned={k: compact(v, aligned_fill)[:, lo:hi].contiguous() for k, v in (aligned or {}).items()},
        shifted={k: shift(compact(v))[:, lo:hi].contiguous() for k, v in (shifted or {}).items()},
    )


def owned_tokens(attention_mask: torch.Tensor, sp_rank: int, sp_size: int) -> torch.Tensor:
    """(b, t) bool: the tokens whose log-prob SP rank ``sp_rank`` computes (``SPSlice.to_rows``'s
    non-zero columns): real tokens at compacted index k with lo < k <= hi (output row k - 1 is the
    rank's). Each real token but a row's first belongs to exactly one rank."""
    am = attention_mask.bool()
    _, lo, hi = _slice_bounds(am.sum(1), sp_rank, sp_size)
    k = am.long().cumsum(1) - 1
    return am & (k > lo) & (k <= hi)


def slice_counts(attention_mask: torch.Tensor, sp_rank: int, sp_size: int, rows: int) -> tuple[int, int]:
    """(positions, real tokens) SP rank ``sp_rank``'s forward computes on these rows padded to
    ``rows`` rows: its share of ``train/padding_frac``'s counts (the ranks' shares add up)."""
    n_real = attention_mask.bool().sum(1)
    _, lo, hi = _slice_bounds(n_real, sp_rank, sp_size)
    return rows * (hi - lo), int((n_real - lo).clamp(0, hi - lo).sum())


# --------------------------------------------------------------------------- MoE balance loss


def balance_parts(kind: str, layers: Any, mask: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's part of the MoE balance loss: ``(counts, probs)``, ``counts`` (no gradient) to
    be summed over the SP group, ``probs`` (with gradient) this rank's own. ``mask`` (N,) marks the
    real tokens of the N = b * L positions.

    kind "switch": transformers' ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE; ``layers`` the
    model's ``router_logits``, a tuple of (N, E), the top-k taken from their softmax as it does),
    pooled over layers: counts (1, E + 1), probs (1, E). kind "sigmoid": ``sigmoid_balance_loss``
    (``layers`` the ``RouterCapture`` records, (logits, chosen experts) per layer), per layer:
    counts (layers, E + 1), probs (layers, E). ``counts[..., :E]`` are top-k assignments per expert
    over real tokens, ``counts[..., E]`` the real tokens."""
    m = mask.reshape(-1).float()
    counts, probs = [], []
    for layer in layers:
        if kind == "switch":
            logits = layer.to(m.device)
            weights = F.softmax(logits, dim=-1)
            chosen = torch.topk(weights, top_k, dim=-1).indices
            p = weights.float()
        elif kind == "sigmoid":
            logits, chosen = layer
            scores = torch.sigmoid(logits.float())
            p = scores / scores.sum(-1, keepdim=True)
        else:
            raise ValueError(f"unknown balance loss kind {kind!r}")
        n_experts = logits.shape[-1]
        c = torch.zeros(n_experts, dtype=torch.float32, device=m.device)
        c = c.scatter_add(0, chosen.reshape(-1).long(), m.repeat_interleave(chosen.shape[-1]))
        counts.append(torch.cat([c, m.sum()[None]]).detach())
        probs.append((p * m[:, None]).sum(0))
    c_all, p_all = torch.stack(counts), torch.stack(probs)
    if kind == "switch":
        return c_all.sum(0, keepdim=True), p_all.sum(0, keepdim=True)
    return c_all, p_all


def balance_share(kind: str, counts: torch.Tensor, probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """This rank's share of the balance loss of the whole rows, from ``counts`` summed over the SP
    group and the rank's own ``probs`` (``balance_parts``; ``top_k`` experts per token). Linear in
    ``probs``: the shares add up to ``load_balancing_loss_func`` / ``sigmoid_balance_loss`` of the
    whole rows, gradients too."""
    n_experts = probs.shape[-1]
    n = counts[..., -1:].clamp(min=1.0)
    f, p = counts[..., :-1] / n, probs / n
    if kind == "switch":
        return n_experts * (f * p).sum()
    return (n_experts * (f / top_k * p).sum(-1)).mean()  # per layer, then the mean over layers


# --------------------------------------------------------------------------- one rank's part


class SequenceParallel:
    """A trainer rank's place in its SP group: what ``TrainerWorker`` asks of sequence parallelism.

    Built before ``deepspeed.initialize`` (pass ``mpu``) with ``torch.distributed`` initialized;
    registers DeepSpeed's Ulysses attention for ``model``'s attention implementation and makes the
    SP groups (ranks ``g * size .. (g + 1) * size - 1`` form SP group g). Every later forward must
    have ``micro_batch_size`` rows (``shard`` pads) and ``position_ids``."""

    def __init__(self, model: Any, size: int, micro_batch_size: int):
        import torch.distributed as tdist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        if size < 2:
            raise ValueError(f"sequence parallelism needs size >= 2, got {size}")
        impl = model.config._attn_implementation
        errors = sequence_parallel_errors(model.config, size, tdist.get_world_size(), impl)
        if errors:
            raise ValueError("; ".join(errors))
        if _REGISTERED:
            raise RuntimeError(
                "Ulysses sequence parallelism is set up once per process (DeepSpeed's SP groups and the "
                "patched attention function are process globals): one sequence-parallel student per process"
            )
        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=impl,
            sequence_parallel_size=size,
            micro_batch_size=micro_batch_size,
            seq_length_is_variable=True,
        )
        _REGISTERED.append(size)
        self.size, self.micro_batch_size = size, micro_batch_size
        self.group = self.mpu.get_sequence_parallel_group()
        self.rank = self.mpu.get_sequence_parallel_rank()

    def shard(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        aligned: dict[str, torch.Tensor] | None = None,
        shifted: dict[str, torch.Tensor] | None = None,
        aligned_fill: int = 0,
    ) -> SPSlice:
        """This rank's ``shard_sequence`` of the rows, padded with empty rows to
        ``micro_batch_size`` (the slice then has that many rows; ``to_rows`` keeps them)."""
        b = input_ids.shape[0]
        if b > self.micro_batch_size:
            raise ValueError(f"{b} rows in one forward; sequence parallelism runs {self.micro_batch_size}")
        pad = self.micro_batch_size - b

        def rows(x: torch.Tensor, fill: Any = 0) -> torch.Tensor:
            return x if pad == 0 else torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])

        return shard_sequence(
            rows(input_ids), rows(attention_mask), sp_rank=self.rank, sp_size=self.size,
            aligned={k: rows(v, aligned_fill) for k, v in (aligned or {}).items()},
            shifted={k: rows(v) for k, v in (shifted or {}).items()}, aligned_fill=aligned_fill,
        )  # fmt: skip

    def owned(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return owned_tokens(attention_mask, self.rank, self.size)

    def counts(self, attention_mask: torch.Tensor) -> tuple[int, int]:
        return slice_counts(attention_mask, self.rank, self.size, self.micro_batch_size)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the SP group (in place; no gradient)."""
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def balance(self, kind: str, layers: Any, sl: SPSlice, top_k: int = 0) -> torch.Tensor:
        """This rank's share of the micro-batch's balance loss (``balance_parts``)."""
        if kind == "sigmoid":
            top_k = layers[0][1].shape[-1]
        counts, probs = balance_parts(kind, layers, sl.real, top_k)
        return balance_share(kind, self.sum(counts), probs, top_k)
