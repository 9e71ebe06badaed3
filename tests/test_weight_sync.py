"""Weight sync without the driver (mopd/dist/weight_sync.py): the bucket plan and its round trip (pure),
a real gloo group between two processes that syncs an HF rollout actor, and (slow) the rollout pool
syncing from the trainer pool over Ray in both modes.

    OMP_NUM_THREADS=1 pytest tests/test_weight_sync.py           # add -m "not slow" to skip Ray
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
from mopd.dist.weight_sync import (
    ALIGN,
    Assembler,
    SyncPlan,
    TensorSpec,
    WeightLink,
    check_plan,
    host_store,
    pack_buckets,
    plan_sync,
    receive_into,
    specs_of,
)
from mopd.models import load_model, tiny_mimo_config


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Several dtypes (bf16 among them), an empty tensor, a scalar, and one (``big``) larger than a
    256-byte bucket."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "big": torch.randn(40, 9, generator=g),  # 1,440 bytes: spans six 256-byte buckets
        "tail.bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
    }


def round_trip(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[SyncPlan, dict[str, torch.Tensor]]:
    """Pack into buckets, serialise the plan, unpack: what a receiver would get."""
    plan = plan_sync(specs_of(tensors), version=7, bucket_bytes=bucket_bytes)
    plan = SyncPlan.from_json(plan.to_json())
    sender_buf = torch.empty(bucket_bytes, dtype=torch.uint8)
    receiver = Assembler(plan)
    got = {}
    for b in pack_buckets(plan, tensors.items(), sender_buf):
        wire = sender_buf[: plan.sizes[b]].clone()  # what the broadcast delivers
        for name, t in receiver.feed(b, wire):
            got[name] = t.clone()
    return plan, got


@pytest.mark.parametrize("bucket_bytes", [256, 1 << 20])
def test_bucket_round_trip_keeps_names_shapes_dtypes_and_values(bucket_bytes):
    tensors = mixed_tensors()
    plan, got = round_trip(tensors, bucket_bytes)
    assert list(got) == list(tensors)  # every tensor, in order
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert plan.version == 7
    assert all(0 < size <= bucket_bytes for size in plan.sizes)
    if bucket_bytes == 256:
        big = next(i for i, s in enumerate(plan.specs) if s.name == "big")
        assert sum(p.spec == big for bucket in plan.buckets for p in bucket) > 1  # split over buckets


def test_plan_aligns_pieces_and_accounts_every_element():
    plan = plan_sync(specs_of(mixed_tensors()), version=1, bucket_bytes=256)
    for pieces, size in zip(plan.buckets, plan.sizes, strict=True):
        for p in pieces:
            assert p.offset % ALIGN == 0
            assert p.offset + p.numel * plan.specs[p.spec].dtype.itemsize <= size
    for i, spec in enumerate(plan.specs):
        covered = sorted((p.start, p.numel) for b in plan.buckets for p in b if p.spec == i)
        assert sum(n for _, n in covered) == spec.numel
        assert all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:], strict=False))


def test_plan_rejects_tiny_buckets_and_packing_checks_order():
    with pytest.raises(ValueError, match="bucket_bytes must be at least"):
        plan_sync([TensorSpec("x", (4,), torch.float32)], 0, 8)
    tensors = mixed_tensors()
    plan = plan_sync(specs_of(tensors), 0, 1024)
    swapped = list(reversed(list(tensors.items())))
    with pytest.raises(ValueError, match="the plan expects 'a.weight'"):
        list(pack_buckets(plan, swapped, torch.empty(1024, dtype=torch.uint8)))


def test_check_plan_names_missing_unexpected_and_wrong_shapes():
    plan = plan_sync([TensorSpec("a", (2, 3), torch.float32), TensorSpec("extra", (1,), torch.float32)], 3, 1024)
    assert check_plan(plan, {"a": (2, 3), "extra": (1,)}) is None
    msg = check_plan(plan, {"a": (3, 2), "b": (4,)})
    assert msg is not None
    assert "policy version 3" in msg and "missing b" in msg and "unexpected extra" in msg
    assert "shape differs for a (2, 3) (model: (3, 2))" in msg


# --------------------------------------------------------------------------- a real group


def _tiny_cfg() -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def rank0_sending(weights: dict[str, torch.Tensor], version: int, bucket_bytes: int):
    """A thread as trainer rank 0 of a new two-member weight-sync group (generation 0, gloo, on a
    free port) that sends ``weights`` as ``version``: yields the port, for rank 1 to join, and the
    future of the bytes sent; the block's end waits for the thread."""
    port = _free_port()
    store = host_store("127.0.0.1", port, timeout_s=60)

    def send() -> int:
        link = WeightLink("127.0.0.1", port, 0, 0, 2, "gloo", store=store, timeout_s=60)
        return link.send(plan_sync(specs_of(weights), version, bucket_bytes), weights.items())

    with ThreadPoolExecutor(1) as ex:
        yield port, ex.submit(send)


