"""Weight sync without the driver: trainer rank 0 broadcasts the student's weights straight to the
rollout replicas over a torch.distributed group of their own, in buckets of bounded size.

    # trainer rank 0 (group rank 0)                   # rollout replica i (group rank 1 + i)
    store = host_store(ip, port)                       # once; the group's rendezvous
    link = WeightLink(ip, port, generation, 0, world, "gloo", store=store)
                                                       link = WeightLink(ip, port, generation, 1 + i, world, "gloo")
    link.send(plan_sync(specs, version, bucket_bytes), tensors)
                                                       plan = link.read_plan(version)
                                                       for name, t in link.receive(plan): param[name].copy_(t)

The group is made without touching the default process group (DeepSpeed's): a ``TCPStore`` hosted
by trainer rank 0, and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU) built directly on a
``PrefixStore`` of it, one prefix per *generation* (the pool forms a new generation when a replica
was restarted). Joining blocks until every member has joined, so the driver asks all of them at once.

A sync is one ``SyncPlan`` (JSON, written to the store under the policy version: names, shapes,
dtypes, and where each tensor's bytes lie in which bucket) followed by one broadcast per bucket of at
most ``bucket_bytes``. A tensor larger than a bucket is split over several; a receiver assembles it.
The sender streams: it needs one tensor at a time (ZeRO-3 gathers parameter by parameter) and one
bucket buffer. Nothing here imports Ray or a worker package; the trainer and the rollout actors do
the calling, the driver only orders it and receives small acknowledgements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

ALIGN = 16  # bytes: every piece starts aligned, so a uint8 slice can be viewed as any dtype
STORE_PREFIX = "mopd-weights"
DEFAULT_TIMEOUT_S = 600.0


class WeightSource(Protocol):
    """What the rollout pool needs from the trainer (``trainers.TrainerPool``) to sync weights."""

    # ``adapter``: a LoRA student's adapter alone (the rollout serves it over the base it holds)
    def state_dict(self, adapter: bool = False) -> dict[str, torch.Tensor]: ...  # the driver path
    def host_weight_sync(self) -> tuple[str, int]: ...  # rank 0 hosts the store; its address
    def join_weight_sync(self, generation: int, world: int, backend: str) -> None: ...  # rank 0 joins
    def send_weights(self, version: int, bucket_bytes: int, adapter: bool = False) -> int: ...  # bytes sent


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of the flattened tensor ``spec`` (an index into the plan's
    specs) at byte ``offset`` of its bucket."""

    spec: int
    start: int
    numel: int
    offset: int


