"""Every seed the project derives, and the one JSON form of a ``random.Random`` state.

Three derivations, each used where it always was: changing one would change every prompt, order or
sample drawn with it (and the quickstart's report), so they are kept side by side rather than merged.

    derive_seed(seed, "mixer")        64-bit, from any parts: data generators, the prompt mixer, quickstart files
    step_seed(seed, step)             31-bit: the sampling seed of one MOPD step
    seed_for(step_seed, replica)      31-bit, well mixed: one rollout replica's (or one prompt's) seed
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process (unlike salted ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: derived, so a resumed run samples what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


def seed_for(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (e.g. (step seed, replica), (step seed, prompt)), so that
    neighbouring step seeds do not give overlapping random streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)


def rng_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    """``random.getstate()`` (or ``Random.getstate()``) as JSON-serialisable lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data: Sequence[Any]) -> tuple[Any, ...]:
    """The state ``rng_state_to_json`` wrote, ready for ``setstate``."""
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
