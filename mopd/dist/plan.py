"""A resource plan of a recipe: the memory every actor needs and the devices it asks for, computed
from the model configs alone (no weights are loaded), checked against the devices before anything
starts.

    mopd plan recipes/qwen3_moe_30b_a3b_1node.yaml --gpus 8          # one node of 8 GPUs
    mopd plan RECIPE --nodes 4 --gpus 8 placement.gpu_memory_gb=141  # H200s

Parameter counts come from the model built on PyTorch's ``meta`` device (shapes, no storage);
MoE experts count in full for the total and ``num_experts_per_tok / num_experts`` of them for the
active count. All byte figures are per device of the actor (a trainer rank, a rollout or teacher
replica). ``e`` below is the byte size of the dtype the actor computes in.

**Trainer rank** (``N`` parameters, world size ``W``, ZeRO stage ``z``), DeepSpeed with AdamW:

- weights: ``e N``, divided by ``W`` under ZeRO-3 (``e`` = 2 with ``trainer.bf16``, else 4);
- gradients: ``e N``, divided by ``W`` under ZeRO-2/3;
- optimizer: Adam's two fp32 moments and the fp32 master copy of the weights that DeepSpeed keeps
  whenever it partitions the optimizer (ZeRO >= 1, or bf16 at any stage): ``12 N / W``; plain
  fp32 ZeRO-0 keeps the moments only (``8 N``);
- buffers: the fp32 gradient of the master partition (``4 N / W``, when partitioned), AdamW's
  foreach temporary (``4 N / W``; ``4 N`` unpartitioned) and, under ZeRO >= 1, DeepSpeed's reduce
  bucket (``e min(N, 5e8)``). Measured on CPU (ZeRO-2, fp32, one rank, 5.9M and 22M parameters):
  the whole estimate was 15-19% above the peak resident memory of a step, 23% with gradient
  checkpointing (tests/test_plan.py; the CPU's AdamW runs per tensor, without the foreach
  temporary). Not yet checked on GPUs (scripts/plan_gpu_check.py).
- activations of one micro-batch of ``P`` positions (``trainer.micro_batch_size`` rows of
  ``T = data.max_prompt_len + rollout.max_new_tokens`` tokens; with a token budget
  ``trainer.max_tokens_per_micro_batch`` > 0, rows padded to the micro-batch's longest row up to
  the budget, a longer row alone: ``P = max(budget, T)``), kept for the backward pass without
  recomputation (Korthikanti et al. 2022 style, counted tensor by tensor), per token and layer, in
  ``e`` bytes: ``4 h`` (the two residual inputs and norm outputs) + ``2 (a d + g d) + g dv``
  (q and k before and after RoPE, v) + ``2 a dv`` (attention output, o_proj input) + ``a (d + dv)``
  when key/value heads are repeated to ``a`` heads (``g < a``) + for eager attention ``2 a T``
  (scores and probabilities; sdpa/flash keep none) + the MLP: ``4 I`` for a dense layer, ``k (4 I_e
  + 3 h)`` for a MoE layer (each token's ``k`` expert inputs, gate/up/act/product, output and
  weighted output) plus ``2`` per expert (router logits and probabilities). With
  ``trainer.gradient_checkpointing`` a layer keeps only its input (``h`` per token) and one layer's
  activations are alive at a time. Assumptions: no sequence packing, dropout off.
- the loss's logits. Chunked (``trainer.logprob_chunk_size`` ``c`` > 0, mopd/logprobs.py): the head
  runs ``min(c, P)`` positions at a time and the backward recomputes them, so only one chunk's
  logits are alive: ``min(c, P) V`` times 4 (fp32) + ``e`` in half precision (the head GEMM's output
  or the gradient cast for it), whatever ``T``: 0.93 GB at ``c`` = 1024, V = 151,936 in bf16
  (docs/benchmarks.md measured 1.07 GB on a CPU, which adds fp32 copies of the head's weight and
  gradient). Its per-position tensors (targets and log-probs at the ``1 + K`` ids, ~16 (1 + K)
  bytes) are left out: 0.3% of Qwen3-30B-A3B's checkpointed activations at K = 64. A model whose
  head does more than the projection (Gemma's soft-capping) keeps its full logits even then; the
  plan does not know.
  Full logits (``c`` = 0): ``P V`` times ``e`` (the logits) + 12 (the fp32 log-softmax output, its
  gradient and the gradient scattered back by the gather, alive together during the backward) +
  what the objective keeps beyond that (``Objective.extra_logit_bytes``: 8 for
  ``objective.kind: topk``, a second log-softmax).
- With ``trainer.offload_optimizer`` the optimizer and its fp32 buffers are in host memory (shown
  in the note, not counted on the GPU).

**Teacher replica**: weights (``e N``, its dtype) and, for ``hf``, the forward working set of one
scoring pass of ``P`` positions (``teachers.<d>.batch_size`` rows of ``T`` tokens, or with
``teachers.<d>.max_tokens_per_batch`` > 0 ``P = max(budget, T)`` as for the trainer): one layer's
transient tensors and the logits: with ``teachers.<d>.logprob_chunk_size`` ``c`` > 0 one chunk's,
``min(c, P) V (4 + e)`` (fp32 and the head's half-precision output), else the fp32 log-softmax of
them all (``P V (e + 8)``); for ``vllm``, a KV cache of at least one sequence of the model's maximum
length (vLLM refuses to start otherwise) within vLLM's default ``gpu_memory_utilization`` of 0.9.

**vLLM engines** shard over the whole GPUs their actor holds (tensor parallelism: the weights
``tp`` ways, the KV cache at most ``num_key_value_heads`` ways); figures are then per GPU.

**Rollout replica** (``vllm``): weights plus a KV cache, per token and layer ``(g d + g dv) e``
(sliding-window layers hold at most their window, MiMo-V2-Flash's hold ``2 g`` heads); it needs one
``rollout.max_model_len`` sequence at least and ``prompts_per_step * n / replicas`` sequences of
``T`` tokens to run the step's batch at once; the plan asks for both (a smaller cache would only
make vLLM queue requests and run the step in waves). Weights plus the KV cache must fit in
``rollout.gpu_memory_utilization`` of a device. ``hf``: weights plus generation's KV cache (of
``T`` tokens for every sequence) and the last position's logits.

**Devices**: a GPU holds ``placement.gpu_memory_gb`` (80 unless set; ``--gpu-memory-gb``) less a
runtime reserve of ``RUNTIME_RESERVE_GB`` (CUDA context, NCCL buffers, allocator fragmentation) for
actors that are not vLLM engines (vLLM's budget is its own). With ``placement.layout: colocated``
the rollout replicas share the trainer ranks' GPUs: the trainer's weights, gradients and optimizer
stay on the device while the rollout's engine (its ``gpu_memory_utilization`` share) runs, and the
rollout frees its memory while the trainer steps. The cluster's GPUs come from Ray (``--ray-address``
or ``RAY_ADDRESS``) or from ``--gpus N`` (per node) and ``--nodes M``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.config import ConfigError, ModelConfig, MOPDConfig, teacher_groups
from mopd.dist.vllm_compat import tensor_parallel_size
from mopd.objective import get_objective

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_RESERVE_GB = 2.0
VLLM_DEFAULT_UTILIZATION = 0.9  # teachers' engines take vLLM's default


# --------------------------------------------------------------------------- model shapes


@dataclass
class ModelShape:
    """What the plan needs of a model, read from its config. ``kv_heads`` / ``windows`` are per
    layer (window None: full attention)."""

    model_type: str
    total_params: int
    active_params: int
    vocab_size: int
    hidden: int
    heads: int
    head_dim: int
    v_head_dim: int
    kv_heads: list[int]
    windows: list[int | None]
    dense_intermediate: int
    moe_intermediate: int
    moe_layers: int
    num_experts: int
    experts_per_token: int
    max_position: int
    eager: bool

    @property
    def layers(self) -> int:
        return len(self.kv_heads)

    def kv_bytes(self, tokens: int, dtype_bytes: int) -> int:
        """Bytes of the KV cache of one sequence of ``tokens`` tokens."""
        per_layer = [
            g * (self.head_dim + self.v_head_dim) * (tokens if w is None else min(w, tokens))
            for g, w in zip(self.kv_heads, self.windows, strict=True)
        ]
        return sum(per_layer) * dtype_bytes


def count_params(config: Any, trust_remote_code: bool = False) -> tuple[int, int]:
    """(total, routed-expert) parameter counts of the model, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:  # routed experts (shared experts are named shared_expert(s))
            expert += p.numel()
    return total, expert


