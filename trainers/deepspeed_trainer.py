"""The DeepSpeed training engine of the MOPD student: one ``TrainerWorker`` per data-parallel rank.

A worker is a plain class: tests drive it in-process (world size 1); ``trainers.pool.TrainerPool``
runs ``world_size`` of them as Ray actors. Each rank receives only its own rows, a ``RankBatch``
(trainers/shards.py: rows ``rank::world_size``, tensors only); one ``train_step`` is exactly one
optimizer step. The rank runs on the device ``mopd.dist.devices`` picks from ``trainer.resources``
(DeepSpeed's accelerator follows it); what it returns is on the CPU.

    worker = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500)
    metrics = worker.train_step(train_batch)      # {"train/loss": ..., "teacher/math/reverse_kl": ...}
    metrics = worker.train_step(rank_batch)       # the same, from this rank's shard (the pool's way)
    weights = worker.state_dict()                 # full HF state dict on rank 0, None elsewhere
    worker.send_weights(version, bucket_bytes)    # rank 0 broadcasts to the rollout (weight sync group)

Collectives: under ZeRO every method except ``get_version`` must be called on all
ranks with the same arguments (the pool does that).

With ``trainer.sequence_parallel_size`` S > 1 (trainers/sequence_parallel.py) the S consecutive
ranks of an SP group take the same shard (data-parallel rank ``rank // S`` of ``world_size // S``)
and each scores 1/S of every row's tokens; loss, metrics and gradients are shares that add up.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch

from mopd.batching import PackedRows
from mopd.config import LR_SCHEDULES, ModelConfig, MOPDConfig, ObjectiveConfig
from mopd.dist.devices import deepspeed_env, worker_device
from mopd.dist.runtime import set_torch_threads
from mopd.dist.weight_sync import TensorSpec, WeightLink, host_store, plan_sync
from mopd.logprobs import align_to_tokens, chunked_logprobs, head_scoring, next_token_targets
from mopd.models import DTYPES, forward_logits, load_model, load_tokenizer, token_logprobs
from mopd.objective import LossInputs, Objective, get_objective
from mopd.routing import NOT_RECORDED, replay_routes
from mopd.types import TrainBatch
from trainers.lora import (
    ADAPTER_DIR,
    Merged,
    adapter_parameters,
    hf_model,
    is_lora,
    merge_sources,
    with_lora,
)
from trainers.moe_balance import RouterCapture, sigmoid_balance_loss
from trainers.sequence_parallel import SequenceParallel
from trainers.shards import RankBatch, shard_batch

Metrics = dict[str, float]

# DeepSpeed's client_state comes back mixed with its own keys; ours travel under this one.
_CLIENT_KEY = "mopd"
_CKPT_TAG = "state"
# Per-domain sums reduced across ranks, in this column order.
_STATS = ("tokens", "reverse_kl", "is_masked", "adv", "abs_diff")


# --------------------------------------------------------------------------- configuration


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup over ``warmup_steps``, then constant, or a
    linear / cosine decay that reaches 0 at ``total_steps``.

    Not ``transformers.get_scheduler``: its warmup starts at 0 (step / warmup) where this one starts
    at 1 / warmup, and its linear decay rounds differently, so every run with warmup or a linear
    decay (the quickstart's) would change."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown trainer.lr_schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")

    return factor


def deepspeed_config(cfg: MOPDConfig) -> dict[str, Any]:
    """The DeepSpeed config of a recipe.

    Gradient accumulation is driven by the worker, not by DeepSpeed's counter: the number of
    micro-batches depends on the batch, so the worker marks the last backward of a step as the
    accumulation boundary itself. DeepSpeed's nominal accumulation steps is therefore 1. With
    sequence parallelism the batch is counted over the data-parallel ranks (world / SP size).
    """
    t = cfg.trainer
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.micro_batch_size * (t.world_size // t.sequence_parallel_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a NaN gradient norm makes DeepSpeed skip the update (used below).
        "bf16": {"enabled": t.bf16, "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        # Offloaded state is stepped by the torch AdamW the worker passes (no cpu_adam build).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on vectors (norms, biases, attention sinks): decaying them only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- micro-batches


@dataclass
class MicroBatch:
    """Rows of a rank's shard that one forward/backward processes.

    A padding micro-batch (``dummy``) lets a rank with fewer rows enter as many forward/backward
    passes (and thus ZeRO collectives) as the others; its loss is multiplied by 0.
    """

    rows: list[int]
    dummy: bool = False


def plan_micro_batches(shard: RankBatch, micro_batch_size: int) -> list[MicroBatch]:
    """The shard's micro-batches: its token-budget plan if it has one, else its rows in chunks of
    ``micro_batch_size``; padded with zero-weight passes to ``shard.micro_batches``, the count every
    rank makes."""
    own = list(range(len(shard)))
    if shard.plan is not None:
        plan = [MicroBatch(rows) for rows in shard.plan]
    else:
        plan = [MicroBatch(own[i : i + micro_batch_size]) for i in range(0, len(own), micro_batch_size)]
    if len(plan) > shard.micro_batches:
        raise ValueError(
            f"a shard of {len(own)} rows needs {len(plan)} micro-batches of {micro_batch_size}, more than "
            f"the {shard.micro_batches} it was cut for: shard with trainer.micro_batch_size={micro_batch_size}"
        )
    return plan + [MicroBatch([0], dummy=True)] * (shard.micro_batches - len(plan))


@dataclass
class _Rows:
    """The tensors of some rows of a shard, with all-padding columns dropped.

    input_ids (b, t) int64, attention_mask / response_mask (b, t) bool, rollout / teacher (b, t) f32,
    adv_orm (b,) f32 or None, topk_ids (b, t, K) int64 / topk_logprobs (b, t, K) f32 or None,
    routes (b, t, L, k) int16 or None: the rollout's MoE routes, replayed in the forward.
    domains: each row's index into the batch's domain names.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout: torch.Tensor
    teacher: torch.Tensor
    adv_orm: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    domains: list[int]
    routes: torch.Tensor | None = None

    def to(self, device: torch.device) -> _Rows:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return _Rows(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
            self.rollout.to(device), self.teacher.to(device),
            move(self.adv_orm), move(self.topk_ids), move(self.topk_logprobs), self.domains, move(self.routes),
        )  # fmt: skip

    def subset(self, idx: list[int]) -> _Rows:
        t = torch.as_tensor(idx, dtype=torch.long, device=self.input_ids.device)
        pick = lambda x: None if x is None else x[t]  # noqa: E731
        return _Rows(
            self.input_ids[t], self.attention_mask[t], self.response_mask[t], self.rollout[t], self.teacher[t],
            pick(self.adv_orm), pick(self.topk_ids), pick(self.topk_logprobs), [self.domains[i] for i in idx],
            pick(self.routes),
        )  # fmt: skip