@dataclass(frozen=True)
class SyncPlan:
    """One sync: every tensor and the buckets its bytes travel in. ``bucket_bytes`` bounds each
    bucket; ``buckets[b]`` lists its pieces, ``sizes[b]`` its length in bytes."""

    version: int
    bucket_bytes: int
    specs: tuple[TensorSpec, ...]
    buckets: tuple[tuple[Piece, ...], ...]
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "bucket_bytes": self.bucket_bytes,
                "specs": [[s.name, list(s.shape), _dtype_name(s.dtype)] for s in self.specs],
                "buckets": [[[p.spec, p.start, p.numel, p.offset] for p in b] for b in self.buckets],
                "sizes": list(self.sizes),
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SyncPlan:
        d = json.loads(text)
        return cls(
            version=int(d["version"]),
            bucket_bytes=int(d["bucket_bytes"]),
            specs=tuple(TensorSpec(n, tuple(shape), _dtype(dt)) for n, shape, dt in d["specs"]),
            buckets=tuple(tuple(Piece(*p) for p in b) for b in d["buckets"]),
            sizes=tuple(d["sizes"]),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight sync plan names an unknown dtype {name!r}")
    return dtype


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_sync(specs: Sequence[TensorSpec], version: int, bucket_bytes: int) -> SyncPlan:
    """Pack ``specs`` in order into buckets of at most ``bucket_bytes``; a tensor that does not fit
    in what is left of a bucket continues in the next one (so one larger than a bucket spans several)."""
    if bucket_bytes < 2 * ALIGN:
        raise ValueError(f"bucket_bytes must be at least {2 * ALIGN}, got {bucket_bytes}")
    buckets: list[tuple[Piece, ...]] = []
    sizes: list[int] = []
    pieces: list[Piece] = []
    used = 0

    def close() -> None:
        nonlocal pieces, used
        buckets.append(tuple(pieces))
        sizes.append(used)
        pieces, used = [], 0

    for i, spec in enumerate(specs):
        size, start = spec.dtype.itemsize, 0
        while True:
            offset = _align(used)
            room = (bucket_bytes - offset) // size
            if room <= 0:  # this bucket is full (a fresh one always has room: bucket_bytes >= 32)
                close()
                continue
            take = min(spec.numel - start, room)
            pieces.append(Piece(i, start, take, offset))
            used, start = offset + take * size, start + take
            if start >= spec.numel:
                break
    if pieces:
        close()
    return SyncPlan(int(version), int(bucket_bytes), tuple(specs), tuple(buckets), tuple(sizes))


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def check_plan(plan: SyncPlan, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """What is wrong with ``plan`` for a model whose tensors are ``expected`` (name -> shape), as a
    message naming the differences, or None when names and shapes match exactly."""
    got = {s.name: s.shape for s in plan.specs}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if tuple(expected[k]) != got[k])
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    if wrong:
        parts.append("shape differs for " + ", ".join(f"{k} {got[k]} (model: {tuple(expected[k])})" for k in wrong[:5]))
    return f"weights of policy version {plan.version} do not fit the rollout model: " + "; ".join(parts)


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


# --------------------------------------------------------------------------- packing


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The flat uint8 view of a tensor's elements."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_buckets(plan: SyncPlan, tensors: Iterable[tuple[str, torch.Tensor]], buffer: torch.Tensor) -> Iterator[int]:
    """Fill ``buffer`` (uint8, at least ``plan.bucket_bytes``) with each bucket in turn and yield its
    index; the caller sends ``buffer[:plan.sizes[b]]`` before asking for the next. ``tensors`` must
    come in the plan's order, with the plan's names, shapes and dtypes; only the current one is held."""
    source = iter(tensors)
    index, current = -1, torch.empty(0, dtype=torch.uint8)
    for b, pieces in enumerate(plan.buckets):
        for p in pieces:
            while index < p.spec:
                index, current = index + 1, _next_tensor(source, plan.specs[index + 1])
            size = plan.specs[p.spec].dtype.itemsize
            buffer[p.offset : p.offset + p.numel * size].copy_(current[p.start * size : (p.start + p.numel) * size])
        yield b
    for name, _ in source:
        raise ValueError(f"weight sync: tensor {name!r} is not in the plan")


def _next_tensor(source: Iterator[tuple[str, torch.Tensor]], spec: TensorSpec) -> torch.Tensor:
    try:
        name, t = next(source)
    except StopIteration:
        raise ValueError(f"weight sync: the tensors ended before {spec.name!r}") from None
    if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
        raise ValueError(
            f"weight sync: got {name!r} {tuple(t.shape)} {t.dtype}, the plan expects "
            f"{spec.name!r} {spec.shape} {spec.dtype}"
        )
    return _bytes(t)


class Assembler:
    """Turns received buckets back into tensors (``feed`` one bucket at a time, in order)."""

    def __init__(self, plan: SyncPlan, device: torch.device | str = "cpu") -> None:
        self.plan, self.device = plan, torch.device(device)
        self._partial: dict[int, tuple[torch.Tensor, int]] = {}  # spec -> (flat uint8 tensor, bytes filled)

    def feed(self, b: int, bucket: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors bucket ``b`` completes, as (name, tensor). A tensor that lies wholly in this
        bucket is a view of ``bucket``: use (copy) it before the next bucket overwrites the buffer."""
        for p in self.plan.buckets[b]:
            spec = self.plan.specs[p.spec]
            size = spec.dtype.itemsize
            raw = bucket[p.offset : p.offset + p.numel * size]
            if p.start == 0 and p.numel == spec.numel:
                yield spec.name, raw.view(spec.dtype).view(spec.shape)
                continue
            flat, filled = self._partial.get(p.spec) or (
                torch.empty(spec.numel * size, dtype=torch.uint8, device=self.device),
                0,
            )
            flat[p.start * size : (p.start + p.numel) * size].copy_(raw)
            filled += p.numel * size
            if filled < spec.numel * size:
                self._partial[p.spec] = (flat, filled)
            else:
                self._partial.pop(p.spec, None)
                yield spec.name, flat.view(spec.dtype).view(spec.shape)


# --------------------------------------------------------------------------- the group


def host_store(host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The group's rendezvous store, served by this process (trainer rank 0) on ``host:port``."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def _broadcast(pg: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    pg.broadcast([tensor], opts).wait()


class WeightLink:
    """One member's end of the sync group: rank 0 sends, the others receive.

    Joining blocks until all ``world`` members have joined generation ``generation``. ``store``:
    the process's own hosted store (rank 0); the others connect to ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        generation: int,
        rank: int,
        world: int,
        backend: str,
        store: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend is {backend!r}; valid: gloo, nccl")
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self.rank, self.world, self.backend = rank, world, backend
        self.store = dist.PrefixStore(f"{STORE_PREFIX}/{generation}/", store)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self.pg: Any = dist.ProcessGroupGloo(self.store, rank, world, timeout)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world, opts)
        self._sent: int | None = None  # the version whose plan is in the store

    # ------------------------------------------------------------------ rank 0
    def send(self, plan: SyncPlan, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Publish ``plan`` and broadcast its buckets, filled from ``tensors`` (in plan order, on any
        device: copied into the bucket buffer on this link's device); returns the bytes sent."""
        if self.rank != 0:
            raise RuntimeError("only group rank 0 (trainer rank 0) sends weights")
        if self._sent is not None:
            self.store.delete_key(_plan_key(self._sent))
        self.store.set(_plan_key(plan.version), plan.to_json())
        self._sent = plan.version
        buffer = torch.empty(plan.bucket_bytes, dtype=torch.uint8, device=self.device)
        for b in pack_buckets(plan, tensors, buffer):
            _broadcast(self.pg, buffer[: plan.sizes[b]])
        return plan.nbytes

    # ------------------------------------------------------------------ ranks 1..
    def read_plan(self, version: int) -> SyncPlan:
        """The plan rank 0 publishes for ``version`` (waits for it, up to the store's timeout)."""
        plan = SyncPlan.from_json(self.store.get(_plan_key(version)))
        if plan.version != version:
            raise RuntimeError(f"weight sync: asked for policy version {version}, the plan is for {plan.version}")
        return plan

    def receive(self, plan: SyncPlan) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of ``plan`` as it completes. Use each before asking for the next: most are
        views of the bucket buffer, which the next broadcast overwrites."""
        buffer = torch.empty(plan.bucket_bytes, dtype=torch.uint8, device=self.device)
        assembler = Assembler(plan, self.device)
        for b, size in enumerate(plan.sizes):
            _broadcast(self.pg, buffer[:size])
            yield from assembler.feed(b, buffer[:size])

    def drain(self, plan: SyncPlan) -> None:
        """Take part in every broadcast of ``plan`` without using it (so rank 0 is not left hanging)."""
        for _ in self.receive(plan):
            pass

    def close(self) -> None:
        self.pg = None


def _plan_key(version: int) -> str:
    return f"plan/{version}"


def receive_into(link: WeightLink, version: int, tensors: Mapping[str, torch.Tensor]) -> int:
    """Receive policy ``version`` into ``tensors`` (name -> the model's parameter or buffer, e.g.
    ``module.state_dict(keep_vars=True)``): strict on names and shapes, checked against the plan
    before anything is copied. Returns the bytes received."""
    plan = link.read_plan(version)
    problem = check_plan(plan, {k: tuple(v.shape) for k, v in tensors.items()})
    if problem is not None:
        link.drain(plan)
        raise ValueError(problem + " (is rollout running the trainer's student?)")
    with torch.no_grad():
        for name, t in link.receive(plan):
            tensors[name].copy_(t)
    return plan.nbytes


def receive_state_dict(link: WeightLink, version: int) -> dict[str, torch.Tensor]:
    """Receive policy ``version`` as a new CPU state dict (for backends that load a whole checkpoint)."""
    plan = link.read_plan(version)
    return {name: t.to("cpu", copy=True) for name, t in link.receive(plan)}


def backend_for(trainer_gpus: float, rollout_gpus: float, colocated: bool = False) -> str:
    """NCCL when both ends hold their weights on GPUs of their own, else gloo (CPU tensors).

    Colocated (``placement.layout: colocated``), trainer rank 0 and rollout replica 0 share a GPU,
    and NCCL refuses a communicator with two ranks on one device ("Duplicate GPU detected", NCCL >=
    2.5), so the group stages the buckets through host memory with gloo. CUDA IPC (each rank
    handing its colocated replica a device handle) would avoid the copies; not built yet."""
    if colocated:
        return "gloo"
    return "nccl" if trainer_gpus > 0 and rollout_gpus > 0 else "gloo"