def lora_params(spec: Any) -> int:
    """Trainable parameters of ``spec.lora``'s adapter on the student (PEFT on the meta device)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from mopd.models import model_config, peft_lora_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(spec), trust_remote_code=spec.trust_remote_code)
        model = get_peft_model(model, peft_lora_config(spec.lora))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_shape(spec: ModelConfig) -> ModelShape:
    from mopd.models import model_config  # torch: `mopd plan` pays for it, importing this module does not

    config = model_config(spec)
    text = getattr(config, "text_config", None) or config
    total, expert = count_params(config, spec.trust_remote_code)
    n_exp = int(_first(text, ("num_experts", "n_routed_experts", "num_local_experts"), 0) or 0)
    k = int(getattr(text, "num_experts_per_tok", 0) or 0)
    active = total - expert + (expert * k // n_exp if n_exp else 0)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    g = int(getattr(text, "num_key_value_heads", None) or heads)
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(text, "sliding_window", None)
    sliding = [t == "sliding_attention" and window is not None for t in layer_types]
    # MiMo-V2-Flash's sliding-window layers have twice the key/value heads (transformers' modeling).
    swa_factor = 2 if text.model_type == "mimo_v2_flash" else 1
    mlp_types = getattr(text, "mlp_layer_types", None)
    moe_layers = sum(t == "sparse" for t in mlp_types) if mlp_types else (layers if n_exp else 0)
    impl = spec.attn_implementation or ("eager" if text.model_type == "mimo_v2_flash" else "sdpa")
    return ModelShape(
        model_type=text.model_type,
        total_params=total,
        active_params=active,
        vocab_size=int(text.vocab_size),
        hidden=int(text.hidden_size),
        heads=heads,
        head_dim=head_dim,
        v_head_dim=int(getattr(text, "v_head_dim", None) or head_dim),
        kv_heads=[g * swa_factor if s else g for s in sliding],
        windows=[int(window) if s and window is not None else None for s in sliding],
        dense_intermediate=int(getattr(text, "intermediate_size", 0) or 0),
        moe_intermediate=int(_first(text, ("moe_intermediate_size", "intermediate_size"), 0) or 0),
        moe_layers=moe_layers,
        num_experts=n_exp,
        experts_per_token=k,
        max_position=int(getattr(text, "max_position_embeddings", 0) or 0),
        eager=impl == "eager",
    )


def _first(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        if getattr(obj, n, None) is not None:
            return getattr(obj, n)
    return default


# --------------------------------------------------------------------------- memory formulas


DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)


def trainer_states(n: int, world: int, zero: int, bf16: bool, offload: bool = False) -> dict[str, float]:
    """Bytes per rank of weights, gradients, optimizer state and DeepSpeed's buffers on the device
    (see the module docstring); with ``offload`` the optimizer and its fp32 buffers are in host
    memory instead (``host_optimizer``, not on the device)."""
    e = 2 if bf16 else 4
    part = n / world
    partitioned = zero >= 1 or bf16  # DeepSpeed then keeps an fp32 master partition
    out = {
        "weights": e * (part if zero == 3 else n),
        "gradients": e * (part if zero >= 2 else n),
        "optimizer": (12 * part) if partitioned else 8.0 * n,
    }
    # The fp32 gradient of the master partition, AdamW's foreach temporary, the reduce bucket.
    buffers = (4 * part if partitioned else 0.0) + 4 * (part if partitioned else n)
    bucket = e * min(DS_REDUCE_BUCKET, n) if zero >= 1 else 0.0
    if offload:
        return {**out, "optimizer": 0.0, "buffers": bucket, "host_optimizer": out["optimizer"] + buffers}
    out["buffers"] = buffers + bucket
    return out


def layer_activation_elems(s: ModelShape, tokens: int, moe: bool) -> float:
    """Elements one layer keeps for the backward pass, per token (``tokens``: the sequence length)."""
    a, g, d, dv, h = s.heads, max(s.kv_heads), s.head_dim, s.v_head_dim, s.hidden
    attn = 4 * h + 2 * (a * d + g * d) + g * dv + 2 * a * dv
    if g < a:
        attn += a * (d + dv)  # repeat_kv copies
    if s.eager:
        attn += 2 * a * tokens
    if moe:
        k = s.experts_per_token
        mlp = k * (4 * s.moe_intermediate + 3 * h) + s.num_experts * 2  # router logits and probabilities
    else:
        mlp = 4 * s.dense_intermediate
    return attn + mlp


def pass_positions(rows: int, token_budget: int, tokens: int) -> int:
    """Positions one forward pass holds at most: ``rows`` rows of ``tokens`` tokens, or with a token
    budget (> 0) the budget, or one row longer than it (such a row goes alone)."""
    return max(token_budget, tokens) if token_budget > 0 else rows * tokens


def chunk_logit_bytes(e: int) -> int:
    """Bytes per logit of one chunk of mopd/logprobs.py alive at once: fp32 logits and, in half
    precision, the head GEMM's output (forward) or the gradient cast for the head (backward)."""
    return 4 + (e if e < 4 else 0)


