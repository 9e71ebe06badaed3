"""Student rollout: batch packing/merging (pure), the HF actor on a tiny MiMoV2Flash student, the
pool in-process, and (slow) the pool as two Ray actors.

    OMP_NUM_THREADS=1 pytest tests/test_rollout.py            # add -m "not slow" to skip Ray
"""

from __future__ import annotations

import math

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
from mopd.dist.runtime import split_evenly
from mopd.models import build_char_tokenizer, forward_logits, load_model, sequence_logprobs, tiny_mimo_config
from mopd.types import PromptRow, RolloutBatch
from rollout.batching import cut_at_stop, encode_prompts, merge_batches, pack_rollout, pack_samples, repad
from rollout.sync_member import SyncGroupMember
from rollout.turns import TakesTurns

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_NEW = 32


# --------------------------------------------------------------------------- helpers / fixtures


def sharpened_student(seed: int, scale: float = 10.0):
    """A random tiny MiMoV2Flash whose next-token distributions are far from uniform (lm_head
    scaled), so log-prob comparisons discriminate and some samples end with EOS."""
    model = load_model(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def make_cfg(student: ModelConfig, **rollout) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = student
    cfg.rollout.max_new_tokens = MAX_NEW
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


def prompts(k: int, domain: str = "math") -> list[PromptRow]:
    # Different lengths, so left padding is exercised.
    return [PromptRow(prompt=f"{i} + {i * 37} =" + " " * (i % 3), domain=domain, index=i) for i in range(k)]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    sharpened_student(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_actor(student_dir):
    from rollout.hf import HFRolloutActor

    return HFRolloutActor(make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)))


@pytest.fixture(scope="module")
def batch(hf_actor) -> RolloutBatch:
    return hf_actor.generate(prompts(8), n=4, seed=0)


def assert_layout(b: RolloutBatch, tokenizer) -> None:
    """The RolloutBatch layout contract (mopd/types.py), checked row by row."""
    P = b.prompt_len
    B, T = b.input_ids.shape
    assert b.response_mask[:, :P].sum() == 0, "response tokens inside the prompt columns"
    assert torch.equal(b.response_mask[:, P:], b.attention_mask[:, P:]), "every real column >= P is response"
    for i in range(B):
        prompt_real = b.attention_mask[i, :P]
        n_prompt = int(prompt_real.sum())
        assert prompt_real[P - n_prompt :].all() and not prompt_real[: P - n_prompt].any(), "prompt not left-padded"
        assert b.input_ids[i, P - n_prompt] == tokenizer.bos_token_id, "prompt does not start with BOS"
        expected = tokenizer(b.rows[i].prompt)["input_ids"]
        assert b.input_ids[i, P - n_prompt : P].tolist() == expected
        resp = b.response_mask[i, P:]
        n_resp = int(resp.sum())
        assert n_resp >= 1 and resp[:n_resp].all() and not resp[n_resp:].any(), "response not right-padded at P"
        tokens = b.input_ids[i, P : P + n_resp].tolist()
        assert tokenizer.eos_token_id not in tokens[:-1], "tokens after EOS inside the response"
        assert tokens[-1] == tokenizer.eos_token_id or n_resp == MAX_NEW
        assert b.truncated is not None and bool(b.truncated[i]) == (tokens[-1] != tokenizer.eos_token_id)
        assert (b.input_ids[i, P + n_resp :] == tokenizer.pad_token_id).all(), "nothing may follow the response"
        assert (b.rollout_logprobs[i][~b.response_mask[i]] == 0).all()
        assert (b.rollout_logprobs[i][b.response_mask[i]] <= 0).all()
        assert b.responses[i] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert b.domains[i] == b.rows[i].domain


# --------------------------------------------------------------------------- pure functions


