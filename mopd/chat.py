"""What the student is shown and where its turn ends: prompt token ids (text as it is, or chat
messages rendered with the chat template) and the set of token ids that stop a response. The data
loader (prompt lengths in tokens) and both rollout backends use these same functions, so a prompt
has one tokenisation; teachers score the ids the student sampled and never see text (a teacher
with its own ``chat_template`` gets its own rendering of the prompt part, before the same response
ids: ``teacher_prompt_tokenizer``, teachers/pool.py).

    tok = student_tokenizer(cfg)       # load_tokenizer(cfg.student) with data.chat_template applied
    ids = prompt_ids(tok, row)         # list[int], what the rollout feeds the student
    stops = stop_token_ids(cfg, tok)   # sorted ids that end a response

Chat rendering is transformers' ``apply_chat_template(..., add_generation_prompt=True)``: the
template writes every special token the model expects (BOS included), so the rendered text is not
tokenised again with special tokens added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mopd.config import ModelConfig, MOPDConfig, TeacherConfig
from mopd.types import PromptRow


def apply_chat_template_option(tokenizer: Any, option: str) -> Any:
    """The tokenizer with ``data.chat_template`` applied: a file path replaces its chat template
    with the file's Jinja text; ``auto`` and ``none`` leave it as it is. Returns ``tokenizer``."""
    if option not in ("auto", "none"):
        tokenizer.chat_template = Path(option).read_text(encoding="utf-8")
    return tokenizer


def student_tokenizer(cfg: MOPDConfig) -> Any:
    """The student's tokenizer as the data loader and the rollout use it."""
    from mopd.models import load_tokenizer

    return apply_chat_template_option(load_tokenizer(cfg.student), cfg.data.chat_template)


def render_messages(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as the prompt text the template makes of them, ending with the assistant's
    generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: Any, row: PromptRow) -> list[int]:
    """The token ids of a row's prompt: chat messages through the chat template, or the text with
    the tokenizer's special tokens (e.g. BOS) added, unless the text already starts with the BOS
    token (a prompt rendered with a chat template by hand), which would then come twice."""
    if row.messages is None:
        return list(tokenizer(row.prompt, add_special_tokens=_adds_special_tokens(tokenizer, row.prompt))["input_ids"])
    enc = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def prompts_ids(tokenizer: Any, rows: Sequence[PromptRow]) -> list[list[int]]:
    """``prompt_ids`` of every row, in order: the text prompts in one tokenizer call each with and
    without special tokens (the same ids; 60,000 prompts took 9.8 s one by one), chat messages one
    by one through the template."""
    out: list[list[int]] = [[] for _ in rows]
    texts: dict[bool, list[int]] = {True: [], False: []}
    for i, row in enumerate(rows):
        if row.messages is None:
            texts[_adds_special_tokens(tokenizer, row.prompt)].append(i)
        else:
            out[i] = prompt_ids(tokenizer, row)
    for special, idx in texts.items():
        if idx:
            enc = tokenizer([rows[i].prompt for i in idx], add_special_tokens=special)["input_ids"]
            for i, ids in zip(idx, enc, strict=True):
                out[i] = list(ids)
    return out


def _adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether a text prompt is encoded with the tokenizer's special tokens: not when it already
    starts with the BOS token (rendered by hand), which would then come twice."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bool(bos) and text.startswith(bos))


def teacher_prompt_tokenizer(teacher: TeacherConfig, key: str) -> Any | None:
    """The tokenizer whose chat template renders the prompt part a teacher scores
    (``teachers.<d>.chat_template``: ``own`` or a Jinja file), or None: it scores the student's
    rendering. Raises ValueError naming ``key`` when the template is missing."""
    if teacher.chat_template is None:
        return None
    from mopd.models import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    if teacher.chat_template != "own":
        tokenizer.chat_template = Path(teacher.chat_template).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise ValueError(
            f"{key}.chat_template is 'own' but the teacher's tokenizer has no chat template; give a Jinja "
            "template file, or leave it unset (the teacher scores the student's rendering)"
        )
    return tokenizer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) int64 ids and (B, P) bool mask of prompts left-padded to the longest one."""
    P = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, P - len(p) :] = torch.as_tensor(p, dtype=torch.int64)
            mask[i, P - len(p) :] = True
    return ids, mask


def generation_config_eos(spec: ModelConfig) -> list[int]:
    """Every ``eos_token_id`` of a model directory's ``generation_config.json`` (an int or a list
    there); empty without one (inline configs, directories that ship none)."""
    if spec.path is None or not (Path(spec.path) / "generation_config.json").is_file():
        return []
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(spec.path).eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def stop_token_ids(cfg: MOPDConfig, tokenizer: Any, vocab_size: int | None = None) -> list[int]:
    """Sorted ids that end a student response: the tokenizer's EOS, every EOS of the student's
    generation config, and ``rollout.stop_token_ids``. With ``vocab_size`` (the model's), ids the
    model cannot emit are refused. Raises ValueError naming what to set when there are none."""
    ids = set(generation_config_eos(cfg.student)) | {int(t) for t in cfg.rollout.stop_token_ids}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(
            "no token ends a student response: its tokenizer has no eos_token and its model directory no "
            "generation_config.json with eos_token_id; set rollout.stop_token_ids (e.g. the end-of-turn id)"
        )
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(
            f"stop token ids {sorted(i for i in ids if i >= vocab_size)} are outside the student's vocabulary "
            f"({vocab_size} ids); check rollout.stop_token_ids and the student's generation_config.json"
        )
    return sorted(ids)