def logits_bytes(s: ModelShape, positions: int, e: int, chunk: int, full: int) -> float:
    """Bytes of the logits of a pass over ``positions`` positions: one chunk of
    ``min(chunk, positions)`` with ``chunk`` > 0, else all of them at ``full`` bytes per logit (the
    logits and the fp32 log-softmax tensors alive with them; see the module docstring)."""
    if chunk > 0:
        return float(min(chunk, positions) * s.vocab_size * chunk_logit_bytes(e))
    return float(positions * s.vocab_size * full)


def train_activations(s: ModelShape, positions: int, tokens: int, e: int, checkpointing: bool = False) -> float:
    """Bytes of one micro-batch's activations, ``positions`` positions of rows up to ``tokens``
    long (see the module docstring). With gradient checkpointing: each layer's input, plus one
    layer's activations recomputed."""
    moe = s.moe_layers
    dense_layer, moe_layer = layer_activation_elems(s, tokens, False), layer_activation_elems(s, tokens, True)
    if checkpointing:
        per_token = s.layers * s.hidden + (moe_layer if moe else dense_layer)
    else:
        per_token = (s.layers - moe) * dense_layer + moe * moe_layer
    return float(positions * per_token * e)


def inference_activations(s: ModelShape, positions: int, tokens: int, e: int) -> float:
    """Bytes of the largest layer's transient tensors in a scoring forward over ``positions``
    positions of rows up to ``tokens`` long."""
    return float(layer_activation_elems(s, tokens, s.moe_layers > 0) * positions * e)