def test_cut_at_stop_keeps_the_first_stop_token_and_drops_the_rest():
    assert cut_at_stop([5, 6, EOS_ID, 0, 0], [-1, -2, -3, -9, -9], {EOS_ID}) == (
        [5, 6, EOS_ID],
        [-1.0, -2.0, -3.0],
        True,
    )
    assert cut_at_stop([5, 6], [-1, -2], {EOS_ID}) == ([5, 6], [-1.0, -2.0], False)
    # Any id of the set ends the response (an end-of-turn id before EOS here).
    assert cut_at_stop([5, 9, 6, EOS_ID], [-1, -2, -3, -4], {EOS_ID, 9}) == ([5, 9], [-1.0, -2.0], True)
    # The stop id may be the pad id: the first occurrence ends the response and is kept.
    assert cut_at_stop([5, PAD_ID, PAD_ID], [-1, -2, -9], {PAD_ID}) == ([5, PAD_ID], [-1.0, -2.0], True)


def test_pack_rollout_layout():
    rows = [PromptRow("a", "math"), PromptRow("b", "code")]
    b = pack_rollout(
        prompts=[[BOS_ID, 7, 8], [BOS_ID, 9]],
        responses=[[10, EOS_ID], [11, 12, 13]],
        logprobs=[[-0.5, -0.25], [-1.0, -2.0, -3.0]],
        group_ids=[0, 1],
        rows=rows,
        texts=["x", "y"],
        pad_id=PAD_ID,
        policy_version=7,
    )
    assert b.prompt_len == 3 and b.input_ids.shape == (2, 6)
    assert b.input_ids.tolist() == [[1, 7, 8, 10, 2, 0], [0, 1, 9, 11, 12, 13]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert b.rollout_logprobs.tolist() == [[0, 0, 0, -0.5, -0.25, 0], [0, 0, 0, -1, -2, -3]]
    assert b.domains == ["math", "code"] and b.policy_version == 7


def test_repad_moves_prompt_right_and_response_to_new_p():
    t = torch.tensor([[0, 1, 5, 6, 0]])  # P = 2: prompt [0, 1], response [5, 6, 0]
    assert repad(t, P=2, new_P=4, new_R=4, fill=9).tolist() == [[9, 9, 0, 1, 5, 6, 0, 9]]
    with pytest.raises(ValueError, match="grow"):
        repad(t, P=2, new_P=1, new_R=3, fill=0)


def _toy_batch(prompt_lens, resp_lens, version=0, domain="math"):
    k = len(prompt_lens)
    return pack_rollout(
        prompts=[[BOS_ID] + [10 + i] * (p - 1) for i, p in enumerate(prompt_lens)],
        responses=[[20 + i] * (r - 1) + [EOS_ID] for i, r in enumerate(resp_lens)],
        logprobs=[[-0.1 * (i + 1)] * r for i, r in enumerate(resp_lens)],
        group_ids=[i // 2 for i in range(k)],
        rows=[PromptRow(f"p{i}", domain) for i in range(k)],
        texts=[f"r{i}" for i in range(k)],
        pad_id=PAD_ID,
        policy_version=version,
    )


def _real_tokens(b: RolloutBatch, i: int):
    return b.input_ids[i][b.attention_mask[i]].tolist(), b.rollout_logprobs[i][b.response_mask[i]].tolist()


def test_merge_batches_repads_keeps_order_and_offsets_groups():
    a = _toy_batch([2, 3, 2, 2], [4, 1, 2, 2], domain="math")  # groups 0 0 1 1, P 3, R 4
    b = _toy_batch([5, 1], [2, 6], domain="code")  # groups 0 0, P 5, R 6
    merged = merge_batches([a, b], pad_id=PAD_ID)
    assert merged.prompt_len == 5 and merged.input_ids.shape == (6, 11)
    assert merged.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert merged.domains == ["math"] * 4 + ["code"] * 2
    assert [r.prompt for r in merged.rows] == ["p0", "p1", "p2", "p3", "p0", "p1"]
    for src, offset in ((a, 0), (b, 4)):
        for i in range(len(src)):
            assert _real_tokens(merged, offset + i) == _real_tokens(src, i)
    # The merged batch satisfies the layout contract on its own.
    assert merged.response_mask[:, :5].sum() == 0
    assert torch.equal(merged.response_mask[:, 5:], merged.attention_mask[:, 5:])


def test_merge_batches_rejects_mixed_policy_versions():
    with pytest.raises(ValueError, match="policy versions"):
        merge_batches([_toy_batch([2], [2], version=1), _toy_batch([2], [2], version=2)], pad_id=PAD_ID)


def test_split_evenly():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_evenly(1, 3) == [(0, 1)]  # fewer prompts than replicas: idle replicas get nothing
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    sizes = [b - a for a, b in split_evenly(10, 4)]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- HF actor


def test_hf_layout_eos_and_groups(hf_actor, batch):
    assert len(batch) == 32 and batch.policy_version == 0
    assert batch.group_ids.tolist() == [i // 4 for i in range(32)]
    assert [r.index for r in batch.rows] == [i // 4 for i in range(32)]
    assert_layout(batch, hf_actor.tokenizer)
    lengths = batch.response_mask.sum(1)
    ended = [row for row in range(len(batch)) if batch.input_ids[row, batch.prompt_len + lengths[row] - 1] == EOS_ID]
    assert 0 < len(ended) < len(batch), "the sharpened student should stop early on some samples, not all"
    assert (lengths <= MAX_NEW).all() and (lengths == MAX_NEW).any()


def test_hf_rollout_logprobs_equal_teacher_forced_at_temperature_1(hf_actor, batch):
    """Temperature 1, top-p 1: the recorded log-probs are the model's own (KV-cached sampling vs
    one full forward differ only by float summation order)."""
    ref = sequence_logprobs(hf_actor.model, batch.input_ids, batch.attention_mask)
    m = batch.response_mask
    torch.testing.assert_close(batch.rollout_logprobs[m], ref[m], atol=1e-4, rtol=0)


def test_hf_rollout_logprobs_are_those_sampled_from_at_temperature(student_dir):
    """Regression guard: generate's default top_k=50 must not filter; temperature must be applied."""
    from rollout.hf import HFRolloutActor

    actor = HFRolloutActor(make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER), temperature=0.7))
    b = actor.generate(prompts(4), n=2, seed=1)
    logits = forward_logits(actor.model, b.input_ids, b.attention_mask).logits[:, :-1].float()
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    m = b.response_mask[:, 1:]
    torch.testing.assert_close(b.rollout_logprobs[:, 1:][m], ref[m], atol=1e-4, rtol=0)


def greedy_gaps(model, b: RolloutBatch) -> torch.Tensor:
    """Teacher-forced, for every response token: how far (in log-prob) it falls below the argmax of
    ``model``'s distribution at its position (0 for an argmax token)."""
    with torch.no_grad():
        logits = forward_logits(model, b.input_ids, b.attention_mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1)
    chosen = lp.gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    return (lp.max(-1).values - chosen)[b.response_mask[:, 1:]]


def nucleus_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_p: float) -> torch.Tensor:
    """log-prob of ``tokens`` after nucleus filtering (smallest set of most likely tokens whose mass
    reaches top_p, renormalised); -inf for a token outside the nucleus."""
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = logits.masked_fill(~keep, -math.inf)
    return torch.log_softmax(filtered, -1).gather(-1, tokens[..., None]).squeeze(-1)


def test_hf_rollout_logprobs_with_top_p_are_renormalised_over_the_nucleus(student_dir):
    from rollout.hf import HFRolloutActor

    actor = HFRolloutActor(make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER), top_p=0.8))
    b = actor.generate(prompts(4), n=2, seed=2)
    logits = forward_logits(actor.model, b.input_ids, b.attention_mask).logits[:, :-1].float()
    ref = nucleus_logprobs(logits, b.input_ids[:, 1:], top_p=0.8)
    m = b.response_mask[:, 1:]
    torch.testing.assert_close(b.rollout_logprobs[:, 1:][m], ref[m], atol=1e-4, rtol=0)
    full = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    assert (b.rollout_logprobs[:, 1:][m] > full[m] + 1e-6).any(), "top-p should have renormalised something"


