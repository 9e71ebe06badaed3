"""A LoRA student (``student.lora``): the trainer wraps the student with a PEFT adapter and trains
only the adapter; whatever leaves the trainer (weight sync to the rollout, ``save_hf``, the state
dict) is the merged model under the student's own Hugging Face names, so the rollout and an export
never see PEFT.

    model = with_lora(load_model(cfg.student), cfg.student.lora, seed)  # base frozen, adapter trainable
    sd = merged_state_dict(model)                                       # HF names, W + B A * scale
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mopd.config import LoraSettings
from mopd.models import peft_lora_config

ADAPTER = "default"  # PEFT's name for the one adapter
ADAPTER_DIR = "adapter"  # under a saved student (a checkpoint's hf/): the adapter alone


def with_lora(model: torch.nn.Module, s: LoraSettings, seed: int) -> Any:
    """``model`` wrapped by PEFT with a fresh LoRA adapter (B = 0: the merged model starts as the
    student; A drawn from ``seed``, the same on every rank and in every run of a seed); only the
    adapter's parameters require grad."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_lora_config(s))


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def hf_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its config, generation config, class)."""
    return model.get_base_model() if is_lora(model) else model


@dataclass(frozen=True)
class Merged:
    """An adapted weight as the rollout gets it: the frozen ``base`` weight plus its LoRA ``layer``'s
    delta (B A x scale). Under ZeRO-3 ``base`` and the adapter's tensors are partitions: gather
    ``params()`` before ``value()``."""

    base: torch.Tensor
    layer: Any  # the PEFT LoraLayer that wraps it

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.base, "ds_shape", self.base.shape))

    def params(self) -> list[torch.Tensor]:
        """The tensors ``value()`` reads."""
        return [self.base, *self.layer.lora_A[ADAPTER].parameters(), *self.layer.lora_B[ADAPTER].parameters()]

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        return self.base.detach() + self.layer.get_delta_weight(ADAPTER).to(self.base.dtype)


def merge_sources(model: Any) -> dict[str, torch.Tensor | Merged]:
    """What each entry of the student's own state dict is made of: the base model's tensor (a
    parameter, or its ZeRO-3 partition), or a ``Merged`` weight where the adapter changes it; the
    adapter's own tensors are left out. Nothing is computed."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers: dict[str, Any] = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor | Merged] = {}
    for key, value in base.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        owner, sep, rest = key.partition(".base_layer.")
        name = f"{owner}.{rest}" if sep else key
        out[name] = Merged(value, layers[owner]) if sep and rest == "weight" and owner in layers else value
    return out


@torch.no_grad()
def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The student's state dict with every adapted weight merged (``W + delta``), under the names
    the model has without PEFT. Leaves the model as it was. ZeRO 0-2 only (whole tensors)."""
    return {k: v.value() if isinstance(v, Merged) else v.detach() for k, v in merge_sources(model).items()}


def adapter_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's parameters under the names PEFT saves them with (its ``adapter_model``
    file: the adapter's name left out), which vLLM's LoRA loader reads."""
    return [(n.replace(f".{ADAPTER}.", "."), p) for n, p in model.named_parameters() if p.requires_grad]
