"""Chunked log-probs (mopd/logprobs.py) against the full-logits path they replace: values and
gradients of the kernel (from hidden states and from logits, chunk sizes that do and do not divide
the positions, padding), its top-k, the autograd graph it keeps, a real model's head (plain and
tied), the trainer's step for both objective kinds, and the HF teacher's scores.

    OMP_NUM_THREADS=1 pytest tests/test_chunked_logprobs.py      # ~1 min on 2 cores

Tolerances: the chunked and the full path do the same fp32 arithmetic in other shapes (GEMMs of
other sizes, log-sum-exp vs log_softmax), so values and gradients differ by float rounding only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mopd.config import BUILTIN_TOKENIZER, ModelConfig, TeacherConfig
from mopd.logprobs import (
    align_to_tokens,
    chunked_logprobs,
    chunked_scores,
    head_scoring,
    next_token_targets,
    output_projection,
)
from mopd.models import forward_logits, load_model, tiny_mimo_config, token_logprobs, topk_logprobs
from teachers.hf import HFTeacherWorker
from test_teachers import PROMPTS, RESPONSES, assert_topk_of, reference_full_logprobs
from test_teachers import make_batch as make_rollout
from test_trainer import capture_gradients, make_batch, make_cfg, vector_norm, worker
from trainers.deepspeed_trainer import logprobs_at

B, T, H, V, K = 2, 7, 6, 23, 3  # B x T = 14 positions
CHUNKS = [1, 3, 4, 14, 100, 0]  # 3 and 4 leave a short last chunk; 0: all positions at once


def head_inputs(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Hidden states (B, T, H) and a head weight (V, H) with grad, token ids (B, T), top-k ids
    (B, T, K), a response mask (B, T) with padding, and an upstream gradient for (B, T, 1 + K)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    topk_ids = torch.randint(0, V, (B, T, K), generator=g)
    topk_ids[0, 2, 0] = ids[0, 3]  # a top-k id equal to the sampled token: both get its gradient
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    upstream = torch.randn(B, T, 1 + K, generator=g) * mask[..., None]
    return hidden, weight, ids, topk_ids, mask, upstream


def full_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Today's arithmetic: an fp32 log_softmax over the vocabulary, then the targets."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets)


def grads_of(out: torch.Tensor, upstream: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * upstream).sum(), tensors))


def assert_near(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Within ``rel`` of the reference's largest entry (gradients: fp32 sums in another order)."""
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, atol=rel * scale, rtol=rel)


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_values_and_gradients_equal_the_full_logits_path(source, chunk):
    hidden, weight, ids, topk_ids, _, upstream = head_inputs()
    targets = next_token_targets(ids, topk_ids)
    logits = F.linear(hidden, weight)
    want = full_logprobs(logits, targets)
    if source == "hidden":
        got = chunked_logprobs(hidden, targets, chunk=chunk, weight=weight)
        wrt: tuple[torch.Tensor, ...] = (hidden, weight)
    else:
        got = chunked_logprobs(logits, targets, chunk=chunk)
        wrt = (logits,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g_got, g_want in zip(grads_of(got, upstream, *wrt), grads_of(want, upstream, *wrt), strict=True):
        assert_near(g_got, g_want, 1e-5)


def test_bf16_head_matches_the_bf16_logits_within_their_rounding():
    """A bf16 head: the chunk's logits are rounded to bf16 as the model's head rounds them, so the
    log-probs agree to fp32 rounding; the gradients to bf16 rounding (on a CPU the chunk's GEMMs
    run in fp32 and the logits' gradient is not rounded to bf16 first)."""
    hidden, weight, ids, topk_ids, _, upstream = head_inputs(torch.bfloat16)
    targets = next_token_targets(ids, topk_ids)
    want = full_logprobs(F.linear(hidden, weight), targets)
    got = chunked_logprobs(hidden, targets, chunk=4, weight=weight)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got_grads, want_grads = grads_of(got, upstream, hidden, weight), grads_of(want, upstream, hidden, weight)
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        assert g_got.dtype == torch.bfloat16
        assert_near(g_got.float(), g_want.float(), 2e-2)


@pytest.mark.parametrize("chunk", [1, 3, 0])
@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_scores_and_topk_equal_the_models_functions(source, chunk):
    hidden, weight, ids, _, _, _ = head_inputs()
    logits = F.linear(hidden, weight).detach()
    x, w = (hidden.detach(), weight.detach()) if source == "hidden" else (logits, None)
    picked, top_ids, top_lp = chunked_scores(x, chunk=chunk, weight=w, targets=next_token_targets(ids), topk=5)
    assert picked is not None and top_ids is not None and top_lp is not None
    torch.testing.assert_close(align_to_tokens(picked)[..., 0], token_logprobs(logits, ids), atol=1e-5, rtol=0)
    want_ids, want_lp = topk_logprobs(logits, 5)
    torch.testing.assert_close(align_to_tokens(top_lp), want_lp, atol=1e-5, rtol=0)
    full = align_to_tokens(torch.log_softmax(logits, -1))
    torch.testing.assert_close(full.gather(-1, align_to_tokens(top_ids)), want_lp, atol=1e-5, rtol=0)
    assert top_ids.dtype == want_ids.dtype == torch.int64
    # k larger than the vocabulary: the whole distribution, as topk_logprobs gives it.
    _, all_ids, _ = chunked_scores(x, chunk=chunk, weight=w, topk=V + 10)
    assert all_ids is not None and all_ids.shape == (B, T, V)


def test_the_graph_keeps_no_positions_by_vocabulary_tensor():
    """Regression guard for the memory fix (issue 26): what autograd keeps for the backward of
    the chunked path is its inputs and one log-sum-exp per position, never a (positions x V)
    tensor, which the full path keeps twice (the fp32 log-softmax of each gather)."""
    hidden, weight, ids, topk_ids, _, _ = head_inputs()
    targets = next_token_targets(ids, topk_ids)

    def saved_sizes(run) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            run()
        return sizes

    chunked = saved_sizes(lambda: chunked_logprobs(hidden, targets, chunk=4, weight=weight))
    full = saved_sizes(lambda: full_logprobs(F.linear(hidden, weight), targets))
    assert max(chunked) == max(hidden.numel(), weight.numel(), targets.numel()) < B * T * V
    assert sum(n >= B * T * V for n in full) >= 1  # the guard sees what it guards against


def test_a_mismatched_head_is_refused():
    hidden, weight, ids, _, _, _ = head_inputs()
    with pytest.raises(ValueError, match=r"weight \(23, 5\) is not \(V, 6\)"):
        chunked_logprobs(hidden, next_token_targets(ids), chunk=4, weight=weight[:, :5])
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(hidden, next_token_targets(ids)[:, 1:], chunk=4, weight=weight)


# --------------------------------------------------------------------------- a model's head


def llama(**overrides) -> ModelConfig:
    cfg = dict(
        model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return ModelConfig(config={**cfg, **overrides}, tokenizer=BUILTIN_TOKENIZER)


def gemma2_softcapped() -> ModelConfig:
    """A model whose logits are soft-capped after the head: its head must stay as it is."""
    cfg = dict(
        model_type="gemma2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        final_logit_softcapping=3.0, query_pre_attn_scalar=8, sliding_window=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return ModelConfig(config=cfg, tokenizer=BUILTIN_TOKENIZER)


def test_output_projection_takes_plain_heads_only():
    mimo = load_model(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER))
    assert output_projection(mimo) is mimo.lm_head
    tied = load_model(llama(tie_word_embeddings=True))
    head = output_projection(tied)
    assert head is not None and head.weight is tied.get_input_embeddings().weight
    assert output_projection(load_model(gemma2_softcapped())) is None
    scaled = load_model(llama())
    scaled.config.logit_scale = 0.5  # Cohere-style scaling after the head
    assert output_projection(scaled) is None


@pytest.mark.parametrize("spec", ["mimo", "llama_tied", "gemma2_softcapped"])
def test_head_scoring_gives_the_models_logprobs_and_gradients(spec):
    """Through a real model: the head computes the chunked log-probs (the model's ``logits``
    output is (b, t, 1 + K)), equal to the full path's, and so are the gradients of every
    parameter (with tied embeddings, the embedding gets the head's gradient too); a soft-capped
    head stays and the chunks start from its logits."""
    model_cfg = {
        "mimo": ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER),
        "llama_tied": llama(tie_word_embeddings=True),
        "gemma2_softcapped": gemma2_softcapped(),
    }[spec]
    model = load_model(model_cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.bool)
    am[0, :3] = False  # left padding
    topk_ids = torch.randint(0, 128, (2, 9, K), generator=g)
    upstream = torch.randn(2, 9, 1 + K, generator=g) * am[..., None]
    params = [p for p in model.parameters() if p.requires_grad]

    logits = forward_logits(model, ids, am).logits
    want = torch.cat([token_logprobs(logits, ids)[..., None], logprobs_at(logits, topk_ids)], -1)
    want_grads = grads_of(want, upstream, *params)

    targets = next_token_targets(ids, topk_ids)
    with head_scoring(model, lambda x, w: chunked_logprobs(x, targets, chunk=5, weight=w)) as finish:
        out = forward_logits(model, ids, am).logits
    assert out.shape == ((2, 9, 1 + K) if spec != "gemma2_softcapped" else (2, 9, 128))
    got = align_to_tokens(finish(out))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g_got, g_want in zip(grads_of(got, upstream, *params), want_grads, strict=True):
        assert_near(g_got, g_want, 1e-4)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head is itself again


# --------------------------------------------------------------------------- the trainer


def step(kind: str, chunk: int, zero_stage: int = 0):
    cfg = make_cfg(kind=kind, zero_stage=zero_stage, micro_batch_size=3)
    cfg.trainer.logprob_chunk_size = chunk
    if kind == "sampled":
        cfg.objective.alpha = 0.5
    else:
        cfg.objective.forward_kl = 0.5
    w = worker(cfg)
    # The chunks run in the head (not from logits) under every ZeRO stage: nothing wraps it.
    assert output_projection(w.engine.module) is w.engine.module.lm_head
    grads = capture_gradients(w) if zero_stage == 0 else {}
    return w.train_step(make_batch(cfg)), grads


@pytest.mark.parametrize("kind", ["sampled", "topk"])
def test_the_trainers_step_equals_the_full_logits_step(kind):
    """One train step with chunks of 5 positions (micro-batches of 3 rows x 14 columns: chunks
    straddle rows) gives the full-logits step's loss, metrics and gradients, for both kinds."""
    (m_full, g_full), (m_chunk, g_chunk) = step(kind, 0), step(kind, 5)
    assert m_full.keys() == m_chunk.keys()
    for key in m_full:
        assert m_chunk[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-6), key
    assert g_full.keys() == g_chunk.keys() and g_full
    diff = vector_norm(g_chunk[k] - g_full[k] for k in g_full)
    assert diff <= 1e-5 * vector_norm(g_full.values())
    for name in ("lm_head.weight", "model.norm.weight"):  # the head and what feeds it
        assert_near(g_chunk[name], g_full[name], 1e-5)


def test_zero3_gathers_the_head_for_the_chunked_step():
    """Under ZeRO-3 the head's weight is a partition outside its forward: the chunks run inside
    the head's forward and backward, where DeepSpeed has gathered it, so the step is the same."""
    (m_full, _), (m_chunk, _) = step("topk", 0, zero_stage=3), step("topk", 5, zero_stage=3)
    assert m_chunk["train/loss"] == pytest.approx(m_full["train/loss"], rel=1e-5)
    assert m_chunk["train/grad_norm"] == pytest.approx(m_full["train/grad_norm"], rel=1e-5)


@pytest.mark.parametrize("chunk", [0, 1024])
def test_the_trainers_forward_keeps_no_logits(chunk):
    """Regression guard for issue 26 through the whole trainer step: with chunks, nothing the
    step's autograd graph keeps has the vocabulary as its last dimension (no logits, no
    log-softmax); the full-logits path (chunk size 0) keeps several."""
    vocab = 512  # unlike any other size of the tiny student
    cfg = make_cfg(kind="topk")
    cfg.student.config = {**tiny_mimo_config(), "vocab_size": vocab}
    cfg.trainer.logprob_chunk_size = chunk
    w, batch = worker(cfg), make_batch(cfg)
    shapes: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        m = w.train_step(batch)
    assert m["train/skipped"] == 0.0
    with_vocab = [s for s in shapes if len(s) >= 2 and s[-1] == vocab]
    assert (len(with_vocab) == 0) == (chunk > 0), with_vocab[:3]


def test_sft_step_and_eval_logprobs_equal_the_full_logits_ones():
    results = []
    for chunk in (0, 4):
        cfg = make_cfg()
        cfg.trainer.logprob_chunk_size = chunk
        w = worker(cfg)
        batch = make_batch(cfg)
        ids, am = batch.rollout.input_ids, batch.rollout.attention_mask
        results.append((w.logprobs(ids, am), w.sft_step(batch)))
    (lp_full, sft_full), (lp_chunk, sft_chunk) = results
    torch.testing.assert_close(lp_chunk, lp_full, atol=1e-5, rtol=0)
    assert sft_chunk["sft/loss"] == pytest.approx(sft_full["sft/loss"], rel=1e-5)
    assert sft_chunk["sft/grad_norm"] == pytest.approx(sft_full["sft/grad_norm"], rel=1e-5)


# --------------------------------------------------------------------------- the teacher


@pytest.mark.parametrize("spec", ["mimo", "llama_tied", "gemma2_softcapped"])
def test_teacher_scores_equal_the_full_logits_scores(spec):
    """The HF teacher in chunks of 3 positions (rows trimmed to their columns, the head kept for
    the response only) scores what it scores from the full logits: log-probs and a top-k."""
    model_cfg = {
        "mimo": ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER),
        "llama_tied": llama(tie_word_embeddings=True),
        "gemma2_softcapped": gemma2_softcapped(),
    }[spec]
    batch = make_rollout(PROMPTS, RESPONSES, ["math"] * len(PROMPTS))
    scores = []
    for chunk in (0, 3):
        cfg = TeacherConfig(config=model_cfg.config, tokenizer=BUILTIN_TOKENIZER, batch_size=4)
        cfg.logprob_chunk_size = chunk
        teacher = HFTeacherWorker("math", cfg, seed=0, set_threads=False)
        scores.append(teacher.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=5))
    full, chunked = scores
    rm = batch.response_mask
    torch.testing.assert_close(chunked.logprobs, full.logprobs, atol=1e-5, rtol=0)
    assert chunked.topk_ids is not None and chunked.topk_logprobs is not None
    assert_topk_of(chunked.topk_ids, chunked.topk_logprobs, reference_full_logprobs(teacher.model, batch), rm, 1e-5)
    assert bool((chunked.topk_ids[~rm] == 0).all()) and bool((chunked.topk_logprobs[~rm] == 0).all())