# --------------------------------------------------------------------------- the plan


@dataclass
class ActorPlan:
    """One kind of actor: ``count`` of them, each on ``gpus`` GPUs, each needing ``parts`` bytes."""

    name: str
    count: int
    gpus: float
    parts: dict[str, float]
    budget: float | None = None  # bytes the actor may use per device (None: the device less reserve)
    note: str = ""
    fix: str = ""  # what to change when it does not fit, for this actor's settings

    @property
    def need(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    actors: list[ActorPlan]
    gpu_memory: float  # bytes per GPU
    colocated: bool
    shapes: dict[str, ModelShape] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> float:
        """GPUs the recipe asks for (colocated rollout replicas take the trainer's)."""
        return sum(a.count * a.gpus for a in self.actors if not (self.colocated and a.name == "rollout"))


def plan_recipe(cfg: MOPDConfig, gpu_memory_gb: float | None = None) -> Plan:
    """The memory each actor of ``cfg`` needs; ``problems`` lists what does not fit a device."""
    gpu_memory = (gpu_memory_gb or cfg.placement.gpu_memory_gb) * GB
    colocated = cfg.placement.layout == "colocated"
    student = model_shape(cfg.student)
    tokens = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    plan = Plan([], gpu_memory, colocated, {"student": student})
    trainer = _trainer_plan(cfg, student, tokens)
    rollout = _rollout_plan(cfg, student, tokens)
    plan.actors += [trainer, rollout]
    for g in teacher_groups(cfg.teachers):  # adapter teachers of one base: the base once
        shape = model_shape(g.cfg)
        plan.shapes[f"teachers.{g.name}"] = shape
        actor = _teacher_plan(g.name, g.cfg, shape, tokens)
        if g.adapters:
            # PEFT keeps adapter weights in float32 (it up-casts 16-bit ones) beside the base.
            actor.parts["weights"] += 4.0 * sum(adapter_params(a) for a in g.adapters.values())
            actor.note += f", {len(g.adapters)} adapter{'s' if len(g.adapters) > 1 else ''} over one base"
        plan.actors.append(actor)
    _check_fit(plan)
    return plan


def adapter_params(directory: str) -> int:
    """Parameters of a PEFT adapter directory, from its safetensors header (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                total += math.prod(st.get_slice(name).get_shape())
    return total


def _trainer_plan(cfg: MOPDConfig, s: ModelShape, tokens: int) -> ActorPlan:
    t = cfg.trainer
    e = 2 if t.bf16 else 4
    lora = getattr(cfg.student, "lora", None)
    adapter = lora_params(cfg.student) if lora is not None and lora.r > 0 else 0
    # A LoRA student trains (gradients, optimizer) only its adapter; the frozen base is weights alone.
    parts = trainer_states(adapter or s.total_params, t.world_size, t.zero_stage, t.bf16, t.offload_optimizer)
    if adapter:  # the frozen base, partitioned under ZeRO-3 like the rest
        parts["weights"] += e * s.total_params / (t.world_size if t.zero_stage == 3 else 1)
    host = parts.pop("host_optimizer", 0.0)
    extra = get_objective(cfg.objective.kind).extra_logit_bytes(cfg.objective)
    # Sequence parallelism: each of the S ranks of a group holds 1/S of a pass's positions (the
    # attention's all-to-all trades positions for heads, the same number of elements).
    sp = t.sequence_parallel_size
    positions = math.ceil(pass_positions(t.micro_batch_size, t.max_tokens_per_micro_batch, tokens) / sp)
    parts["activations"] = train_activations(s, positions, tokens, e, t.gradient_checkpointing)
    # Full logits: the logits, the fp32 log-softmax, its gradient and the gather's, and the objective's own.
    parts["logits"] = logits_bytes(s, positions, e, t.logprob_chunk_size, e + 12 + extra)
    if t.max_tokens_per_micro_batch > 0:
        batch = f"max_tokens_per_micro_batch {t.max_tokens_per_micro_batch} (<= {positions} tokens a pass)"
    else:
        batch = f"micro-batch {t.micro_batch_size} x {tokens} tokens"
    batch += f", sequence parallel {sp} ({positions} tokens a rank)" if sp > 1 else ""
    note = f"ZeRO-{t.zero_stage}, {'bf16' if t.bf16 else 'fp32'}, {batch}"
    note += f", LoRA r={lora.r} ({_count(adapter)} trainable)" if adapter and lora is not None else ""
    note += ", checkpointing" if t.gradient_checkpointing else ""
    note += f", {_chunk_note(t.logprob_chunk_size)}"
    note += f", optimizer in host memory ({host / GB:.1f} GB per rank)" if host else ""
    fix = _trainer_fix(cfg, parts, tokens)
    return ActorPlan("trainer", t.world_size, t.resources.num_gpus, parts, note=note, fix=fix)


def _chunk_note(chunk: int) -> str:
    return f"logprob_chunk_size {chunk}" if chunk > 0 else "full logits (logprob_chunk_size 0)"


def _trainer_fix(cfg: MOPDConfig, parts: dict[str, float], tokens: int) -> str:
    """The settings that shrink a rank, those the recipe does not use yet, for the larger of its
    states and its activations first (more ranks do not shrink a micro-batch's activations)."""
    t = cfg.trainer
    states = ["raise trainer.world_size"]
    states += ["set trainer.zero_stage=3"] if t.zero_stage < 3 else []
    states += ["set trainer.bf16=true"] if not t.bf16 else []
    states += ["set trainer.offload_optimizer=true"] if not t.offload_optimizer else []
    acts = ["set trainer.gradient_checkpointing=true"] if not t.gradient_checkpointing else []
    if t.logprob_chunk_size == 0:
        acts.append("set trainer.logprob_chunk_size=1024 (the loss without the full logits)")
    elif parts["logits"] > parts["activations"]:
        acts.append("lower trainer.logprob_chunk_size")
    by_tokens = ("trainer.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch)
    acts.append(_batch_fix(*by_tokens, "trainer.micro_batch_size", t.micro_batch_size, tokens))
    if t.max_tokens_per_micro_batch == 0:
        acts.append("raise trainer.sequence_parallel_size (a row's tokens over several ranks; sdpa/flash students)")
    activations = parts["activations"] + parts["logits"]
    states_bytes = sum(parts[k] for k in ("weights", "gradients", "optimizer", "buffers"))
    return ", ".join(states + acts if states_bytes >= activations else acts + states)


def _batch_fix(budget_key: str, budget: int, rows_key: str, rows: int, tokens: int) -> str:
    """How to make one forward pass smaller: a lower token budget, a budget instead of rows, or,
    when a pass is one row already, shorter rows."""
    if budget > tokens:
        return f"lower {budget_key} (down to {tokens}, the longest row; a budget below it saves nothing)"
    if budget == 0 and rows > 1:
        return f"lower {rows_key}, or set {budget_key} (passes by tokens, e.g. {tokens})"
    return f"lower rollout.max_new_tokens (a pass holds one row of {tokens} tokens already)"


def _vllm_shards(s: ModelShape, num_gpus: float) -> tuple[int, int, str]:
    """(weight shards, KV cache shards, note) of a vLLM engine over ``num_gpus`` GPUs: tensor
    parallelism splits the weights ``tp`` ways and the KV heads at most ``kv_heads`` ways (vLLM
    replicates a KV head over the ranks beyond that)."""
    tp = tensor_parallel_size(num_gpus)
    return tp, min(tp, min(s.kv_heads)), f", tensor parallel {tp}, per GPU" if tp > 1 else ""


def _rollout_plan(cfg: MOPDConfig, s: ModelShape, tokens: int) -> ActorPlan:
    r = cfg.rollout
    e = DTYPE_BYTES[cfg.student.dtype]
    seqs = math.ceil(r.prompts_per_step * r.n / r.replicas)
    parts = {"weights": float(e * s.total_params)}
    shared = ", or use placement.layout=disaggregated (the trainer's states stay on the shared GPU)"
    tail = shared if cfg.placement.layout == "colocated" else ""
    if r.backend == "vllm":
        seq_len = min(tokens, r.max_model_len)
        tp, kv_split, tp_note = _vllm_shards(s, r.resources.num_gpus)
        parts["weights"] /= tp
        parts["kv_cache"] = max(s.kv_bytes(r.max_model_len, e), seqs * s.kv_bytes(seq_len, e)) / kv_split
        budget = r.gpu_memory_utilization
        note = f"vllm, {seqs} sequences x {seq_len} tokens, max_model_len {r.max_model_len}{tp_note}"
        fix = (
            "raise rollout.gpu_memory_utilization, rollout.replicas (fewer sequences each) or "
            f"rollout.resources.num_gpus (tensor parallel), lower rollout.max_model_len{tail}"
        )
        return ActorPlan("rollout", r.replicas, r.resources.num_gpus, parts, budget=budget, note=note, fix=fix)
    parts["kv_cache"] = float(seqs * s.kv_bytes(tokens, e))
    parts["logits"] = float(seqs * s.vocab_size * 4 * 2)
    fix = f"raise rollout.replicas (fewer sequences each), lower rollout.max_new_tokens{tail}"
    note = f"hf, {seqs} sequences x {tokens}"
    return ActorPlan("rollout", r.replicas, r.resources.num_gpus, parts, note=note, fix=fix)


def _teacher_plan(name: str, t: Any, s: ModelShape, tokens: int) -> ActorPlan:
    if t.backend == "remote":  # its server holds the model; the client actor holds none of it
        return ActorPlan(f"teachers.{name}", t.replicas, 0.0, {}, note=f"remote, served at {t.remote.url}")
    e = DTYPE_BYTES[t.dtype]
    parts = {"weights": float(e * s.total_params)}
    label = f"teachers.{name}"
    fix = [f"set {label}.dtype=bfloat16"] if t.dtype == "float32" else []
    if t.backend == "vllm":
        kv_tokens = max(s.max_position, tokens)
        tp, kv_split, tp_note = _vllm_shards(s, t.resources.num_gpus)
        parts["weights"] /= tp
        parts["kv_cache"] = max(s.kv_bytes(kv_tokens, e), t.batch_size * s.kv_bytes(tokens, e)) / kv_split
        note = f"vllm, {t.batch_size} rows x {tokens} tokens{tp_note}"
        fix += [f"lower {label}.batch_size", f"raise {label}.resources.num_gpus (tensor parallel)"]
        budget: float | None = VLLM_DEFAULT_UTILIZATION
    else:
        positions = pass_positions(t.batch_size, t.max_tokens_per_batch, tokens)
        parts["activations"] = inference_activations(s, positions, tokens, e)
        parts["logits"] = logits_bytes(s, positions, e, t.logprob_chunk_size, e + 8)  # full: + fp32 log-softmax
        if t.max_tokens_per_batch > 0:
            note = f"hf, max_tokens_per_batch {t.max_tokens_per_batch} (<= {positions} tokens a pass)"
        else:
            note = f"hf, {t.batch_size} rows x {tokens} tokens"
        note += f", {_chunk_note(t.logprob_chunk_size)}"
        if t.logprob_chunk_size == 0:
            fix.append(f"set {label}.logprob_chunk_size=1024 (scores without the full logits)")
        by_tokens = (f"{label}.max_tokens_per_batch", t.max_tokens_per_batch)
        fix.append(_batch_fix(*by_tokens, f"{label}.batch_size", t.batch_size, tokens))
        budget = None
    fix.append("use a smaller teacher")
    return ActorPlan(label, t.replicas, t.resources.num_gpus, parts, budget=budget, note=note, fix=", ".join(fix))


def _capacity(plan: Plan, a: ActorPlan) -> float:
    """Bytes one actor may use on each of its devices: a vLLM engine its utilization share of the
    whole device (vLLM sizes itself from the device's memory, whatever share of the GPU Ray
    accounts to it), others the device (or their fraction of it) less the runtime reserve."""
    if a.budget is not None:
        return a.budget * plan.gpu_memory
    return min(a.gpus, 1.0) * plan.gpu_memory - RUNTIME_RESERVE_GB * GB


def _check_fit(plan: Plan) -> None:
    for a in plan.actors:
        if a.gpus <= 0:
            continue  # CPU actors: host memory is not planned
        if a.gpus > 1 and a.budget is None:  # vLLM engines shard over their GPUs; the others do not
            plan.notes.append(
                f"{a.name}: {a.gpus:g} GPUs per replica, but one process uses one device (no tensor "
                "parallelism): the plan counts one"
            )
        cap = _capacity(plan, a)
        if a.need > cap:
            plan.problems.append(_too_big(plan, a, cap))
    if plan.colocated:
        _check_colocated(plan)


def _check_colocated(plan: Plan) -> None:
    """The rollout's engine claims its utilization share of a device the trainer's weights,
    gradients and optimizer state also occupy (they stay while the rollout runs)."""
    trainer, rollout = plan.actors[0], plan.actors[1]
    if trainer.gpus > 0 and rollout.gpus > 0:
        room = _colocated_room(plan, trainer)
        claim = _capacity(plan, rollout) if rollout.budget is not None else rollout.need
        if claim > room:
            plan.problems.append(
                f"rollout: its engine claims {claim / GB:.1f} GB of each GPU it shares with the trainer, but the "
                f"trainer's weights, gradients and optimizer state leave {max(room, 0) / GB:.1f} GB of the "
                f"{plan.gpu_memory / GB:g} GB; lower rollout.gpu_memory_utilization to at most "
                f"{max(room, 0) / plan.gpu_memory:.2f}, shrink the trainer's states (more ranks, ZeRO-3), "
                "or use placement.layout=disaggregated"
            )
    if trainer.gpus <= 0:
        plan.problems.append(
            "placement.layout=colocated shares the trainer's GPUs, but trainer.resources.num_gpus is 0; "
            "give the trainer GPUs or set placement.layout=disaggregated"
        )
    if rollout.count * rollout.gpus > trainer.count * trainer.gpus:
        plan.problems.append(
            f"rollout: {rollout.count} replicas x {rollout.gpus:g} GPUs do not fit on the trainer's "
            f"{trainer.count * trainer.gpus:g} GPUs (placement.layout=colocated); lower rollout.replicas"
        )


def _colocated_room(plan: Plan, trainer: ActorPlan) -> float:
    """What a colocated rollout engine may use: the device less the trainer's persistent states."""
    states = sum(trainer.parts[k] for k in ("weights", "gradients", "optimizer", "buffers"))
    return plan.gpu_memory - states - RUNTIME_RESERVE_GB * GB


def _too_big(plan: Plan, a: ActorPlan, cap: float) -> str:
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in a.parts.items())
    where = f"{plan.gpu_memory / GB:g} GB GPU"
    return (
        f"{a.name}: needs {a.need / GB:.1f} GB per replica ({parts}) but has {cap / GB:.1f} GB of a {where}; "
        f"{a.fix}, or use bigger GPUs (placement.gpu_memory_gb)"
    )


def check_cluster(plan: Plan, gpus_per_node: list[float]) -> None:
    """Adds a problem when the recipe asks for more GPUs than the cluster (one entry per node) has,
    or an actor for more than one node holds."""
    total = sum(gpus_per_node)
    if plan.gpus > total:
        asks = ", ".join(
            f"{a.name} {a.count} x {a.gpus:g}"
            for a in plan.actors
            if a.gpus > 0 and not (plan.colocated and a.name == "rollout")
        )
        plan.problems.append(
            f"the recipe asks for {plan.gpus:g} GPUs ({asks}) but the cluster has {total:g} "
            f"({len(gpus_per_node)} node(s)); lower replicas / trainer.world_size, or add nodes"
        )
    biggest = max(gpus_per_node, default=0.0)
    for a in plan.actors:
        if a.gpus > biggest:
            plan.problems.append(f"{a.name}: asks for {a.gpus:g} GPUs per replica, but a node has at most {biggest:g}")


def raise_if_unfit(plan: Plan) -> None:
    if plan.problems:
        raise ConfigError("the recipe does not fit:\n  - " + "\n  - ".join(plan.problems))


# --------------------------------------------------------------------------- output


def format_plan(plan: Plan) -> str:
    """A readable table: one row per actor kind, its memory per replica by part, and totals."""
    cols = ["weights", "gradients", "optimizer", "buffers", "activations", "logits", "kv_cache"]
    big = max((a.need for a in plan.actors), default=0.0) >= GB
    unit, div = ("GB", GB) if big else ("MB", 1e6)
    head = f"{'actor':<18}{'x':>4}{'GPUs':>7}" + "".join(f"{c:>12}" for c in cols) + f"{'total ' + unit:>11}  note"
    lines = [f"memory per replica / rank, in {unit}", head, "-" * len(head)]
    for a in plan.actors:
        cells = "".join(f"{a.parts[c] / div:>12.2f}" if c in a.parts else f"{'-':>12}" for c in cols)
        gpus = "shared" if plan.colocated and a.name == "rollout" else f"{a.gpus:g}"
        lines.append(f"{a.name:<18}{a.count:>4}{gpus:>7}{cells}{a.need / div:>11.2f}  {a.note}")
    lines.append("")
    for name, s in plan.shapes.items():
        lines.append(
            f"{name}: {s.model_type}, {_count(s.total_params)} parameters ({_count(s.active_params)} active), "
            f"{s.layers} layers, vocab {s.vocab_size}"
        )
    layout = "colocated (rollout on the trainer's GPUs)" if plan.colocated else "disaggregated"
    lines.append(f"GPUs asked for: {plan.gpus:g}; layout {layout}; {plan.gpu_memory / GB:g} GB per GPU")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cluster_gpus(address: str | None) -> list[float]:
    """GPUs per alive node of the Ray cluster at ``address``."""
    import ray

    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    try:
        return [float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