def _take_rows(shard: RankBatch, rows: list[int]) -> _Rows:
    """Select ``rows`` of the shard and drop the columns that are padding in all of them (the leading
    prompt pad and the trailing response pad): positions come from the attention mask, so results
    are equal."""
    t = torch.as_tensor(rows, dtype=torch.long)
    real = shard.attention_mask[t].any(dim=0).nonzero()
    lo, hi = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, shard.input_ids.shape[1])
    cols = lambda x: None if x is None else x[t, lo:hi]  # noqa: E731
    return _Rows(
        shard.input_ids[t, lo:hi], shard.attention_mask[t, lo:hi], shard.response_mask[t, lo:hi],
        shard.rollout_logprobs[t, lo:hi], shard.teacher_logprobs[t, lo:hi],
        None if shard.adv_orm is None else shard.adv_orm[t],
        cols(shard.teacher_topk_ids), cols(shard.teacher_topk_logprobs), shard.domain_ids[t].tolist(),
        cols(shard.routed_experts),
    )  # fmt: skip


def _num_sequences(response_mask: torch.Tensor) -> int:
    """Rows with at least one response token: the denominator of the objective's sequence mean."""
    return int((response_mask.sum(-1) > 0).sum())


# --------------------------------------------------------------------------- the worker


def _set_dist_env(rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int) -> None:
    """DeepSpeed falls back to MPI discovery (and fails without mpi4py) unless these are set."""
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
    )  # fmt: skip


def _quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO collectives call torch APIs that torch 2.13 marks deprecated, every step.
    for api in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*torch.distributed.{api}.*", category=FutureWarning)


@dataclass
class _StepSums:
    """What one rank adds up during a train_step; summed over ranks at the end.

    stats (D, 5) f64: per-domain sums in ``_STATS`` order. loss / aux: this rank's share of the
    whole-batch loss and balance loss (their sum over ranks is the batch value).
    """

    domains: tuple[str, ...]
    sequences: int  # rows of the whole batch with >= 1 response token (the objective's denominator)
    rows: int  # rows of the whole batch
    stats: torch.Tensor
    loss: float = 0.0
    aux: float = 0.0
    positions: int = 0  # positions the forward passes computed, padding included
    real: int = 0  # of which real tokens (prompt and response)

    @classmethod
    def for_shard(cls, shard: RankBatch) -> _StepSums:
        # The whole batch's domains and counts, carried by the shard: identical on every rank.
        stats = torch.zeros(len(shard.domains), len(_STATS), dtype=torch.float64)
        return cls(shard.domains, shard.batch_sequences, shard.batch_rows, stats)