def _sender(port: int, bucket_bytes: int) -> None:
    """Group rank 0 (trainer rank 0's role): hosts the store, sends a student of seed 11 as version 5."""
    torch.set_num_threads(1)
    store = host_store("127.0.0.1", port, timeout_s=60)
    link = WeightLink("127.0.0.1", port, 0, 0, 2, "gloo", store=store, timeout_s=60)
    weights = load_model(_tiny_cfg().student, seed=11).state_dict()
    link.send(plan_sync(specs_of(weights), 5, bucket_bytes), weights.items())


def test_two_processes_sync_an_hf_rollout_actor():
    """A real gloo group of two processes: the receiver is an HFRolloutActor (group rank 1) that ends
    with exactly the sender's weights (a byte copy) and the sender's policy version."""
    from rollout.hf import HFRolloutActor

    cfg = _tiny_cfg()
    actor = HFRolloutActor(cfg)
    expected = load_model(cfg.student, seed=11).state_dict()
    assert any(not torch.equal(v, expected[k]) for k, v in actor.model.state_dict().items())
    port, bucket_bytes = _free_port(), 4096  # small buckets: many broadcasts, tensors split
    proc = mp.get_context("fork").Process(target=_sender, args=(port, bucket_bytes))
    proc.start()
    try:
        actor.join_weight_sync("127.0.0.1", port, 0, 1, 2, "gloo")
        assert actor.receive_weights(5) == 5
    finally:
        proc.join(60)
    assert proc.exitcode == 0
    assert actor.version() == 5
    for name, t in actor.model.state_dict().items():
        assert torch.equal(t, expected[name]), name
    actor.shutdown()


def _wrong_sender(port: int) -> None:
    store = host_store("127.0.0.1", port, timeout_s=60)
    link = WeightLink("127.0.0.1", port, 0, 0, 2, "gloo", store=store, timeout_s=60)
    weights = {"model.not_a_layer.weight": torch.ones(3, 3)}
    link.send(plan_sync(specs_of(weights), 2, 1024), weights.items())


def test_receiver_refuses_weights_of_another_model_without_hanging_the_sender():
    """Strict like load_state_dict(strict=True): the message names what differs, and the receiver
    still takes part in every broadcast, so rank 0 finishes instead of waiting for it."""
    port = _free_port()
    proc = mp.get_context("fork").Process(target=_wrong_sender, args=(port,))
    proc.start()
    try:
        link = WeightLink("127.0.0.1", port, 0, 1, 2, "gloo", timeout_s=60)
        model = torch.nn.Linear(3, 3)
        with pytest.raises(ValueError, match=r"missing bias, weight; unexpected model.not_a_layer.weight"):
            receive_into(link, 2, model.state_dict(keep_vars=True))
    finally:
        proc.join(60)
    assert proc.exitcode == 0


def test_zero3_trainer_sends_gathered_weights_to_an_hf_actor():
    """Trainer rank 0 under ZeRO-3 (parameters partitioned, gathered one at a time while sending)
    and an HF rollout actor started from other weights, in one process (two gloo ranks, two
    threads): afterwards the actor holds what the trainer's consolidated state dict holds."""
    from concurrent.futures import ThreadPoolExecutor

    from mopd.dist.runtime import free_port
    from rollout.hf import HFRolloutActor
    from trainers.deepspeed_trainer import TrainerWorker

    cfg = _tiny_cfg()
    cfg.trainer.zero_stage = 3
    trainer = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))
    other = _tiny_cfg()
    other.run.seed = 1  # the actor starts from different weights
    actor = HFRolloutActor(other)
    port = _free_port()
    trainer.host_weight_sync("127.0.0.1", port)
    with ThreadPoolExecutor(1) as ex:
        joined = ex.submit(trainer.join_weight_sync, "127.0.0.1", port, 0, 2, "gloo")
        actor.join_weight_sync("127.0.0.1", port, 0, 1, 2, "gloo")
        joined.result()
        sent = ex.submit(trainer.send_weights, 3, 2048)
        assert actor.receive_weights(3) == 3
        assert sent.result() > 0
    expected = trainer.state_dict()
    assert expected is not None
    got = actor.model.state_dict()
    assert set(got) == set(expected)
    for name, t in got.items():
        assert torch.equal(t, expected[name]), name
    assert actor.version() == 3


# --------------------------------------------------------------------------- through the pools (Ray)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, namespace="test-weight-sync")
    yield ray
    ray.shutdown()


def _pool_cfgs(mode: str) -> tuple[MOPDConfig, MOPDConfig]:
    """(trainer's, rollout's) configs of one tiny run whose trainer starts from other weights than
    the rollout (run.seed 1 vs 0), so a sync that does nothing is seen; two rollout replicas."""
    rollout = _tiny_cfg()
    rollout.rollout.replicas = 2
    rollout.rollout.max_new_tokens = 8
    rollout.rollout.weight_sync = mode
    rollout.rollout.weight_sync_bucket_mb = 1
    trainer = _tiny_cfg()
    trainer.run.seed = 1
    return trainer, rollout