def test_hf_sampling_is_deterministic_per_seed(hf_actor, batch):
    again = hf_actor.generate(prompts(8), n=4, seed=0)
    assert torch.equal(again.input_ids, batch.input_ids)
    assert torch.equal(again.rollout_logprobs, batch.rollout_logprobs)
    other = hf_actor.generate(prompts(8), n=4, seed=1)
    assert not torch.equal(other.input_ids[:, other.prompt_len :], batch.input_ids[:, batch.prompt_len :])


def test_hf_greedy_takes_the_argmax_and_records_temperature_1_logprobs(student_dir):
    """Evaluation path (the loop calls generate(..., greedy=True)): temperature / top-p ignored."""
    from rollout.hf import HFRolloutActor

    spec = ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)
    actor = HFRolloutActor(make_cfg(spec, temperature=0.7, top_p=0.8))
    b = actor.generate(prompts(4), n=1, seed=0, greedy=True)
    assert_layout(b, actor.tokenizer)
    assert torch.equal(actor.generate(prompts(4), n=1, seed=9, greedy=True).input_ids, b.input_ids)
    # KV-cached decoding and this full forward agree to 1e-4 in log-prob (see the assert_close
    # below), so each greedy token is within 2e-4 of the full forward's argmax; a near-tie may flip.
    assert float(greedy_gaps(actor.model, b).max()) <= 2e-4
    logits = forward_logits(actor.model, b.input_ids, b.attention_mask).logits[:, :-1].float()
    m = b.response_mask[:, 1:]
    ref = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(b.rollout_logprobs[:, 1:][m], ref[m], atol=1e-4, rtol=0)