class TrainerWorker:
    """One DeepSpeed rank of the student trainer (see the module docstring)."""

    def __init__(self, cfg: MOPDConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        t = cfg.trainer
        # Sequence parallelism: the SP group of ranks dp_rank * sp .. holds data-parallel shard dp_rank.
        sp = t.sequence_parallel_size
        if sp < 1 or world_size % sp:
            raise ValueError(f"trainer.sequence_parallel_size ({sp}) must divide the world size ({world_size})")
        self.dp_size, self.dp_rank = world_size // sp, rank // sp
        device = worker_device(t.resources, "trainer.resources")
        # DeepSpeed puts the rank on device LOCAL_RANK of its accelerator: the one decided above
        # (under Ray with GPUs, the actor's only visible device, index 0).
        local_rank = device.index if device.type == "cuda" and device.index is not None else rank
        _set_dist_env(rank, world_size, master_addr, master_port, local_rank=local_rank)
        os.environ.update(deepspeed_env(t.resources))
        set_torch_threads(t.resources.num_cpus)
        import deepspeed

        _quiet_deepspeed()
        # The shm all-reduce op JIT-compiles for ~50 s; gloo does the job on CPU.
        ds_comm: Any = importlib.import_module("deepspeed.comm.torch")
        ds_comm.build_shm_op = lambda: None
        # Same seed on every rank, so all ranks start from identical weights. Loaded in fp32: these
        # are the master weights; DeepSpeed casts the module when trainer.bf16 is on.
        model = load_model(cfg.student, seed=cfg.run.seed, dtype="float32")
        lora = getattr(cfg.student, "lora", None)
        if lora is not None and lora.r > 0:  # the adapter alone trains (trainers/lora.py)
            model = with_lora(model, lora, cfg.run.seed)
        self._lora = is_lora(model)
        self._sp: SequenceParallel | None = None
        if sp > 1:
            from deepspeed.accelerator import get_accelerator

            # The SP groups are made before the engine (it takes them as its ``mpu``).
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
            self._sp = SequenceParallel(model, sp, t.micro_batch_size)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._routes = RouterCapture(model)
        self._moe = hasattr(model.config, "output_router_logits")
        optimizer = torch.optim.AdamW(
            _param_groups(model, t.weight_decay), lr=t.lr, betas=cast(tuple[float, float], tuple(t.betas))
        )
        factor = lr_lambda(t.lr_schedule, t.warmup_steps, cfg.run.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=deepspeed_config(cfg),
            **({} if self._sp is None else {"mpu": self._sp.mpu}),
        )
        # What a rank's share of the loss is multiplied by before its backward, so that DeepSpeed's
        # reduction (the sum over ranks divided by the data-parallel size) gives the whole batch's
        # gradient. ZeRO-3 with SP is the exception in DeepSpeed 0.19.8: its reduce-scatter path
        # (``reduce_scatter``, on by default) divides by all ranks, SP ranks included
        # (tests/test_sequence_parallel.py checks both stages against one rank).
        self._grad_scale = world_size if self._sp is not None and t.zero_stage == 3 else self.dp_size
        if world_size == 1 and t.zero_stage == 0:
            # An all-reduce over one rank changes nothing, but DeepSpeed's fallback still flattens
            # every gradient into buckets and copies them back (benchmarks/train_profile.py).
            self.engine.enable_backward_allreduce = False
        if self._lora:
            _save_trainable_only(self.engine)
        self.device = torch.device(self.engine.device)
        if self.device.type != device.type:
            raise RuntimeError(
                f"DeepSpeed placed trainer rank {rank} on {self.device}, but trainer.resources.num_gpus="
                f"{t.resources.num_gpus:g} asks for {device.type}: DeepSpeed's accelerator was chosen "
                "earlier in this process (another trainer on another device, or DS_ACCELERATOR)"
            )
        self._version = 0
        self._sync_store: Any = None  # rank 0: the weight-sync group's rendezvous (mopd/dist/weight_sync.py)
        self._sync_link: WeightLink | None = None

    # ------------------------------------------------------------------ versions
    def get_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ training
    def _shard(self, batch: TrainBatch | RankBatch) -> RankBatch:
        """This rank's shard: as given (the pool's way), or cut here from a whole batch (every rank
        of an SP group gets the shard of its data-parallel rank)."""
        if isinstance(batch, RankBatch):
            return batch
        t = self.cfg.trainer
        shards = shard_batch(batch, self.dp_size, t.micro_batch_size, t.max_tokens_per_micro_batch, t.pack_sequences)
        return shards[self.dp_rank]

    def train_step(self, batch: TrainBatch | RankBatch) -> Metrics:
        """One optimizer step on the whole batch, of which this rank gets (or takes) its shard.

        Returns metrics reduced over ranks: token-weighted means, summed token counts, and the loss of
        the whole batch (the objective's mean over sequences, not a mean of per-rank losses).
        """
        shard = self._shard(batch)
        plan = plan_micro_batches(shard, self.cfg.trainer.micro_batch_size)
        sums = _StepSums.for_shard(shard)
        lr = self.engine.get_lr()[0]  # the rate this update uses; the scheduler moves on in step()
        nonfinite, skip = False, False
        self.engine.train()
        for j, micro in enumerate(plan):
            loss, finite = self._micro_batch_loss(shard, micro, sums)
            nonfinite |= not finite
            last = j == len(plan) - 1
            if last:
                # Decided before the boundary backward, on every rank alike.
                skip = self._any_rank(nonfinite)
                if skip:
                    # A NaN gradient makes DeepSpeed's overflow check drop the update and the
                    # accumulated gradients on every rank, leaving weights and optimizer state as
                    # they were (ZeRO 0 without bf16 has no such check: see _optimizer_step).
                    loss = loss * float("nan")
            # The worker, not DeepSpeed's counter, marks the boundary: the micro-batch count varies.
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=False)
        grad_norm, applied = self._optimizer_step(skip)
        if applied:
            self._version += 1
        return self._reduce_metrics(sums, grad_norm=grad_norm, lr=lr, skipped=not applied)

    def sft_step(self, batch: TrainBatch | RankBatch) -> Metrics:
        """One optimizer step of supervised fine-tuning on the response tokens of ``batch`` (the
        reference completions, EOS included): their mean negative log-likelihood, a token mean over
        the whole batch. Used to build the quickstart's SFT student and its domain teachers.
        ``sft/loss`` is the whole batch's loss (the ranks' shares summed)."""
        shard = self._shard(batch)
        plan = plan_micro_batches(shard, self.cfg.trainer.micro_batch_size)
        n_tokens = max(shard.batch_tokens, 1)
        lr = self.engine.get_lr()[0]
        nll_sum = 0.0
        self.engine.train()
        for j, micro in enumerate(plan):
            rows = _take_rows(shard, micro.rows).to(self.device)
            logp, _, aux = self._scores(rows.input_ids, rows.attention_mask, rows.routes)
            nll = -(logp * rows.response_mask).sum() / n_tokens
            if aux is not None:
                nll = nll + self.cfg.trainer.aux_loss_coef * aux * (len(micro.rows) / shard.batch_rows)
            if micro.dummy:
                nll = nll * 0.0
            nll_sum += float(nll.detach())
            self.engine.set_gradient_accumulation_boundary(j == len(plan) - 1)
            self.engine.backward(nll * self._grad_scale, scale_wrt_gas=False)
        nll_sum = self._sum_ranks(nll_sum)  # also makes the skip decision below the same on every rank
        grad_norm, applied = self._optimizer_step(not math.isfinite(nll_sum))
        if applied:
            self._version += 1
        return {"sft/loss": nll_sum, "sft/grad_norm": grad_norm, "sft/lr": float(lr), "sft/skipped": float(not applied)}

    def _micro_batch_loss(self, shard: RankBatch, micro: MicroBatch, sums: _StepSums) -> tuple[torch.Tensor, bool]:
        """Forward one micro-batch; return the scalar to back-propagate and whether it is finite.

        The scalar is scaled so that the gradients summed over micro-batches and averaged over ranks
        (DeepSpeed's data-parallel mean) are those of the whole-batch objective. Adds the micro-
        batch's metric sums to ``sums``. With sequence parallelism every sum and the loss are this
        rank's share of the tokens (the SP ranks' shares add up; DeepSpeed sums over SP ranks).
        """
        rows = _take_rows(shard, micro.rows).to(self.device)
        obj = get_objective(self.cfg.objective.kind)
        topk_ids = rows.topk_ids if _wants_topk(obj, self.cfg.objective, rows) else None
        logp_train, student_topk, aux = self._scores(rows.input_ids, rows.attention_mask, rows.routes, topk_ids)
        owned = None if self._sp is None else self._sp.owned(rows.attention_mask)
        if not micro.dummy and self._sp is not None:
            positions, real = self._sp.counts(rows.attention_mask)
            sums.real += real
            sums.positions += positions
        elif not micro.dummy:
            real = int(rows.attention_mask.sum())
            sums.real += real
            sums.positions += real if self.cfg.trainer.pack_sequences else rows.input_ids.numel()
        if micro.dummy:
            # Same modules, same collectives, zero gradient.
            dummy = logp_train.mean() * 0.0
            return (dummy if aux is None else dummy + aux * 0.0), True
        objective = logp_train.new_zeros((), dtype=torch.float32)
        for d_i in range(len(sums.domains)):
            idx = [i for i, d in enumerate(rows.domains) if d == d_i]
            if idx:
                loss_d, stat_d = domain_loss(obj, self.cfg.objective, rows, idx, logp_train, student_topk, owned)
                # Undo the objective's per-domain mean over sequences: weight by sequence count.
                objective = objective + loss_d * _num_sequences(rows.response_mask[idx])
                sums.stats[d_i] += stat_d
        objective = objective / max(sums.sequences, 1)
        sums.loss += float(objective.detach())
        total = objective
        if aux is not None:
            aux_share = aux * (len(micro.rows) / sums.rows)
            sums.aux += float(aux_share.detach())
            total = total + self.cfg.trainer.aux_loss_coef * aux_share
        finite = bool(torch.isfinite(total.detach()))
        return total * self._grad_scale, finite

    def _scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        routes: torch.Tensor | None = None,
        topk_ids: torch.Tensor | None = None,
        *,
        balance: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The student's forward: log-probs (b, t) f32 of ``input_ids``, its log-probs (b, t, K) f32
        at ``topk_ids`` (b, t, K) (None without), and the balance loss (``_forward``; ``balance``
        False: none asked for). Chunked from the last hidden states (``trainer.logprob_chunk_size``,
        mopd/logprobs.py), or from the full logits with chunk size 0. With
        ``trainer.pack_sequences`` the rows' real tokens go through the model as one row
        (``PackedRows``) and the results come back in the rows' layout. With sequence parallelism
        (``_sp_scores``) only this rank's tokens are scored, the others' hold 0."""
        if self._sp is not None:
            return self._sp_scores(self._sp, input_ids, attention_mask, routes, topk_ids, balance=balance)
        if self.cfg.trainer.pack_sequences:
            packed = PackedRows(attention_mask)
            pack = lambda x: None if x is None else packed.pack(x)  # noqa: E731
            logp, at_topk, aux = self._unpacked_scores(
                packed.pack(input_ids), None, pack(routes), pack(topk_ids), balance=balance,
                position_ids=packed.position_ids,
            )  # fmt: skip
            return packed.unpack(logp), None if at_topk is None else packed.unpack(at_topk), aux
        return self._unpacked_scores(input_ids, attention_mask, routes, topk_ids, balance=balance)

    def _unpacked_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        routes: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        *,
        balance: bool,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``_scores`` of rows as given: padded (``attention_mask``) or packed (``position_ids``)."""
        chunk = self.cfg.trainer.logprob_chunk_size
        if chunk == 0:
            logits, aux = self._forward(input_ids, attention_mask, routes, balance=balance, position_ids=position_ids)
            at_topk = None if topk_ids is None else logprobs_at(logits, topk_ids)
            return token_logprobs(logits, input_ids), at_topk, aux
        targets = next_token_targets(input_ids, topk_ids)
        fn = lambda x, w: chunked_logprobs(x, targets, chunk=chunk, weight=w)  # noqa: E731
        with head_scoring(self.engine.module, fn) as finish:
            out, aux = self._forward(input_ids, attention_mask, routes, balance=balance, position_ids=position_ids)
        scores = align_to_tokens(finish(out))
        return scores[..., 0], None if topk_ids is None else scores[..., 1:], aux

    def _sp_scores(
        self,
        sp: SequenceParallel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        routes: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        *,
        balance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``_scores`` of this rank's slice of the rows (trainers/sequence_parallel.py): the same
        (b, t) / (b, t, K) layout, the log-probs of the tokens this rank scores (``sp.owned``) in
        place and 0 elsewhere; the balance loss is this rank's share of the rows'."""
        b = input_ids.shape[0]
        sl = sp.shard(
            input_ids, attention_mask, aligned={} if routes is None else {"routes": routes},
            shifted={} if topk_ids is None else {"topk": topk_ids}, aligned_fill=NOT_RECORDED,
        )  # fmt: skip
        targets = sl.targets[..., None]
        if topk_ids is not None:
            targets = torch.cat([targets, sl.shifted["topk"]], -1)
        chunk = self.cfg.trainer.logprob_chunk_size
        fn = lambda x, w: chunked_logprobs(x, targets, chunk=chunk, weight=w)  # noqa: E731
        want_aux = balance and self._moe and self.cfg.trainer.aux_loss_coef > 0
        module = self.engine.module
        with ExitStack() as stack:
            finish = stack.enter_context(head_scoring(module, fn))
            stack.enter_context(replay_routes(module, sl.aligned.get("routes")))
            captured = stack.enter_context(self._routes.capture()) if want_aux else []
            kwargs = {"output_router_logits": True} if want_aux else {}
            out = forward_logits(self.engine, sl.input_ids, None, sl.position_ids, **kwargs)
        scores = sl.to_rows(finish(out.logits))[:b]
        aux = None
        if want_aux and getattr(out, "aux_loss", None) is not None:
            aux = sp.balance("switch", out.router_logits, sl, top_k=module.config.num_experts_per_tok)
        elif want_aux and captured:
            aux = sp.balance("sigmoid", captured, sl)
        return scores[..., 0], None if topk_ids is None else scores[..., 1:], aux

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        routes: torch.Tensor | None = None,
        *,
        balance: bool = True,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's ``logits`` output (b, t, V; under ``head_scoring`` what the head returns
        instead) and the MoE load-balancing loss (scalar, or None for dense students or
        ``balance`` False).

        ``routes`` (b, t, L, k): the rollout's expert choices, replayed (routing replay); the
        balance loss then counts the replayed experts. Packed rows (``PackedRows``) come with
        ``position_ids`` and no ``attention_mask``: every token is real."""
        if not (balance and self._moe and self.cfg.trainer.aux_loss_coef > 0):
            with replay_routes(self.engine.module, routes):
                return forward_logits(self.engine, input_ids, attention_mask, position_ids).logits, None
        with replay_routes(self.engine.module, routes), self._routes.capture() as captured:
            out = forward_logits(self.engine, input_ids, attention_mask, position_ids, output_router_logits=True)
        if getattr(out, "aux_loss", None) is not None:
            # Softmax routers (Mixtral, Qwen3-MoE): transformers computes the Switch-style loss
            # itself, with the attention mask (none when packed: every token counts).
            return out.logits, out.aux_loss.float()
        if captured:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            return out.logits, sigmoid_balance_loss(captured, mask)
        return out.logits, None

    def _optimizer_step(self, skip: bool) -> tuple[float, bool]:
        """Apply (or drop) the accumulated update. Returns (pre-clip gradient norm, applied)."""
        engine = self.engine
        if not hasattr(engine.optimizer, "overflow"):
            # Plain torch optimizer (ZeRO 0, fp32): DeepSpeed checks nothing, so check here. The
            # gradients are already all-reduced, hence equal on all ranks: no collective needed.
            norm = _grad_norm(engine.module)
            if skip or not math.isfinite(norm):
                engine.zero_grad()
                return norm, False
            engine.step()
            return norm, True
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(engine.was_step_applied())

    def _sum_ranks(self, x: float) -> float:
        if self.world_size == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _reduce_metrics(self, sums: _StepSums, *, grad_norm: float, lr: float, skipped: bool) -> Metrics:
        """Sum the per-rank sums over ranks (one all-reduce), then turn them into means."""
        head = [sums.loss, sums.aux, sums.positions, sums.real]
        flat = torch.cat([torch.tensor(head, dtype=torch.float64), sums.stats.reshape(-1)])
        if self.world_size > 1:
            flat = flat.to(self.device)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(flat)
            flat = flat.cpu()
        domains = sums.domains
        stats = flat[len(head) :].reshape(len(domains), len(_STATS))
        total = stats.sum(0)
        metrics = {
            "train/loss": float(flat[0]),
            "train/aux_loss": float(flat[1]),
            "train/grad_norm": grad_norm,
            "train/lr": float(lr),
            "train/skipped": 1.0 if skipped else 0.0,
            "train/tokens": float(total[0]),
            # Share of the positions the forward passes computed that were padding: what
            # trainer.max_tokens_per_micro_batch saves when response lengths are spread.
            "train/padding_frac": 1.0 - float(flat[3]) / max(float(flat[2]), 1.0),
            **_token_means("train", total),
        }
        for d_i, domain in enumerate(domains):
            metrics[f"teacher/{domain}/tokens"] = float(stats[d_i, 0])
            means = _token_means(f"teacher/{domain}", stats[d_i])
            metrics[f"teacher/{domain}/reverse_kl"] = means[f"teacher/{domain}/reverse_kl"]
            metrics[f"teacher/{domain}/is_masked_frac"] = means[f"teacher/{domain}/is_masked_frac"]
        return metrics

    # ------------------------------------------------------------------ evaluation / export
    @torch.no_grad()
    def logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, routed_experts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced (B, T) f32 log-probs of every token (column 0 is 0), eval mode, on CPU.
        ``routed_experts`` (B, T, L, k): MoE routes to replay. Under ZeRO-3 or with sequence
        parallelism all ranks must call it with the same inputs (then padding and each row's first
        token hold 0)."""
        was_training = self.engine.module.training
        self.engine.eval()
        try:
            mbs = self.cfg.trainer.micro_batch_size
            out = []
            for i in range(0, input_ids.shape[0], mbs):
                ids, am = input_ids[i : i + mbs].to(self.device), attention_mask[i : i + mbs].to(self.device)
                routes = None if routed_experts is None else routed_experts[i : i + mbs].to(self.device)
                logp = self._scores(ids, am, routes, balance=False)[0]
                out.append((logp if self._sp is None else self._sp.sum(logp)).cpu())
        finally:
            self.engine.train(was_training)
        return torch.cat(out).float().cpu()

    def state_dict(self, adapter: bool = False) -> dict[str, torch.Tensor] | None:
        """The full student state dict (HF keys) on CPU in the student's dtype, on rank 0; None on
        other ranks. A collective under ZeRO-3 (parameters are gathered layer by layer).
        ``adapter``: a LoRA student's adapter alone, under the names PEFT saves it with."""
        zero3 = self.cfg.trainer.zero_stage == 3
        sd: dict[str, torch.Tensor] | None
        if adapter or self._lora:  # merged weights (or the adapter), one at a time (gathered under ZeRO-3)
            if self.rank != 0 and not zero3:
                return None  # ZeRO 0-2: no gather to take part in
            whole = self._weights_one_by_one(self._live_state(adapter))
            sd = {name: t for name, t in whole if self.rank == 0}  # other ranks: every gather, nothing kept
        elif zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0 or sd is None:
            return None
        dtype = DTYPES[self.cfg.student.dtype]
        # clone: a snapshot, not views of parameters that the next step will change.
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).clone() for k, v in sd.items()}

    # ------------------------------------------------------------------ weight sync (direct)
    def host_weight_sync(self, host: str, port: int) -> None:
        """Rank 0: serve the weight-sync group's store on ``host:port`` (once per run)."""
        if self.rank == 0 and self._sync_store is None:
            self._sync_store = host_store(host, port)

    def join_weight_sync(self, host: str, port: int, generation: int, world: int, backend: str) -> None:
        """Rank 0: join the weight-sync group (rank 0 of ``world``) of ``generation``; blocks until
        every rollout replica has joined too."""
        if self.rank != 0:
            return
        self._sync_link = None  # the previous generation's group
        self._sync_link = WeightLink(host, port, generation, 0, world, backend, store=self._sync_store)

    def send_weights(self, version: int, bucket_bytes: int, adapter: bool = False) -> int:
        """Broadcast the student's weights (state-dict names, student dtype) to the rollout as policy
        ``version`` (``adapter``: a LoRA student's adapter alone, as ``state_dict(adapter=True)``);
        returns the bytes sent (0 on ranks > 0). Call it on every rank: under ZeRO-3 each parameter
        is gathered in turn (a collective), and only one is held whole at a time."""
        if self.rank != 0:
            if self.cfg.trainer.zero_stage == 3:
                for _ in self._weights_one_by_one(self._live_state(adapter)):  # take part in every gather
                    pass
            return 0  # ZeRO 0-2: rank 0 holds every weight whole, nothing to gather
        if self._sync_link is None:
            raise RuntimeError("send_weights before join_weight_sync: trainer rank 0 is in no weight-sync group")
        live = self._live_state(adapter)
        tensors = self._weights_one_by_one(live)
        device = self._sync_link.device
        plan = plan_sync(self._weight_specs(live), version, bucket_bytes)
        try:
            return self._sync_link.send(plan, ((k, v.to(device)) for k, v in tensors))
        except BaseException:
            self._sync_link = None  # a broken group (a replica died?): closing it frees the others' waits
            raise

    def _sync_dtype(self, t: torch.Tensor) -> torch.dtype:
        return DTYPES[self.cfg.student.dtype] if t.is_floating_point() else t.dtype

    def _live_state(self, adapter: bool = False) -> dict[str, torch.Tensor | Merged]:
        """What the rollout gets, by name: the module's own tensors (ZeRO-3: its partitions), or, for
        a LoRA student, the base's tensors and the ``Merged`` weights the adapter changes (computed
        one at a time by ``_weights_one_by_one``), or with ``adapter`` the adapter's parameters."""
        if adapter and not self._lora:
            raise ValueError("the rollout asked for the adapter alone, but the student has no LoRA adapter")
        if adapter:
            return dict(adapter_parameters(self.engine.module))
        return merge_sources(self.engine.module) if self._lora else self.engine.module.state_dict(keep_vars=True)

    def _weight_specs(self, live: dict[str, torch.Tensor | Merged]) -> list[TensorSpec]:
        """Name, full shape (``ds_shape`` of a ZeRO-3 partition) and sent dtype of every entry of
        ``live`` (``_live_state``)."""
        specs = []
        for k, v in live.items():
            t = v.base if isinstance(v, Merged) else v
            specs.append(TensorSpec(k, tuple(getattr(t, "ds_shape", t.shape)), self._sync_dtype(t)))
        return specs

    def _weights_one_by_one(self, live: dict[str, torch.Tensor | Merged]):
        """(name, tensor) of ``live`` (``_live_state``) in order, each whole and in the student
        dtype (a LoRA student's adapted weights merged); ZeRO-3 partitions are gathered one weight
        (with its adapter) at a time on every rank."""
        import deepspeed

        for name, v in live.items():
            base = v.base if isinstance(v, Merged) else v
            parts = [p for p in (v.params() if isinstance(v, Merged) else [v]) if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(parts, modifier_rank=None) if parts else nullcontext():
                if isinstance(v, Merged):
                    t = v.value().to(self._sync_dtype(base))  # a new tensor, gathered or not
                else:  # a gathered partition's data is freed when the gather ends: copy it
                    t = v.detach().to(self._sync_dtype(base), copy=bool(parts))
            yield name, t

    def save_hf(self, out_dir: str) -> None:
        """Write a Hugging Face directory (safetensors, config, generation config, tokenizer) that
        ``AutoModelForCausalLM.from_pretrained`` loads (a LoRA student's merged model, and its
        adapter alone under ``ADAPTER_DIR`` for ``mopd export --adapter``). Collective; rank 0 writes."""
        sd = self.state_dict()
        adapter = self.state_dict(adapter=True) if self._lora else None
        if self.rank != 0 or sd is None:
            return
        _write_hf_dir(hf_model(self.engine.module), sd, out_dir, self.cfg.student)
        load_tokenizer(self.cfg.student).save_pretrained(out_dir)
        if adapter is not None:
            self.engine.module.save_pretrained(os.path.join(out_dir, ADAPTER_DIR), state_dict=adapter)

    def save_checkpoint(self, dir: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR scheduler) under ``dir``; collective."""
        state = {_CLIENT_KEY: {"client_state": dict(client_state), "policy_version": self._version}}
        # A LoRA student's frozen base comes from its path or seeded config again: only the adapter is saved.
        self.engine.save_checkpoint(dir, tag=_CKPT_TAG, client_state=state, exclude_frozen_parameters=self._lora)

    def load_checkpoint(self, dir: str) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote; returns its ``client_state``. Collective.
        Every file is read with ``weights_only=True`` (see ``safe_checkpoint_load``)."""
        ckpt_engine = self.engine.checkpoint_engine
        ckpt_engine.load = safe_checkpoint_load  # an instance attribute: DeepSpeed's own is a pickle load
        path, state = self.engine.load_checkpoint(dir, tag=_CKPT_TAG, load_module_strict=not self._lora)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag '{_CKPT_TAG}' under {dir}")
        ours = (state or {}).get(_CLIENT_KEY, {})
        self._version = int(ours.get("policy_version", self._version))
        return dict(ours.get("client_state", {}))


def _save_trainable_only(engine: Any) -> None:
    """Make ``engine``'s checkpoints hold only its trainable tensors (a LoRA student's adapter).
    DeepSpeed's ``exclude_frozen_parameters`` drops frozen parameters by their first name and so
    keeps a tied one's second (``lm_head.weight`` of tied embeddings: 113 MB of SmolLM2's frozen
    base in every checkpoint)."""
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    full = engine.module_state_dict

    def module_state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = full(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for name in [n for n in sd if n not in trainable]:
                del sd[name]
        return sd

    engine.module_state_dict = module_state_dict


def _deepspeed_checkpoint_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its ZeRO optimizer states."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` of a DeepSpeed checkpoint file with ``weights_only=True``: tensors, plain
    containers and the few DeepSpeed classes above; anything else in the pickle (code a tampered
    checkpoint would run) is refused with ``UnpicklingError`` instead of executed. DeepSpeed's
    own checkpoint engine loads with ``weights_only=False``."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(b, t, K) log-probs of ``ids`` (b, t, K) under ``logits`` (b, t, V), aligned like
    ``token_logprobs``: position t holds the distribution of token t, from logits t - 1; column 0 is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:])
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def _wants_topk(obj: Objective, o: ObjectiveConfig, rows: _Rows) -> bool:
    """Whether the objective's loss needs the student's log-probs at the teacher's top-k ids;
    ValueError if it does and the rows have none."""
    if obj.teacher_topk(o) == 0:
        return False
    if rows.topk_ids is None or rows.topk_logprobs is None:
        raise ValueError(f"objective.kind is {obj.kind!r} but the TrainBatch has no teacher_topk_ids/logprobs")
    return True


