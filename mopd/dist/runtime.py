"""What the worker pools share: connecting to Ray, an actor's environment, a free port, an even split;
and whether a path lies in Ray's copy of a submitted job's working dir.

Ray: an existing cluster (recipe ``ray.address`` or ``RAY_ADDRESS``, which is also how
``ray job submit -- mopd train ...`` reaches the driver), otherwise a local Ray for the run."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mopd.config import ConfigError, MOPDConfig

log = logging.getLogger(__name__)

# Keep each actor to its own threads: several actors spin-waiting on 2 cores slow each other ~15x.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def required_cpus(cfg: MOPDConfig) -> float:
    """Logical CPUs the recipe's actors ask for."""
    total = cfg.trainer.world_size * cfg.trainer.resources.num_cpus
    total += cfg.rollout.replicas * cfg.rollout.resources.num_cpus
    total += sum(t.replicas * t.resources.num_cpus for t in cfg.teachers.values())
    return total


def actor_threads(num_cpus: float) -> int:
    """Threads of an actor that reserved ``num_cpus`` CPUs: one per CPU, at least one (more would
    fight the other actors on the same cores)."""
    return max(1, int(num_cpus))


def set_torch_threads(num_cpus: float) -> None:
    """Set this process's torch threads for ``num_cpus`` reserved CPUs (``actor_env`` sets the
    OpenMP/MKL environment of a Ray actor; this sets torch inside it)."""
    import torch

    torch.set_num_threads(actor_threads(num_cpus))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def actor_env(num_cpus: float, *extra: Mapping[str, str]) -> dict[str, str]:
    """Environment variables of a Ray actor that reserved ``num_cpus`` CPUs: one OpenMP / MKL
    thread per CPU (at least one), threads that sleep instead of spinning, no tokenizer thread
    pool; then each of ``extra`` in order (later ones win), e.g. backend settings, ``ray.env``."""
    threads = str(actor_threads(num_cpus))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **ACTOR_ENV}
    for more in extra:
        env.update(more)
    return env


def init_ray(cfg: MOPDConfig) -> None:
    """Start or join Ray once; a no-op when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        try:
            ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        except Exception as e:  # Ray's AuthenticationError, or a ConnectionError caused by one
            if not _caused_by_authentication(e):
                raise
            raise ConfigError(
                f"the Ray cluster at {address} uses token authentication and refused this driver: export "
                "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token (README, 'On a Ray cluster')"
            ) from None
        return
    # A local Ray sized to the recipe: logical CPUs may exceed the cores (actors keep one thread
    # each), otherwise a 2-core laptop could not place trainer + rollout + teachers at once.
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(required_cpus(cfg) + 0.999))
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(**local_ray_kwargs(cfg, num_cpus))


def _caused_by_authentication(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception that caused it says that authentication failed."""
    seen = 0
    while e is not None and seen < 8:
        if type(e).__name__ == "AuthenticationError" or "authenticationerror" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def local_ray_kwargs(cfg: MOPDConfig, num_cpus: int) -> dict[str, Any]:
    """``ray.init`` arguments of a local run: the dashboard is off unless the recipe turns it on,
    and then it listens on 127.0.0.1 only."""
    return dict(
        # "local": a new Ray, even where `ray start` left a cluster whose address Ray would otherwise
        # pick up from /tmp/ray/ray_current_cluster (and then refuse num_cpus). Joining a cluster is
        # what ray.address / RAY_ADDRESS are for.
        address="local",
        num_cpus=num_cpus,
        namespace=cfg.ray.namespace,
        include_dashboard=cfg.ray.include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": dict(ACTOR_ENV)},
        # No idle workers started ahead: every actor of a run sets its own environment (its thread
        # count), so none would use them, and on 2 cores their start-up delayed the actors' by ~6 s
        # (the tests' reference run: 65.3 -> 58.8 s, benchmarks/startup.py).
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
    )


# What the job supervisor sets in a `ray job submit` driver's environment: the job's runtime env.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_working_dir_copy(path: str | os.PathLike) -> Path | None:
    """The copy of a job's ``--working-dir`` that Ray unpacked on this node, if ``path`` lies in it
    (a relative path resolves against the current directory, which in a submitted job is that copy);
    otherwise None. Ray unpacks it to ``<temp dir>/session_*/runtime_resources/working_dir_files/
    _ray_pkg_<hash>/``, where nobody looks for outputs and which Ray deletes when it evicts the
    package. Recognised by those path components, and by the current directory when the job's
    runtime env (``RAY_JOB_CONFIG_JSON_ENV_VAR``) names a working dir that Ray copied (any URI but
    ``local://``, which Ray uses in place)."""
    resolved = Path(path).resolve()
    parts = resolved.parts
    for i, part in enumerate(parts):
        if part.startswith("_ray_pkg_") and "runtime_resources" in parts[:i]:
            return Path(*parts[: i + 1])
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    if not isinstance(working_dir, str) or not working_dir or working_dir.startswith("local://"):
        return None
    cwd = Path.cwd().resolve()
    return cwd if resolved.is_relative_to(cwd) else None


def warn_if_in_ray_working_dir(paths: Mapping[str, str | os.PathLike]) -> list[str]:
    """Log a warning for each recipe key (e.g. ``run.output_dir``) whose path lies in Ray's copy of a
    submitted job's working dir (``ray_working_dir_copy``); returns those keys."""
    keys = []
    for key, path in paths.items():
        copy = ray_working_dir_copy(path)
        if copy is None:
            continue
        keys.append(key)
        log.warning(
            "%s resolves to %s, inside Ray's unpacked copy of the job's working dir (%s): nobody will find "
            "the outputs there, other nodes cannot read them, and Ray deletes the copy when it evicts the "
            "package. Set %s to an absolute path on storage that every node mounts, e.g. %s=/shared/mopd/<run>",
            key,
            Path(path).resolve(),
            copy,
            key,
            key,
        )
    return keys


def free_port(host: str) -> int:
    """A TCP port free on this machine for ``host`` ("" for every interface), e.g. for the trainer's
    process-group rendezvous."""
    return free_ports(host, 1)[0]


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct TCP ports free on this machine for ``host`` (each socket stays bound until all
    are, so no two are the same), e.g. for rendezvous of process groups started side by side."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def split_evenly(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size (the first ones get the remainder);
    empty ranges (all at the end) are dropped, so fewer items than parts uses fewer parts."""
    sizes = [n_items // n_parts + (1 if i < n_items % n_parts else 0) for i in range(n_parts)]
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
