"""A LoRA student (``student.lora``): the trainer wraps the student with a PEFT adapter and trains
only the adapter; whatever leaves the trainer (weight sync to the rollout, ``save_hf``, the state
dict) is the merged model under the student's own Hugging Face names, so the rollout and an export
never see PEFT.

    model = with_lora(load_model(cfg.student), cfg.student.lora)   # base frozen, adapter trainable
    sd = merged_state_dict(model)                                   # HF names, W + B A * scale
"""

from __future__ import annotations

from typing import Any

import torch

from mopd.config import LoraSettings
from mopd.models import peft_lora_config

ADAPTER = "default"  # PEFT's name for the one adapter
ADAPTER_DIR = "adapter"  # under a saved student (a checkpoint's hf/): the adapter alone


def with_lora(model: torch.nn.Module, s: LoraSettings) -> Any:
    """``model`` wrapped by PEFT with a fresh LoRA adapter (B = 0: the merged model starts as the
    student); only the adapter's parameters require grad."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(s))


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def hf_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its config, generation config, class)."""
    return model.get_base_model() if is_lora(model) else model


@torch.no_grad()
def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The student's state dict with every adapted weight merged (``W + delta``), under the names
    the model has without PEFT; the adapter's own tensors are left out. Leaves the model as it was."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers: dict[str, Any] = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        owner, sep, rest = key.partition(".base_layer.")
        name = f"{owner}.{rest}" if sep else key
        if sep and rest == "weight" and owner in layers:
            value = value + layers[owner].get_delta_weight(ADAPTER).to(value.dtype)
        out[name] = value.detach()
    return out