def student_topk_logprobs(obj: Objective, o: ObjectiveConfig, logits: torch.Tensor, rows: _Rows) -> torch.Tensor | None:
    """(b, t, K) student log-probs at the teacher's top-k ids (``logprobs_at``) from full logits
    (the ``trainer.logprob_chunk_size: 0`` path), or None when the objective asks the teachers for
    no top-k."""
    if not _wants_topk(obj, o, rows):
        return None
    assert rows.topk_ids is not None  # _wants_topk
    return logprobs_at(logits, rows.topk_ids)


def domain_loss(
    obj: Objective,
    o: ObjectiveConfig,
    rows: _Rows,
    idx: list[int],
    logp_train: torch.Tensor,
    student_topk: torch.Tensor | None,
    owned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``obj``'s loss on the rows ``idx`` of one domain (a mean over their sequences), and their
    metric sums (5,) f64 in ``_STATS`` order. ``logp_train`` (b, t) and ``student_topk`` (b, t, K)
    cover all of ``rows``. ``owned`` (b, t) bool: with sequence parallelism, the tokens this rank
    scored; the loss and the sums are then their share (over each whole row's response length)."""
    sub = rows.subset(idx)
    t = torch.as_tensor(idx, dtype=torch.long, device=logp_train.device)
    lp = logp_train[t]
    mask, lengths = sub.response_mask, None
    if owned is not None:
        mask, lengths = sub.response_mask & owned[t], sub.response_mask.sum(-1)
    x = LossInputs(
        lp, sub.rollout, sub.teacher, mask, sub.adv_orm,
        None if student_topk is None else student_topk[t], sub.topk_logprobs, lengths,
    )  # fmt: skip
    loss, m = obj.loss(x, o)
    n = m["num_tokens"]
    abs_diff = float(((lp.detach() - sub.rollout).abs() * mask).sum())
    adv_mean = m.get("adv_mean", 0.0)  # 0 for a loss without an advantage (the top-k form)
    stat = torch.tensor([n, m["reverse_kl"] * n, m["is_masked_frac"] * n, adv_mean * n, abs_diff], dtype=torch.float64)
    return loss, stat


def _token_means(prefix: str, stat: torch.Tensor) -> Metrics:
    """Token-weighted means from one row of summed stats (``_STATS`` order)."""
    n = float(stat[0])
    mean = (lambda x: float(x) / n) if n > 0 else (lambda x: 0.0)
    return {
        f"{prefix}/reverse_kl": mean(stat[1]),
        f"{prefix}/is_masked_frac": mean(stat[2]),
        f"{prefix}/adv_mean": mean(stat[3]),
        f"{prefix}/train_rollout_abs_diff": mean(stat[4]),
    }


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _write_hf_dir(module, state_dict: dict[str, torch.Tensor], out_dir: str, spec: ModelConfig) -> None:
    """Save ``state_dict`` with ``module``'s config and generation config as a HF model directory.

    The model is rebuilt on the meta device and given the tensors: under ZeRO-3 the live module's
    parameters are empty partitions, so it cannot be saved directly. Tied weights (an ``lm_head``
    that is the input embedding, ``tie_word_embeddings``) are tied again after the tensors are
    assigned, so the directory stores them once, as the input checkpoint did.
    """
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(module.config)
    config.dtype = spec.dtype
    with torch.device("meta"):  # no memory, no random init: every tensor comes from state_dict
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    _assign_tied(model, state_dict)
    if getattr(module, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(module.generation_config)
    model.save_pretrained(out_dir)


def _assign_tied(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Give ``model`` (on the meta device) the tensors of ``state_dict``, then tie what its config
    ties. ``load_state_dict(assign=True)`` alone would give a tied target (``lm_head.weight``) a
    parameter of its own: an export of 273 tensors from a checkpoint of 272. A state dict may hold
    the target (a copy of its source) or not (ZeRO-3's consolidated state dict names a shared
    parameter once); either way the source's tensor is the one kept."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}
    sources = {k: v for k, v in state_dict.items() if k not in tied}
    missing, unexpected = model.load_state_dict(sources, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"the student's state dict does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