def test_hf_load_weights_switches_policy_and_version(student_dir):
    from rollout.hf import HFRolloutActor

    actor = HFRolloutActor(make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)))
    new = sharpened_student(seed=1, scale=8.0)
    actor.load_weights(new.state_dict(), version=3)
    assert actor.version() == 3
    b = actor.generate(prompts(4), n=2, seed=0)
    assert b.policy_version == 3
    ref = sequence_logprobs(new, b.input_ids, b.attention_mask)
    m = b.response_mask
    torch.testing.assert_close(b.rollout_logprobs[m], ref[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(actor.logprobs(b.input_ids, b.attention_mask)[m], ref[m], atol=1e-5, rtol=0)


def test_inline_student_equals_trainer_initial_weights():
    """The actor builds an inline-config student with load_model(cfg.student, seed=cfg.run.seed),
    exactly as the trainer does, so version 0 needs no weight sync."""
    from rollout.hf import HFRolloutActor

    cfg = make_cfg(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER))
    cfg.run.seed = 5
    actor = HFRolloutActor(cfg)
    trainer_side = load_model(cfg.student, seed=5).state_dict()
    for name, tensor in actor.model.state_dict().items():
        assert torch.equal(tensor, trainer_side[name]), name


# --------------------------------------------------------------------------- pool


def test_local_pool_generate_sync_and_logprobs(student_dir):
    from rollout.pool import RolloutPool

    pool = RolloutPool(make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)), local=True)
    try:
        b = pool.generate(prompts(3), n=2, seed=0)
        assert len(b) == 6 and b.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
        assert_layout(b, build_char_tokenizer())
        new = sharpened_student(seed=2)
        pool.sync_weights(new.state_dict(), version=1)
        assert pool.versions() == [1]
        ref = sequence_logprobs(new, b.input_ids, b.attention_mask)
        got = pool.logprobs(b.input_ids, b.attention_mask)
        torch.testing.assert_close(got[b.response_mask], ref[b.response_mask], atol=1e-5, rtol=0)
    finally:
        pool.shutdown()


def test_pool_rejects_unknown_backend():
    from rollout.backend import actor_class
    from rollout.pool import RolloutPool

    with pytest.raises(ValueError, match="^rollout.backend is 'sglang'; valid: hf, vllm$"):
        actor_class("sglang")
    cfg = make_cfg(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER), backend="sglang")
    with pytest.raises(ValueError, match="valid: hf, vllm"):
        RolloutPool(cfg, local=True)


class EchoRolloutActor(TakesTurns, SyncGroupMember):
    """A third backend in a few lines: every sample is the prompt's last token, then EOS."""

    built: list[EchoRolloutActor] = []

    def __init__(self, cfg: MOPDConfig, replica: int = 0) -> None:
        self.tokenizer, self.replica, self._version, self.stopped = build_char_tokenizer(), replica, 0, False
        self.built.append(self)

    @staticmethod
    def backend_env(num_gpus: float) -> dict[str, str]:
        return {}

    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch:
        prompts = encode_prompts(self.tokenizer, rows)
        samples = [([p[-1], EOS_ID], [-1.0, -2.0]) for p in prompts for _ in range(n)]
        return pack_samples(self.tokenizer, prompts, rows, samples, n, self._version, [EOS_ID])

    def takes_adapter(self) -> bool:
        return False

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self._version = int(version)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input_ids.shape)

    def _release(self) -> None:
        pass

    def _restore(self) -> None:
        pass

    def version(self) -> int:
        return self._version

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def shutdown(self) -> None:
        self.stopped = True