def _assert_rollout_matches_trainer(rollout_pool, trainer_pool, version: int) -> None:
    """Both replicas sample from the trainer's weights: the log-probs they record for their samples
    (fp32, one model, other kernels) agree with the trainer's to 1e-4."""
    from mopd.types import PromptRow

    rows = [PromptRow(prompt=f"{i} + {i} =", domain="math", index=i) for i in range(4)]
    batch = rollout_pool.generate(rows, n=1, seed=0, greedy=True)
    assert batch.policy_version == version and rollout_pool.versions() == [version, version]
    ref = trainer_pool.logprobs(batch.input_ids, batch.attention_mask)
    m = batch.response_mask
    torch.testing.assert_close(batch.rollout_logprobs[m], ref[m], atol=1e-4, rtol=0)


@pytest.mark.slow
# ~30 s; by default test_faults.py restarts a rollout replica between steps (it gets the current
# weights back) and the test above takes the driver path after a kill during a direct sync
@pytest.mark.extended
def test_pools_sync_directly_a_restarted_replica_rejoins_and_the_driver_path_still_works(ray_cluster):
    """rollout.weight_sync=direct through the pools: trainer rank 0 broadcasts to two replicas. A
    replica killed between syncs is given the weights through the driver when it is noticed, and
    the next sync forms the group again with it. Then rollout.weight_sync=driver (the older path)."""
    from rollout.pool import RolloutPool
    from trainers import TrainerPool

    trainer_cfg, rollout_cfg = _pool_cfgs("direct")
    trainer, rollout = TrainerPool(trainer_cfg), RolloutPool(rollout_cfg)
    try:
        rollout.sync_from(trainer, 1)
        assert rollout._generation == 1 and rollout._weights is None  # no copy kept in the object store
        _assert_rollout_matches_trainer(rollout, trainer, 1)
        ray_cluster.kill(rollout._actors[1], no_restart=False)
        _assert_rollout_matches_trainer(rollout, trainer, 1)  # noticed by generate, resynced
        assert rollout.restarts == 1
        rollout.sync_from(trainer, 2)
        assert rollout._generation == 2 and rollout.versions() == [2, 2]

        rollout.cfg.rollout.weight_sync = "driver"
        rollout.sync_from(trainer, 3)
        assert rollout._generation == 2 and rollout._weights is not None
        _assert_rollout_matches_trainer(rollout, trainer, 3)
    finally:
        rollout.shutdown()
        trainer.shutdown()


class RecordingVLLMModel:
    """Stands in for a vLLM model: ``load_weights`` keeps what it is given (vLLM's loaders copy each
    tensor into their parameters; this one keeps them all, to check names and values)."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor


def test_vllm_worker_extension_loads_the_broadcast_in_place_under_checkpoint_names():
    """The GPU path of rollout/vllm_ext.py, run on CPU with gloo and a stand-in model (vLLM on CPU
    cannot load in place): the worker joins as rank 1 and passes trainer rank 0's tensors to the
    model's load_weights, renamed to checkpoint names (fused MoE experts split per expert) exactly
    as the safetensors export does."""
    from types import SimpleNamespace

    from rollout.vllm import _meta_copy, export_checkpoint
    from rollout.vllm_ext import MOPDWorkerExtension

    model = load_model(_tiny_cfg().student, seed=3)
    weights = model.state_dict()
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=RecordingVLLMModel()))
    with rank0_sending(weights, 6, 1 << 12) as (port, sent):
        config = model.config.to_dict()
        MOPDWorkerExtension.mopd_join_weight_sync(worker, "127.0.0.1", port, 0, 1, 2, "gloo", config)
        received = MOPDWorkerExtension.mopd_receive_weights(worker, 6)
        assert received == sent.result() > 0
    _, expected = export_checkpoint(weights, _meta_copy(model, False), pad_v=False)
    loaded = worker.model_runner.model.loaded
    assert set(loaded) == set(expected) and any(".experts.0." in k for k in loaded)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.slow
def test_a_replica_killed_during_a_direct_sync_gets_the_weights_through_the_driver(ray_cluster, caplog):
    """A replica dies while trainer rank 0 broadcasts (its receive queued behind a busy call, then
    killed): the group breaks (gloo: connection closed), Ray restarts the replica, the sync of that
    version goes through the driver instead, and the next sync forms the group again."""
    import threading
    import time

    from rollout.pool import RolloutPool
    from trainers import TrainerPool

    trainer_cfg, rollout_cfg = _pool_cfgs("direct")
    trainer, rollout = TrainerPool(trainer_cfg), RolloutPool(rollout_cfg)
    try:
        rollout.sync_from(trainer, 1)
        victim = rollout._actors[1]
        victim.__ray_call__.remote(lambda self: time.sleep(60))
        threading.Timer(0.5, lambda: ray_cluster.kill(victim, no_restart=False)).start()
        rollout.sync_from(trainer, 2)
        assert "direct weight sync of version 2 failed" in caplog.text and rollout.restarts == 1
        _assert_rollout_matches_trainer(rollout, trainer, 2)
        rollout.sync_from(trainer, 3)
        assert rollout._generation == 2 and rollout._joined
        _assert_rollout_matches_trainer(rollout, trainer, 3)
    finally:
        rollout.shutdown()
        trainer.shutdown()
