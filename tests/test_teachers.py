"""Teacher side: HF scoring against the shared log-prob helpers, routing / splitting / reassembly
(pure, no Ray), the pool's start-up checks, and one end-to-end run with Ray actors (slow).

    OMP_NUM_THREADS=1 pytest tests/test_teachers.py            # everything, ~1 min on 2 cores
    OMP_NUM_THREADS=1 pytest tests/test_teachers.py -m "not slow"
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, ResourcesConfig, TeacherConfig
from mopd.models import (
    build_char_tokenizer,
    forward_logits,
    load_model,
    sequence_logprobs,
    tiny_mimo_config,
)
from mopd.types import PromptRow, RolloutBatch, TeacherScores
from mopd.vocab import VocabularyMismatchError, tokenizer_signature
from teachers.common import active_columns, row_span
from teachers.hf import HFTeacherWorker
from teachers.pool import (
    Shard,
    TeacherPool,
    TeacherScoreError,
    assemble_scores,
    domain_metrics,
    group_rows,
    plan_shards,
)

# Same math as mopd.models, other chunk shapes (and kernels): float32 summation order only. Log-probs
# here are ~-5 (ulp 5e-7): a few ulps apart is rounding; a wrong row or teacher is off by > 1e-3.
ATOL = 1e-5

PROMPTS = ["1+2=", "hello wor", "what is 12*12? think step by step, then answer:", "a", "x=3;y=", "q"]
RESPONSES = ["3", "ld, again and again", "144", "bcdefghij klmnop qrstuv wxyz 0123", "4", ""]


# --------------------------------------------------------------------------- helpers


def teacher_cfg(batch_size: int = 4, num_cpus: float = 1.0, **model) -> TeacherConfig:
    """A tiny MiMoV2Flash teacher with the char tokenizer."""
    return TeacherConfig(
        config=tiny_mimo_config(**model),
        tokenizer=BUILTIN_TOKENIZER,
        batch_size=batch_size,
        resources=ResourcesConfig(num_cpus=num_cpus),
    )


def make_batch(prompts, responses, domains) -> RolloutBatch:
    """A RolloutBatch in the project layout: prompts (BOS + chars) left-padded to P columns,
    responses (chars + EOS, or nothing for an empty string) right-padded from column P."""
    tok = build_char_tokenizer()
    enc_p = [tok(p)["input_ids"] for p in prompts]
    enc_r = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if r else [] for r in responses]
    B, P, R = len(prompts), max(map(len, enc_p)), max(map(len, enc_r))
    ids = torch.full((B, P + R), tok.pad_token_id, dtype=torch.int64)
    am = torch.zeros(B, P + R, dtype=torch.bool)
    rm = torch.zeros(B, P + R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(enc_p, enc_r, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        am[i, P - len(p) : P] = True
        ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.int64)
        am[i, P : P + len(r)] = rm[i, P : P + len(r)] = True
    return RolloutBatch(
        input_ids=ids,
        attention_mask=am,
        response_mask=rm,
        rollout_logprobs=torch.zeros(B, P + R),
        group_ids=torch.arange(B),
        domains=list(domains),
        rows=[PromptRow(prompt=p, domain=d) for p, d in zip(prompts, domains, strict=True)],
        responses=list(responses),
        policy_version=0,
        prompt_len=P,
    )


def reference_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """(B, T) log-probs from the shared helper on the whole batch, zeroed outside the response."""
    lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch_size=len(batch))
    return torch.where(batch.response_mask, lp, 0.0)


def reference_full_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """(B, T, V) log-probs of every vocabulary entry from the full log_softmax; position t holds
    the distribution of token t (logits at t - 1)."""
    with torch.no_grad():
        logits = forward_logits(model, batch.input_ids, batch.attention_mask).logits
    lp = torch.log_softmax(logits.float(), -1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp[:, :-1]], 1)


def assert_topk_of(
    ids: torch.Tensor, vals: torch.Tensor, ref_full: torch.Tensor, mask: torch.Tensor, atol: float
) -> None:
    """``ids`` / ``vals`` (B, T, k) are a top-k of the reference log-probs ``ref_full`` (B, T, V) at
    the ``mask`` positions, up to float rounding: ``vals`` are the k largest reference values in
    order, and ``ids`` are k distinct tokens whose reference log-probs are ``vals``. Ids are not
    compared with the reference's own: tokens whose log-probs lie within rounding of each other
    (at most a few ulps apart) may come in either order, or either may take the k-th place."""
    k = ids.shape[-1]
    torch.testing.assert_close(vals[mask], ref_full.topk(k, dim=-1).values[mask], atol=atol, rtol=0)
    torch.testing.assert_close(ref_full.gather(-1, ids)[mask], vals[mask], atol=atol, rtol=0)
    picked = ids[mask].sort(dim=-1).values
    assert bool((picked[:, 1:] != picked[:, :-1]).all()), "a token appears twice in a top-k"


@pytest.fixture(scope="module")
def batch() -> RolloutBatch:
    return make_batch(PROMPTS, RESPONSES, ["math"] * len(PROMPTS))


@pytest.fixture(scope="module")
def worker() -> HFTeacherWorker:
    # batch_size 4 < 6 rows: two chunks, each trimmed to its own columns.
    return HFTeacherWorker("math", teacher_cfg(batch_size=4), seed=0, set_threads=False)


# --------------------------------------------------------------------------- HF worker


def test_hf_score_matches_sequence_logprobs(worker, batch):
    s = worker.score(batch.input_ids, batch.attention_mask, batch.response_mask)
    ref = reference_logprobs(worker.model, batch)
    assert s.logprobs.dtype == torch.float32 and s.logprobs.shape == batch.input_ids.shape
    assert torch.allclose(s.logprobs, ref, atol=ATOL, rtol=0)
    assert bool((s.logprobs[~batch.response_mask] == 0).all())
    assert bool((s.logprobs[batch.response_mask] < 0).all())
    assert s.topk_ids is None and s.latency_s > 0


def test_hf_topk_matches_torch_topk(worker, batch):
    k = 5
    s = worker.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=k)
    rm = batch.response_mask
    assert s.topk_ids.shape == (*rm.shape, k) and s.topk_ids.dtype == torch.int64
    # A top-k of the reference distribution up to rounding (near-tied tokens may swap: see assert_topk_of).
    assert_topk_of(s.topk_ids, s.topk_logprobs, reference_full_logprobs(worker.model, batch), rm, ATOL)
    assert bool((s.topk_ids[~rm] == 0).all()) and bool((s.topk_logprobs[~rm] == 0).all())
    # The sampled-token scores are unchanged by asking for top-k.
    assert torch.allclose(s.logprobs, reference_logprobs(worker.model, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_hf_token_budget_groups_rows_by_length_with_the_same_scores(worker, batch, packed):
    """teachers.<d>.max_tokens_per_batch: rows go through the model grouped by length under the
    budget (here the three longest rows alone, the three short ones together, instead of 4 + 2
    rows in order; packed without padding, by real tokens: 30 + 9 + 7 + 2 in one pass); the scores
    and top-k equal the row-chunk path's up to float rounding, each row at its own place."""
    budgeted = HFTeacherWorker("math", teacher_cfg(batch_size=4), seed=0, set_threads=False)
    budgeted.cfg.max_tokens_per_batch = 50
    budgeted.cfg.pack_sequences = packed
    passes = budgeted._passes(batch.attention_mask)
    assert [p.tolist() for p in passes] == ([[2], [3], [0, 1, 4, 5]] if packed else [[2], [3], [1], [0, 4, 5]])
    k = 5
    got = budgeted.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=k)
    ref = worker.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=k)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=ATOL, rtol=0)
    full = reference_full_logprobs(worker.model, batch)
    assert_topk_of(got.topk_ids, got.topk_logprobs, full, batch.response_mask, ATOL)


