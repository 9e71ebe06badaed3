"""Ulysses sequence parallelism (``trainer.sequence_parallel_size``, trainers/sequence_parallel.py).

In-process: the slicing of rows (compaction, shift, slice, back to the rows' layout), the exact
split of the MoE balance loss over slices, and the recipe checks of ``mopd validate``.

Two gloo ranks: two subprocesses of this file (``python tests/test_sequence_parallel.py rank ...``)
run the real ``TrainerWorker`` with world size 2, sequence-parallel size 2 (one data-parallel
shard) and ZeRO-2 or ZeRO-3, on a tiny Qwen3-MoE student (sdpa, 4 heads / 2 KV heads, 8 experts top-2, the
balance loss on, routing replay), rows with left-padded prompts and right-padded responses, 5 rows
in micro-batches of 2 (the last one padded with an empty row). Meanwhile this process runs the same
calls on a one-rank ``TrainerWorker`` (the same ZeRO stage). Checked, in fp32: ``logprobs()``, then ``train_step`` with
the top-k objective and with the sampled one (plus the GRPO advantage), then ``sft_step``: their
metrics and the gradients each step applies (read before the optimizer step) equal the one rank's.
The learning rate is tiny (1e-8) so that the steps do not move the weights apart (Adam's first step
moves every weight by ~lr whatever its gradient's size: float noise would become a visible change).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mopd.config import ConfigError, ModelConfig, MOPDConfig, load_config, validate  # noqa: E402
from trainers.sequence_parallel import (  # noqa: E402
    balance_parts,
    balance_share,
    owned_tokens,
    shard_sequence,
    slice_counts,
)

SP = 2
TINY = ROOT / "recipes" / "tiny.yaml"
# tests/test_routing.py's tiny Qwen3-MoE (4 heads, 2 KV heads, 8 experts top-2)
QWEN3_MOE = dict(
    model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip


def _rows(seed: int = 0, k: int = 3):
    """Rows as the trainer gets them: [left pad][prompt][response][right pad], real lengths odd and
    even (a slice then ends in a pad), plus top-k ids and MoE routes per position."""
    g = torch.Generator().manual_seed(seed)
    spans = [(3, 5, 4), (0, 7, 6), (5, 2, 1)]  # (left pad, prompt, response) per row
    T = max(lp + p + r for lp, p, r in spans) + 2
    ids = torch.zeros(len(spans), T, dtype=torch.long)
    am = torch.zeros(len(spans), T, dtype=torch.bool)
    rm = torch.zeros(len(spans), T, dtype=torch.bool)
    for b, (lp, p, r) in enumerate(spans):
        ids[b, lp : lp + p + r] = torch.randint(3, 128, (p + r,), generator=g)
        ids[b, lp] = 1  # BOS
        am[b, lp : lp + p + r] = True
        rm[b, lp + p : lp + p + r] = True
    topk = torch.randint(3, 128, (len(spans), T, k), generator=g)
    return ids, am, rm, topk


# --------------------------------------------------------------------------- without ranks


def test_shard_sequence_compacts_shifts_slices_and_scatters_back():
    ids, am, rm, topk = _rows()
    routes = torch.randint(0, 8, (*ids.shape, 2, 2), dtype=torch.int16)  # (b, t, layers, k): MoE routes to replay
    slices = [
        shard_sequence(
            ids,
            am,
            sp_rank=r,
            sp_size=SP,
            aligned={"routes": routes},
            shifted={"rm": rm, "topk": topk},
            aligned_fill=-1,
        )
        for r in range(SP)
    ]
    whole = {
        k: torch.cat([getattr(s, k) for s in slices], 1)
        for k in ("input_ids", "position_ids", "targets", "valid", "real")
    }
    n = am.sum(1)
    assert whole["input_ids"].shape[1] % SP == 0 and whole["input_ids"].shape[1] >= int(n.max())
    for b in range(ids.shape[0]):
        real = ids[b][am[b]]
        m = len(real)
        assert torch.equal(whole["input_ids"][b, :m], real)  # real tokens first, in order
        assert not whole["input_ids"][b, m:].any()  # then pads
        assert torch.equal(whole["real"][b], torch.arange(whole["real"].shape[1]) < m)
        assert torch.equal(whole["position_ids"][b, :m], torch.arange(m))  # position_ids_for's positions
        assert torch.equal(whole["targets"][b, : m - 1], real[1:])  # row p predicts token p + 1 ...
        assert torch.equal(whole["valid"][b], torch.arange(whole["valid"].shape[1]) < m - 1)
        rm_shift = torch.cat([s.shifted["rm"] for s in slices], 1)[b]
        assert torch.equal(rm_shift[: m - 1], rm[b][am[b]][1:]) and not rm_shift[m - 1 :].any()
        topk_shift = torch.cat([s.shifted["topk"] for s in slices], 1)[b]
        assert torch.equal(topk_shift[: m - 1], topk[b][am[b]][1:])
        routes_at = torch.cat([s.aligned["routes"] for s in slices], 1)[b]  # not shifted: input positions
        assert torch.equal(routes_at[:m], routes[b][am[b]]) and (routes_at[m:] == -1).all()
    # ... also across the slice boundary: rank 0's last row targets rank 1's first token.
    L = slices[0].input_ids.shape[1]
    assert torch.equal(slices[0].targets[:, -1], slices[1].input_ids[:, 0])
    assert slices[1].start == L and slices[0].seq_len == SP * L

    # Back to the rows: each rank's output row lands on the column of the token it predicts (what
    # align_to_tokens does on the padded rows), every real token but the first on exactly one rank.
    back = [s.to_rows(s.targets[..., None].float()) for s in slices]
    owned = [owned_tokens(am, r, SP) for r in range(SP)]
    first = am & (am.long().cumsum(1) == 1)
    assert torch.equal(owned[0] | owned[1], am & ~first) and not (owned[0] & owned[1]).any()
    for r in range(SP):
        assert torch.equal(back[r][..., 0] != 0, owned[r])  # ids >= 1: non-zero exactly where owned
        assert torch.equal(back[r][..., 0][owned[r]], ids[owned[r]].float())
    x = torch.randn(*slices[0].input_ids.shape, 2, requires_grad=True)
    slices[0].to_rows(x).sum().backward()
    assert torch.equal(x.grad, slices[0].valid[..., None].float().expand_as(x))  # the scatter's gradient
    # Positions and real tokens counted per rank add up to the compacted rows'.
    counts = [slice_counts(am, r, SP, rows=ids.shape[0]) for r in range(SP)]
    assert sum(c[0] for c in counts) == ids.shape[0] * slices[0].seq_len
    assert sum(c[1] for c in counts) == int(am.sum())


def test_balance_loss_shares_add_up_to_the_whole_rows():
    """Split the tokens of some rows in two slices: the two shares (the counts summed as the SP
    all-reduce does) equal transformers' Switch loss and ``sigmoid_balance_loss`` of the whole
    rows, and so do their gradients."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from trainers.moe_balance import sigmoid_balance_loss

    g = torch.Generator().manual_seed(0)
    b, t, E, k, layers = 3, 10, 8, 2, 2
    mask = torch.rand(b, t, generator=g) > 0.3
    logits = [torch.randn(b * t, E, generator=g, requires_grad=True) for _ in range(layers)]
    halves = [slice(0, t // 2), slice(t // 2, t)]

    def per_slice(x: torch.Tensor, s: slice) -> torch.Tensor:
        return x.view(b, t, *x.shape[1:])[:, s].reshape(-1, *x.shape[1:])

    # Switch (Qwen3-MoE, Mixtral): pooled over layers.
    whole = load_balancing_loss_func(tuple(logits), E, k, mask.long())
    (g_whole,) = torch.autograd.grad(whole, logits[0])
    parts = [balance_parts("switch", [per_slice(x, s) for x in logits], mask[:, s], top_k=k) for s in halves]
    counts = sum(c for c, _ in parts)
    shares = [balance_share("switch", counts, p, k) for _, p in parts]
    assert float(sum(shares).detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    (g_split,) = torch.autograd.grad(sum(shares), logits[0])
    torch.testing.assert_close(g_split, g_whole, atol=1e-7, rtol=1e-5)

    # Sigmoid routers (MiMo-V2-Flash / DeepSeek-V3 style): per layer, the chosen experts given.
    chosen = [torch.topk(x.detach(), k, dim=-1).indices for x in logits]
    whole = sigmoid_balance_loss(list(zip(logits, chosen, strict=True)), mask)
    (g_whole,) = torch.autograd.grad(whole, logits[1])
    parts = [
        balance_parts(
            "sigmoid", [(per_slice(x, s), per_slice(c, s)) for x, c in zip(logits, chosen, strict=True)], mask[:, s]
        )
        for s in halves
    ]
    counts = sum(c for c, _ in parts)
    shares = [balance_share("sigmoid", counts, p, k) for _, p in parts]
    assert float(sum(shares).detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    (g_split,) = torch.autograd.grad(sum(shares), logits[1])
    torch.testing.assert_close(g_split, g_whole, atol=1e-7, rtol=1e-5)


def _recipe(sp: int = 2, world: int = 2, student: dict | None = None) -> MOPDConfig:
    cfg = load_config(TINY)
    if student is not None:
        cfg.student = ModelConfig(config=dict(student), tokenizer="builtin:char")
    cfg.trainer.world_size, cfg.trainer.sequence_parallel_size = world, sp
    return cfg


def _refusals(cfg: MOPDConfig) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


def test_validate_accepts_sizes_that_divide_the_heads_and_the_world():
    validate(_recipe(2, 2, QWEN3_MOE))
    validate(_recipe(2, 4, QWEN3_MOE))  # two data-parallel shards of 2 ranks
    validate(_recipe(4, 4, QWEN3_MOE))  # 2 KV heads, each on 2 ranks


def test_validate_refuses_sizes_that_do_not_divide_the_heads_or_the_world():
    assert "trainer.world_size (3) must be a multiple of trainer.sequence_parallel_size (2)" in _refusals(
        _recipe(2, 3, QWEN3_MOE)
    )
    msg = _refusals(_recipe(3, 3, QWEN3_MOE))
    assert "num_attention_heads (4) is not divisible by trainer.sequence_parallel_size (3)" in msg
    assert "num_key_value_heads (2) and trainer.sequence_parallel_size (3)" in msg
    assert "trainer.sequence_parallel_size must be positive, got 0" in _refusals(_recipe(0, 2, QWEN3_MOE))


def test_validate_refuses_mimo_eager_attention_and_what_needs_a_mask_or_varying_rows():
    msg = _refusals(_recipe(2, 2))  # tiny.yaml's student: MiMo-V2-Flash
    assert "attention is 'eager' (mimo_v2_flash)" in msg
    assert "v_head_dim (16) differs from its head_dim (32)" in msg
    assert "sliding-window attention (sliding_window=32)" in msg
    cfg = _recipe(2, 2, QWEN3_MOE)
    cfg.student.attn_implementation = "eager"
    assert "attention is 'eager' (qwen3_moe)" in _refusals(cfg)
    cfg = _recipe(2, 2, QWEN3_MOE)
    cfg.trainer.pack_sequences, cfg.trainer.max_tokens_per_micro_batch, cfg.trainer.logprob_chunk_size = True, 256, 0
    msg = _refusals(cfg)
    assert "trainer.pack_sequences cannot work with trainer.sequence_parallel_size > 1" in msg
    assert "trainer.max_tokens_per_micro_batch cannot work with trainer.sequence_parallel_size > 1" in msg
    assert "set trainer.logprob_chunk_size above 0" in msg
    cfg.trainer.sequence_parallel_size = 1
    cfg.trainer.logprob_chunk_size = 1024
    validate(cfg)  # the same settings without sequence parallelism


# --------------------------------------------------------------------------- 2 gloo ranks


def _cfg(world_size: int, sp: int, zero_stage: int) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.run.total_steps = 10
    cfg.student = ModelConfig(config=dict(QWEN3_MOE), tokenizer="builtin:char")
    cfg.trainer.world_size, cfg.trainer.sequence_parallel_size = world_size, sp
    cfg.trainer.zero_stage = zero_stage
    cfg.trainer.micro_batch_size = 2
    cfg.trainer.lr = 1e-8
    cfg.trainer.aux_loss_coef = 0.01
    cfg.trainer.logprob_chunk_size = 4  # several chunks per slice
    cfg.objective.topk = 8
    return cfg


def _batch(cfg: MOPDConfig, rows: int = 5):
    """Prompts and responses of varied lengths, rollout log-probs from the student's initial
    weights, a teacher of another seed (its top-k too), GRPO advantages, random MoE routes."""
    from mopd.models import forward_logits, load_model, sequence_logprobs, topk_logprobs
    from mopd.objective import grpo_advantages
    from mopd.types import PromptRow, RolloutBatch, TrainBatch

    g = torch.Generator().manual_seed(0)
    P, R = 7, 9
    ids = torch.zeros(rows, P + R, dtype=torch.long)
    attn = torch.zeros(rows, P + R, dtype=torch.bool)
    resp = torch.zeros(rows, P + R, dtype=torch.bool)
    for b in range(rows):
        p, r = 2 + (2 * b) % (P - 1), 1 + (3 * b + 2) % R
        ids[b, P - p] = 1
        ids[b, P - p + 1 : P + r] = torch.randint(3, 100, (p - 1 + r,), generator=g)
        attn[b, P - p : P + r] = True
        resp[b, P : P + r] = True
    student, teacher = load_model(cfg.student, seed=0), load_model(cfg.student, seed=1)
    with torch.no_grad():
        top_ids, top_lp = topk_logprobs(forward_logits(teacher, ids, attn).logits, cfg.objective.topk)
    routes = torch.stack([torch.randint(0, 4, ids.shape, generator=g), torch.randint(4, 8, ids.shape, generator=g)], -1)
    routes = torch.where(attn[..., None, None], routes[:, :, None, :].expand(-1, -1, 2, -1), -1).to(torch.int16)
    domains = ["math" if b % 2 else "code" for b in range(rows)]
    rollout = RolloutBatch(
        input_ids=ids, attention_mask=attn, response_mask=resp,
        rollout_logprobs=sequence_logprobs(student, ids, attn) * resp, group_ids=torch.arange(rows) // 2,
        domains=domains, rows=[PromptRow("p", d) for d in domains], responses=[""] * rows, policy_version=0,
        prompt_len=P, routed_experts=routes,
    )  # fmt: skip
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), torch.arange(rows) // 2)
    return TrainBatch(rollout, sequence_logprobs(teacher, ids, attn) * resp, adv, top_ids, top_lp)


def _calls(cfg: MOPDConfig, batch, rank: int, world_size: int, port: int) -> dict:
    """What both runs do: logprobs(), a top-k step, a sampled step, an SFT step; the metrics and
    the whole gradient of each step (read before the optimizer step: under ZeRO-2 a collective)."""
    from deepspeed.utils import safe_get_full_grad

    from trainers.deepspeed_trainer import TrainerWorker

    w = TrainerWorker(cfg, rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port)
    grads: dict[str, torch.Tensor] = {}
    real_step = w.engine.step

    def step(*args, **kwargs):
        grads.clear()
        for name, p in w.engine.module.named_parameters():
            grads[name] = safe_get_full_grad(p).detach().float().cpu().clone()
        return real_step(*args, **kwargs)

    w.engine.step = step
    widths: list[int] = []  # the positions of every forward's rows
    w.engine.module.get_input_embeddings().register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    r = batch.rollout
    out: dict = {"logprobs": w.logprobs(r.input_ids, r.attention_mask, r.routed_experts)}
    w.cfg.objective.kind = "topk"
    out["topk"] = (w.train_step(batch), dict(grads))
    w.cfg.objective.kind, w.cfg.objective.alpha = "sampled", 0.5
    out["sampled"] = (w.train_step(batch), dict(grads))
    out["sft"] = (w.sft_step(batch), dict(grads))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out["attention"], out["widest"] = ALL_ATTENTION_FUNCTIONS["sdpa"].__name__, max(widths)
    return out


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    """(largest |difference| of any gradient entry, the whole gradient's norm)."""
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return diff, math.sqrt(sum(float(v.pow(2).sum()) for v in b.values()))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_sequence_parallel_ranks_take_the_one_rank_step(zero_stage, tmp_path):
    from mopd.dist.runtime import free_port

    t0 = time.time()
    cfg = _cfg(world_size=2, sp=SP, zero_stage=zero_stage)
    batch = _batch(cfg)
    (tmp_path / "setup.pkl").write_bytes(pickle.dumps((cfg, batch)))
    port = free_port("127.0.0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "rank", str(rank), str(port), str(tmp_path)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(SP)
    ]
    try:
        ref_cfg = _cfg(world_size=1, sp=1, zero_stage=zero_stage)
        ref = _calls(ref_cfg, batch, rank=0, world_size=1, port=free_port("127.0.0.1"))
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, outs, strict=True):
        assert p.returncode == 0, log[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(SP)]
    r = batch.rollout
    figures: dict[str, float] = {"seconds": round(time.time() - t0, 1)}
    for out in ranks:  # DeepSpeed's Ulysses wrapper ran the attention, each rank on half the positions
        assert out["attention"] == "uattn_wrapper" and out["widest"] <= (int(r.attention_mask.sum(1).max()) + 1) // 2

    # logprobs(): every real token but a row's first (padding and first tokens hold 0 under SP).
    scored = r.attention_mask & (r.attention_mask.long().cumsum(1) > 1)
    for out in ranks:
        assert torch.equal(out["logprobs"], ranks[0]["logprobs"])  # summed over the SP group: the same
        figures["logprobs"] = float((out["logprobs"] - ref["logprobs"])[scored].abs().max())
        assert figures["logprobs"] < 1e-5
        assert not out["logprobs"][~scored].any()

    for call in ("topk", "sampled", "sft"):
        ref_m, ref_g = ref[call]
        for out in ranks:
            m, g = out[call]
            assert m == ranks[0][call][0]  # reduced over all ranks: identical on both
            diff, norm = _max_diff(g, ref_g)
            figures[f"{call}/grad_max_diff"], figures[f"{call}/grad_norm"] = diff, norm
            assert norm > 1e-3 and diff < 1e-6 * max(1.0, norm) + 1e-7, (call, diff, norm)
            prefix = "sft" if call == "sft" else "train"
            assert m[f"{prefix}/grad_norm"] == pytest.approx(ref_m[f"{prefix}/grad_norm"], rel=1e-5)
            assert m[f"{prefix}/skipped"] == ref_m[f"{prefix}/skipped"] == 0.0
            figures[f"{call}/loss_diff"] = abs(m[f"{prefix}/loss"] - ref_m[f"{prefix}/loss"])
            assert m[f"{prefix}/loss"] == pytest.approx(ref_m[f"{prefix}/loss"], abs=1e-6, rel=1e-6)
            if call == "sft":
                continue
            assert m["train/aux_loss"] == pytest.approx(ref_m["train/aux_loss"], rel=1e-6)
            assert m["train/aux_loss"] > 0  # the balance loss was on
            assert 0.0 <= m["train/padding_frac"] < 1.0
            for key, value in ref_m.items():
                if key.endswith("/tokens"):
                    assert m[key] == value, key  # each token counted once over the SP ranks
                elif key.startswith("teacher/") or key.split("/")[-1] in ("reverse_kl", "is_masked_frac", "adv_mean"):
                    assert m[key] == pytest.approx(value, abs=1e-6), key
    print(figures)


# --------------------------------------------------------------------------- one rank (subprocess)


def _rank_main(rank: int, port: int, tmp: str) -> None:
    cfg, batch = pickle.loads((Path(tmp) / "setup.pkl").read_bytes())
    out = _calls(cfg, batch, rank=rank, world_size=SP, port=port)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "rank":
    _rank_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