def test_backend_table_lists_the_configured_backends_and_their_classes_have_the_contract():
    """``ROLLOUT_BACKENDS`` is the code's list; ``Backend`` in mopd/config.py (the recipe schema, which
    the core cannot take from the workers) must name the same. Every entry resolves to a class
    with every method of ``RolloutWorker`` (mypy checks their signatures)."""
    from mopd.config import BACKENDS
    from rollout.backend import ROLLOUT_BACKENDS, RolloutWorker, actor_class

    assert set(ROLLOUT_BACKENDS) == set(BACKENDS) == {"hf", "vllm"}
    contract = [m for m in vars(RolloutWorker) if not m.startswith("_")]
    assert {"generate", "load_weights", "receive_weights", "sleep", "backend_env"} <= set(contract)
    for name in ROLLOUT_BACKENDS:
        cls = actor_class(name)
        assert isinstance(cls, type)
        assert [m for m in contract if not callable(getattr(cls, m, None))] == [], name


def test_a_backend_in_the_table_is_what_the_pool_builds(monkeypatch):
    """A new backend joins with one line in ``ROLLOUT_BACKENDS``: the pool builds it by name."""
    from rollout.backend import ROLLOUT_BACKENDS
    from rollout.pool import RolloutPool

    monkeypatch.setitem(ROLLOUT_BACKENDS, "echo", f"{__name__}:EchoRolloutActor")
    monkeypatch.setattr(EchoRolloutActor, "built", [])
    cfg = make_cfg(ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER), backend="echo")
    with RolloutPool(cfg, local=True) as pool:
        [echo] = EchoRolloutActor.built
        b = pool.generate(prompts(3), n=2, seed=0)
        assert b.input_ids.shape[0] == 6 and b.policy_version == 0
        P = b.prompt_len
        assert torch.equal(b.input_ids[:, P], b.input_ids[:, P - 1]) and bool((b.input_ids[:, P + 1] == EOS_ID).all())
        pool.sync_weights({}, version=3)
        pool.sleep()
        assert pool.versions() == [3] and pool.asleep() == [True]
        pool.wake()
    assert echo.stopped


@pytest.mark.slow
def test_ray_pool_with_two_replicas(student_dir):
    """Two HF actors: prompts split 3/2, one merged batch in the original order, weights synced
    to both, log-probs from replica 0."""
    import ray

    from rollout.pool import RolloutPool

    cfg = make_cfg(ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER), replicas=2)
    cfg.rollout.resources.num_cpus = 1
    ray.init(num_cpus=2, include_dashboard=False, namespace="test-rollout")
    try:
        pool = RolloutPool(cfg)
        rows = prompts(5)
        b = pool.generate(rows, n=2, seed=0)
        assert len(b) == 10 and b.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert [r.index for r in b.rows] == [i // 2 for i in range(10)]
        assert_layout(b, build_char_tokenizer())
        same = pool.generate(rows, n=2, seed=0)
        assert torch.equal(same.input_ids, b.input_ids)

        new = sharpened_student(seed=3)
        pool.sync_weights(new.state_dict(), version=4)
        assert pool.versions() == [4, 4]
        after = pool.generate(rows, n=2, seed=0)
        assert after.policy_version == 4
        ref = sequence_logprobs(new, after.input_ids, after.attention_mask)
        m = after.response_mask
        torch.testing.assert_close(after.rollout_logprobs[m], ref[m], atol=1e-4, rtol=0)
        torch.testing.assert_close(pool.logprobs(after.input_ids, after.attention_mask)[m], ref[m], atol=1e-5, rtol=0)
        pool.shutdown()
    finally:
        ray.shutdown()