def test_hf_rows_without_response_or_tokens_score_zero(worker):
    b = make_batch(["ab", "cd"], ["", "e"], ["math", "math"])
    am = b.attention_mask.clone()
    am[0] = False  # a row with no tokens at all
    ids = torch.where(am, b.input_ids, 0)
    s = worker.score(ids, am, b.response_mask & am)
    assert bool((s.logprobs[0] == 0).all()) and bool((s.logprobs[1][b.response_mask[1]] < 0).all())


def test_hf_score_rejects_bad_inputs(worker, batch):
    with pytest.raises(TypeError, match="attention_mask"):
        worker.score(batch.input_ids, batch.attention_mask.long(), batch.response_mask)
    with pytest.raises(ValueError, match="response_mask marks tokens"):
        worker.score(batch.input_ids, batch.attention_mask & ~batch.response_mask, batch.response_mask)


def test_padding_helpers():
    am = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert active_columns(am) == slice(1, 5)
    assert active_columns(torch.zeros(2, 3, dtype=torch.bool)) is None
    assert row_span(am[0]) == (2, 4) and row_span(torch.zeros(3, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="hole"):
        row_span(torch.tensor([1, 0, 1], dtype=torch.bool))


# --------------------------------------------------------------------------- routing (pure)


def test_unknown_domain_names_configured_teachers():
    with pytest.raises(ValueError) as e:
        group_rows(["math", "law"], ["math", "code"])
    assert str(e.value) == "no teacher for domain 'law'; configured teachers: code, math"


def test_plan_shards_covers_every_row_once():
    domains = ["code", "math", "math", "code", "math", "math", "math"]
    shards = plan_shards(domains, {"math": 2, "code": 3, "safety": 1})
    rows = sorted(r for s in shards for r in s.rows)
    assert rows == list(range(len(domains)))
    assert all(domains[r] == s.domain for s in shards for r in s.rows)
    assert [len(s.rows) for s in shards if s.domain == "math"] == [3, 2]
    assert [len(s.rows) for s in shards if s.domain == "code"] == [1, 1]  # 2 rows, 3 replicas: no empty call
    assert [(s.domain, s.replica, s.rows) for s in shards] == [
        ("code", 0, [0]), ("code", 1, [3]), ("math", 0, [1, 2, 4]), ("math", 1, [5, 6]),
    ]  # fmt: skip


def fake_scores(rows, num_cols: int, k: int = 0) -> TeacherScores:
    """Scores whose every value is the batch row index it belongs to (to check reassembly)."""
    lp = torch.tensor(rows, dtype=torch.float32)[:, None].expand(-1, num_cols).clone()
    if not k:
        return TeacherScores(logprobs=lp, latency_s=0.1 * len(rows))
    return TeacherScores(
        lp, lp.long()[..., None].expand(-1, -1, k).clone(), lp[..., None].expand(-1, -1, k).clone(), 0.1
    )


def test_assemble_scores_restores_batch_order():
    domains = ["math", "code", "math", "code", "math"]
    shards = plan_shards(domains, {"math": 2, "code": 1})
    results = [fake_scores(s.rows, 3, k=2) for s in shards]
    out = assemble_scores(shards, results, num_rows=5, num_cols=3, topk=2)
    assert torch.equal(out.logprobs[:, 0], torch.arange(5.0))
    assert torch.equal(out.topk_ids[:, 1, 1], torch.arange(5))
    m = domain_metrics(shards, results)
    assert m["teacher/math/rows"] == 3 and m["teacher/code/rows"] == 2
    assert m["teacher/math/latency_s"] == pytest.approx(0.1)


def test_fewer_scores_than_rows_is_an_error():
    shard = Shard("math", 1, [0, 2, 4])
    with pytest.raises(
        TeacherScoreError, match=r"teacher 'math' \(replica 1\) returned scores for 2 rows but was sent 3"
    ):
        assemble_scores([shard], [fake_scores([0, 2], 3)], num_rows=5, num_cols=3)
    with pytest.raises(TeacherScoreError, match="columns"):
        assemble_scores([shard], [fake_scores([0, 2, 4], 2)], num_rows=5, num_cols=3)
    with pytest.raises(TeacherScoreError, match="top-k scores missing"):
        assemble_scores([shard], [fake_scores([0, 2, 4], 3)], num_rows=5, num_cols=3, topk=4)


# --------------------------------------------------------------------------- pool (in-process)

SEEDS = {"math": 1, "code": 2}


@pytest.fixture(scope="module")
def student_sig():
    return tokenizer_signature(build_char_tokenizer(), tiny_mimo_config()["vocab_size"])


@pytest.fixture(scope="module")
def local_pool(student_sig):
    teachers = {"math": teacher_cfg(batch_size=2), "code": teacher_cfg(batch_size=3)}
    pool = TeacherPool(teachers, SEEDS, student_tokenizer_signature=student_sig, local=True)
    yield pool
    pool.shutdown()


def mixed_batch() -> RolloutBatch:
    """Domains interleaved and out of order, so reassembly has to undo the grouping."""
    domains = ["code", "math", "math", "code", "math", "code"]
    return make_batch(PROMPTS, RESPONSES, domains)


def test_pool_scores_each_row_with_its_domain_teacher(local_pool):
    b = mixed_batch()
    scores, metrics = local_pool.score(b, topk=3)
    for d in ("math", "code"):
        model = local_pool.worker(d).model
        rows = [i for i, x in enumerate(b.domains) if x == d]
        ref = reference_logprobs(model, b)[rows]
        assert torch.allclose(scores.logprobs[rows], ref, atol=ATOL, rtol=0), d
        rm = b.response_mask[rows]
        # Near-tied tokens may swap between chunked scoring and the reference (see assert_topk_of).
        ref_full = reference_full_logprobs(model, b)[rows]
        assert_topk_of(scores.topk_ids[rows], scores.topk_logprobs[rows], ref_full, rm, ATOL)
    # The two teachers really differ (different seeds), so a routing mix-up would show.
    other = reference_logprobs(local_pool.worker("math").model, b)
    assert not torch.allclose(scores.logprobs[0], other[0], atol=1e-3)
    assert metrics["teacher/math/rows"] == 3 and metrics["teacher/code/rows"] == 3
    assert metrics["teacher/math/latency_s"] > 0 and set(metrics) == {
        "teacher/math/rows",
        "teacher/code/rows",
        "teacher/math/latency_s",
        "teacher/code/latency_s",
    }


def test_pool_rejects_domain_without_teacher(local_pool):
    b = make_batch(["1+1=", "x"], ["2", "y"], ["math", "law"])
    with pytest.raises(ValueError, match="^no teacher for domain 'law'; configured teachers: code, math$"):
        local_pool.score(b)


def test_pool_rejects_short_results(local_pool, monkeypatch):
    """A worker that drops rows must fail the step, never shift scores onto other rows."""
    worker = local_pool.worker("code")
    real = worker.score

    def drop_last_row(ids, am, rm, topk=0):
        s = real(ids, am, rm, topk)
        return TeacherScores(logprobs=s.logprobs[:-1], latency_s=s.latency_s)

    monkeypatch.setattr(worker, "score", drop_last_row)
    with pytest.raises(
        TeacherScoreError, match=r"teacher 'code' \(replica 0\) returned scores for 2 rows but was sent 3"
    ):
        local_pool.score(mixed_batch())


def test_pool_rejects_teacher_with_padded_vocab(student_sig):
    teachers = {"math": teacher_cfg(), "code": teacher_cfg(vocab_size=256)}
    with pytest.raises(VocabularyMismatchError) as e:
        TeacherPool(teachers, 0, student_tokenizer_signature=student_sig, local=True)
    msg = str(e.value)
    assert "teacher 'code' vs the student: model_vocab_size: 256 vs 128" in msg and "'math'" not in msg


def test_pool_rejects_teacher_with_other_tokenizer(student_sig, tmp_path):
    tok = build_char_tokenizer()
    tok.add_tokens(["<think>"])
    tok.save_pretrained(tmp_path)
    cfg = teacher_cfg()
    cfg.tokenizer = str(tmp_path)
    with pytest.raises(
        VocabularyMismatchError, match=r"teacher 'math' vs the student: tokenizer_vocab_size: 100 vs 99; vocab_hash"
    ):
        TeacherPool({"math": cfg}, 0, student_tokenizer_signature=student_sig, local=True)


def test_pool_without_student_signature_compares_teachers():
    with pytest.raises(VocabularyMismatchError, match="teacher 'math' vs teacher 'code': model_vocab_size: 256 vs 128"):
        TeacherPool({"code": teacher_cfg(), "math": teacher_cfg(vocab_size=256)}, 0, local=True)


def test_tokenizer_signature_fields(student_sig):
    assert student_sig["tokenizer_vocab_size"] == 99 and student_sig["model_vocab_size"] == 128
    assert student_sig["special_token_ids"] == {"bos": 1, "eos": 2, "pad": 0, "unk": 0}
    assert tokenizer_signature(build_char_tokenizer(), 128) == student_sig  # deterministic


def test_package_import_is_light():
    code = (
        "import sys, teachers; "
        "assert not {'ray', 'vllm', 'transformers', 'torch'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- backends (teachers/backend.py)


class ConstantTeacherWorker:
    """A third backend in a few lines: log-prob -1 at every response token, nothing else."""

    def __init__(self, name: str, cfg: TeacherConfig, seed: int, *, max_logprobs: int, set_threads: bool = True):
        self.name, self.seed, self.max_logprobs, self.set_threads = name, seed, max_logprobs, set_threads
        self.stopped = False

    @staticmethod
    def backend_env(num_gpus: float) -> dict[str, str]:
        return {}

    def vocab_signature(self) -> dict:
        return tokenizer_signature(build_char_tokenizer(), tiny_mimo_config()["vocab_size"])  # the HF teachers'

    def score(self, input_ids, attention_mask, response_mask, topk: int = 0) -> TeacherScores:
        return TeacherScores(logprobs=torch.where(response_mask, -1.0, 0.0))

    def shutdown(self) -> None:
        self.stopped = True


def test_backend_table_lists_the_configured_backends_and_their_classes_have_the_contract():
    """``TEACHER_BACKENDS`` is the code's list; ``TeacherBackendName`` in mopd/config.py (the recipe
    schema, which the core cannot take from the workers) must name the same. Every entry resolves to
    a class with every method of ``TeacherWorker`` (mypy checks their signatures)."""
    from mopd.config import TEACHER_BACKEND_NAMES
    from teachers.backend import TEACHER_BACKENDS, TeacherWorker, worker_class

    assert set(TEACHER_BACKENDS) == set(TEACHER_BACKEND_NAMES) == {"hf", "vllm", "remote"}
    contract = [m for m in vars(TeacherWorker) if not m.startswith("_")]
    assert {"score", "vocab_signature", "shutdown", "backend_env"} <= set(contract)
    for name in TEACHER_BACKENDS:
        cls = worker_class(name)
        assert isinstance(cls, type)
        assert [m for m in contract if not callable(getattr(cls, m, None))] == [], name


def test_unknown_teacher_backend_names_the_valid_ones():
    from teachers.backend import worker_class

    with pytest.raises(ValueError, match="^unknown teacher backend 'trt'; valid: hf, vllm, remote$"):
        worker_class("trt")
    cfg = teacher_cfg()
    cfg.backend = "trt"  # past validate, as a hand-built config can be
    with pytest.raises(ValueError, match="valid: hf, vllm"):
        TeacherPool({"math": cfg}, 0, local=True)


def test_a_backend_in_the_table_is_what_the_pool_builds(monkeypatch):
    """A new backend joins with one line in ``TEACHER_BACKENDS``: the pool builds it by name, with
    the common constructor, and routes rows to it."""
    from teachers.backend import TEACHER_BACKENDS

    monkeypatch.setitem(TEACHER_BACKENDS, "constant", f"{__name__}:ConstantTeacherWorker")
    cfg = teacher_cfg()
    cfg.backend = "constant"
    pool = TeacherPool({"math": cfg, "code": teacher_cfg()}, SEEDS, local=True, max_topk=7)
    try:
        fake = pool.worker("math")
        assert isinstance(fake, ConstantTeacherWorker) and isinstance(pool.worker("code"), HFTeacherWorker)
        assert (fake.name, fake.seed, fake.max_logprobs, fake.set_threads) == ("math", SEEDS["math"], 7, False)
        b = mixed_batch()
        scores, _ = pool.score(b)
        rows = [i for i, d in enumerate(b.domains) if d == "math"]
        assert torch.equal(scores.logprobs[rows], torch.where(b.response_mask[rows], -1.0, 0.0))
    finally:
        pool.shutdown()
    assert fake.stopped


# --------------------------------------------------------------------------- vLLM helpers (no engine)


def test_vllm_config_overrides_for_mimo():
    from mopd.dist.vllm_compat import vllm_config_overrides

    cfg = tiny_mimo_config()
    o = vllm_config_overrides(cfg)
    assert o["hybrid_layer_pattern"] == [0, 1, 1, 0] and o["moe_layer_freq"] == [0, 1, 1, 1]
    assert o["swa_num_key_value_heads"] == 2 * cfg["num_key_value_heads"] and o["sliding_window_size"] == 32
    assert vllm_config_overrides({**cfg, **o}) == {} and vllm_config_overrides({"model_type": "llama"}) == {}
    padded = vllm_config_overrides(cfg, pad_v=True)  # value heads padded to head_dim (vllm-cpu)
    assert padded == {**o, "v_head_dim": 32, "swa_v_head_dim": 32}
    assert vllm_config_overrides({**cfg, **o}, pad_v=True) == {"v_head_dim": 32, "swa_v_head_dim": 32}


def test_pad_value_heads_zero_pads_weight_bias_and_o_proj_columns():
    from mopd.dist.vllm_compat import pad_value_heads

    v = torch.randn(2 * 3, 5)  # 2 kv heads of v_dim 3, hidden 5
    b = torch.randn(2 * 3)
    o = torch.randn(5, 4 * 3)  # 4 heads
    p = "model.layers.0.self_attn."
    out = pad_value_heads({p + "v_proj.weight": v, p + "v_proj.bias": b, p + "o_proj.weight": o, "x": v}, 3, 4)
    assert out[p + "v_proj.weight"].shape == (8, 5) and out[p + "v_proj.bias"].shape == (8,)
    assert torch.equal(out[p + "v_proj.weight"].view(2, 4, 5)[:, :3], v.view(2, 3, 5))
    assert torch.equal(out[p + "v_proj.bias"].view(2, 4)[:, 3], torch.zeros(2))
    assert torch.equal(out[p + "o_proj.weight"].view(5, 4, 4)[..., :3], o.view(5, 4, 3))
    assert torch.equal(out[p + "o_proj.weight"].view(5, 4, 4)[..., 3], torch.zeros(5, 4)) and out["x"] is v


def test_actor_env_layers_extras_in_order():
    from mopd.dist.runtime import actor_env
    from mopd.dist.vllm_compat import VLLM_CPU_ENV

    base = {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert actor_env(2.5) == base and actor_env(0.5)["OMP_NUM_THREADS"] == "1"
    env = actor_env(2, VLLM_CPU_ENV, {"OMP_WAIT_POLICY": "ACTIVE", "X": "1"})
    assert env == {**base, **VLLM_CPU_ENV, "OMP_WAIT_POLICY": "ACTIVE", "X": "1"}


def test_padded_value_heads_leave_the_model_unchanged(tmp_path, batch):
    """vllm-cpu cannot run v_head_dim < head_dim; the teacher zero-pads value heads instead."""
    from transformers import AutoModelForCausalLM

    from teachers.vllm import prepare_model_dir

    cfg = teacher_cfg()  # v_head_dim 16, head_dim 32
    src = tmp_path / "src"
    load_model(cfg, seed=3).save_pretrained(src)
    (src / "extra.txt").write_text("kept")
    d = prepare_model_dir(
        TeacherConfig(path=str(src), tokenizer=BUILTIN_TOKENIZER), 0, str(tmp_path / "work"), pad_values=True
    )
    config = json.loads((tmp_path / "work" / "model" / "config.json").read_text())
    assert config["v_head_dim"] == 32 and config["hybrid_layer_pattern"] == [0, 1, 1, 0]
    assert (tmp_path / "work" / "model" / "extra.txt").is_symlink()
    padded = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
    original = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    assert torch.allclose(reference_logprobs(padded, batch), reference_logprobs(original, batch), atol=ATOL, rtol=0)
    # Without padding (GPU) only the config changes; a model that needs nothing is used in place.
    plain = TeacherConfig(path=str(tmp_path / "work" / "model"), tokenizer=BUILTIN_TOKENIZER)
    assert prepare_model_dir(plain, 0, str(tmp_path / "w2"), pad_values=True) == plain.path


def test_flat_logprobs_to_tensors():
    from mopd.dist.vllm_compat import check_cpu_support
    from teachers.vllm import flat_to_tensors

    # 3 tokens, k = 2: for positions 1 and 2, the token's own entry then the top 2 in rank order.
    flat = SimpleNamespace(
        start_indices=[0, 0, 3], token_ids=[5, 7, 5, 9, 9, 4], logprobs=[-2.0, -1.0, -2.0, -0.5, -0.5, -1.5]
    )
    lp, (ids, vals) = flat_to_tensors(flat, 3, 2)
    assert lp.tolist() == [0.0, -2.0, -0.5]
    assert ids.tolist() == [[0, 0], [7, 5], [9, 4]] and vals.tolist() == [[0, 0], [-1.0, -2.0], [-0.5, -1.5]]
    with pytest.raises(RuntimeError, match="expected 6"):
        flat_to_tensors(SimpleNamespace(start_indices=[], token_ids=[1], logprobs=[0.0]), 3, 2)
    with pytest.raises(ValueError, match="head sizes"):
        check_cpu_support({"hidden_size": 64, "num_attention_heads": 4})  # head 16


# --------------------------------------------------------------------------- Ray (slow)


@pytest.mark.extended  # default run: Ray teachers in test_train_e2e, replica split in the pure tests
def test_ray_pool_two_domains_two_replicas(student_sig):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        teachers = {d: teacher_cfg(batch_size=2, num_cpus=0.5) for d in ("math", "code")}
        for cfg in teachers.values():
            cfg.replicas = 2
        pool = TeacherPool(teachers, SEEDS, student_tokenizer_signature=student_sig)
        try:
            assert pool.replicas == {"code": 2, "math": 2}
            b = mixed_batch()
            scores, metrics = pool.score(b)
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
    for d in ("math", "code"):
        rows = [i for i, x in enumerate(b.domains) if x == d]
        ref = reference_logprobs(load_model(teachers[d], SEEDS[d]).eval(), b)[rows]
        assert torch.allclose(scores.logprobs[rows], ref, atol=ATOL, rtol=0), d
    assert metrics["teacher/math/rows"] == 3 and metrics["teacher/code/rows"] == 3
