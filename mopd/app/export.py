"""``mopd export``: a checkpoint's student as a Hugging Face directory that transformers and vLLM load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mopd.checkpoint import resolve
from mopd.dist.vllm_compat import vllm_config_overrides


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, adapter: bool = False) -> Path:
    """Copy a checkpoint's student to ``out_dir`` as a Hugging Face directory (safetensors,
    config, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` and vLLM load; a LoRA
    student's weights merged. ``adapter``: the LoRA student's adapter alone, a PEFT directory
    (``PeftModel.from_pretrained(base, out_dir)``; vLLM's ``LoRARequest``)."""
    src = resolve(path) / "hf"
    if adapter:
        src = src / "adapter"
        if not (src / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{src.parent} holds no adapter (the student was trained without student.lora)")
    elif not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no Hugging Face model (config.json missing)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    if not adapter:
        _add_vllm_keys(out / "config.json")
    return out


def _add_vllm_keys(config_path: Path) -> None:
    """Add the config keys vLLM's implementation of the model reads where transformers saves
    others (MiMoV2Flash); transformers ignores them, so the directory serves both."""
    config = json.loads(config_path.read_text())
    extra = vllm_config_overrides(config)
    if extra:
        config_path.write_text(json.dumps({**config, **extra}, indent=2))
