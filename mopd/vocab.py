"""Vocabulary signatures: what a teacher must share with the student to score the student's tokens.

A signature is read from a tokenizer and a model config alone (no weights), so the app checks every
teacher against the student before any actor starts, and each teacher worker checks again at start-up.

    sig = tokenizer_signature(tokenizer, config_vocab_size(config))
    check_vocabularies({"math": teacher_sig}, student_sig)   # VocabularyMismatchError if they differ
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mopd.config import ConfigError

# A fixed text whose ids every teacher must share with the student (mopd check, remote teachers'
# servers): prose, accents, Cyrillic, CJK, Arabic, an emoji, code with indentation, and maths
# symbols (where BPE merges and normalizers differ).
PROBE_TEXT = (
    "The quick brown fox jumps over 13 lazy dogs.\n"
    "Größe, naïve café: ¿qué tal? Привет, мир! 東京で会いましょう。 مرحبا 🙂\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # pi r^2\n"
    "Solve 2x + 7 = 15, so x = 4; ∫₀¹ x² dx = 1/3 and √(a² + b²) ≤ |a| + |b|."
)


class VocabularyMismatchError(ConfigError):
    """A teacher whose tokenizer / vocabulary differs from the student's."""


def tokenizer_signature(tokenizer: Any, model_vocab_size: int | None) -> dict[str, Any]:
    """What a teacher must share with the student to score the student's tokens.

    tokenizer_vocab_size  len(tokenizer), added tokens included
    vocab_hash            sha256 of the sorted (token, id) pairs: same ids for the same strings
    special_token_ids     bos / eos / pad / unk ids (None where the tokenizer has none)
    model_vocab_size      rows of the model's output layer: a padded vocabulary (e.g. 152064 vs
                          151936) changes the softmax support and admits ids the other side lacks
    """
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    return {
        "tokenizer_vocab_size": len(tokenizer),
        "vocab_hash": digest,
        "special_token_ids": specials,
        "model_vocab_size": None if model_vocab_size is None else int(model_vocab_size),
    }


def config_vocab_size(config: Any) -> int:
    """``vocab_size`` of a transformers config (of its text part for multimodal configs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def signature_differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Human-readable differences between two signatures, e.g. ``model_vocab_size: 256 vs 128``."""
    diffs = []
    for key in sorted(set(expected) | set(got)):
        a, b = got.get(key), expected.get(key)
        if a != b:
            diffs.append(f"{key}: {a!r} vs {b!r}")
    return diffs


def check_vocabularies(signatures: Mapping[str, dict[str, Any]], student: dict[str, Any] | None) -> None:
    """Fail loudly if a teacher's vocabulary differs from the student's (or, without a student
    signature, from the other teachers'). ``signatures`` maps domain -> ``tokenizer_signature``."""
    if not signatures:
        return
    reference, ref_name = student, "the student"
    if reference is None:
        ref_name = f"teacher '{next(iter(signatures))}'"
        reference = next(iter(signatures.values()))
    problems = []
    for name, sig in signatures.items():
        diffs = signature_differences(reference, sig)
        if diffs:
            problems.append(f"teacher '{name}' vs {ref_name}: " + "; ".join(diffs))
    head = "teachers must share the student's tokenizer and vocabulary (values: teacher vs reference)"
    if len(problems) == 1:
        raise VocabularyMismatchError(f"{head}: {problems[0]}")
    if problems:
        raise VocabularyMismatchError(f"{head}:\n  - " + "\n  - ".join(problems))
