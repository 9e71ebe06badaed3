"""The README's cluster commands, run as written: a local head node (dashboard on 127.0.0.1, free
ports, a temp dir of its own, a HOME with no Ray token, as on a fresh machine) started with the
README's head block, then a 3-step `recipes/tiny.yaml` job submitted with its submit block.

Regression test for issue 15: `ray job submit` failed with the documented install (no
`ray[default]`), then with `AuthenticationError: Missing authentication token` (a token file left by
a local run turned auth on at `ray start`, and the job CLI sent no token), and the job's outputs
landed in Ray's unpacked copy of the working dir. Stops only the head it started: never `ray stop`
(it stops every Ray on the machine, and other clusters run here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mopd.dist.runtime import RAY_JOB_CONFIG_ENV, free_port, ray_working_dir_copy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `ray` and `mopd`


def readme_block(name: str) -> str:
    """The bash block between ``<!-- name -->`` and ``<!-- /name -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)```\s*<!-- /{name} -->", text, re.S)
    assert m, f"README.md has no ```bash block between <!-- {name} --> and <!-- /{name} -->"
    return m.group(1)


def test_readme_blocks_are_the_cluster_path():
    """The blocks the cluster test runs say what the README promises: token auth, the dashboard
    reachable from other machines, a job whose outputs go to shared storage."""
    head, submit = readme_block("cluster-head"), readme_block("cluster-submit")
    assert "export RAY_AUTH_MODE=token" in head and "export RAY_AUTH_MODE=token" in submit
    assert re.search(r"^ray start --head\b.*--dashboard-host=0\.0\.0\.0", head, re.M)
    assert re.search(r"^ray job submit --working-dir \. -- mopd train recipes/tiny\.yaml\b", submit, re.M)
    assert 'run.output_dir="$SHARED/' in submit


def test_working_dir_copy_is_recognised(tmp_path, monkeypatch):
    """By Ray's layout of an unpacked package, and by the current directory in a job whose runtime
    env names a working dir that Ray copied; a `local://` working dir is used in place."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    assert ray_working_dir_copy(copy / "runs" / "tiny") == copy
    assert ray_working_dir_copy(tmp_path / "runs" / "tiny") is None
    assert ray_working_dir_copy(tmp_path / "_ray_pkg_abc" / "runs") is None  # no runtime_resources above it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}))
    assert ray_working_dir_copy("runs/tiny") == tmp_path.resolve()
    assert ray_working_dir_copy("/elsewhere/runs") is None
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": f"local://{tmp_path}"}}))
    assert ray_working_dir_copy("runs/tiny") is None


def test_train_warns_when_outputs_go_to_the_copy(tmp_path, monkeypatch, caplog):
    """`mopd train`'s warning names the key to set (run.output_dir) and the copy."""
    from mopd.dist.runtime import warn_if_in_ray_working_dir

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0f"
    with caplog.at_level("WARNING", logger="mopd"):
        keys = warn_if_in_ray_working_dir({"run.output_dir": copy / "runs/tiny", "checkpoint.dir": tmp_path / "ck"})
    assert keys == ["run.output_dir"]
    assert "run.output_dir" in caplog.text and str(copy) in caplog.text and "absolute path" in caplog.text


def _our_pids(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this test's unique Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _sigkill(kill: Callable[[int, int], None], target: int) -> None:
    try:
        kill(target, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_until_started(log: Path, proc: subprocess.Popen, ports: list[int], timeout: float) -> None:
    """Until `ray start` says the node is up (its raylet registered) and ``ports`` accept connections
    (the dashboard, and the agent that runs the jobs: it registers right after it listens), or the
    head exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace") and all(_accepts(p) for p in ports):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the head node exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"the head node did not start in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _head_script(block: str, local: list[str]) -> str:
    """The README's head block with ``local`` appended to the words of its one `ray start --head`
    line (its comment dropped: options appended after a `#` would be ignored, and a head on the
    default ports would start and register itself in /tmp/ray/ray_current_cluster, where every
    plain `ray.init()` on the machine would then go), run with `exec` so that the head is the
    process the test stops."""
    lines = block.splitlines()
    starts = [i for i, line in enumerate(lines) if shlex.split(line, comments=True)[:3] == ["ray", "start", "--head"]]
    assert len(starts) == 1, f"the README's head block needs one `ray start --head` line:\n{block}"
    words = shlex.split(lines[starts[0]], comments=True) + local
    lines[starts[0]] = "exec " + shlex.join(words)
    return "\n".join(lines) + "\n"


def test_head_script_keeps_the_local_settings_out_of_the_comment():
    """Regression: appending the test's options to a `ray start` line that ends in a comment put
    them inside the comment; a head on the default ports started in /tmp/ray instead."""
    script = _head_script(
        "export A=1  # a\nray start --head --port=6379  # the GCS's port\n", ["--temp-dir=/t", "--block"]
    )
    assert script.splitlines() == ["export A=1  # a", "exec ray start --head --port=6379 --temp-dir=/t --block"]


@pytest.fixture(scope="module")
def head_node() -> Iterator[dict]:
    """The README's head block, with the local settings a shared test machine needs appended to its
    `ray start` line (click takes the last value of a repeated option: 127.0.0.1, free ports, a temp
    dir of its own) and `--block`, so that stopping this one process stops this head and nothing else."""
    base = Path(tempfile.mkdtemp(prefix="mopd-cl-", dir="/tmp"))  # short: Ray's socket paths must fit
    home, temp_dir = base / "home", base / "ray"
    home.mkdir()
    gcs_port, dash_port, agent_port = (free_port("127.0.0.1") for _ in range(3))
    local = [
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={free_port('127.0.0.1')}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=8",
        "--disable-usage-stats",
        "--block",
    ]
    script = _head_script(readme_block("cluster-head"), local)
    # A fresh machine: no token in HOME, no Ray settings inherited from this process (an earlier
    # test's ray.init sets RAY_AUTH_MODE in os.environ).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM, stop at once (nothing here to drain)
    env["RAY_TMPDIR"] = str(base)  # Ray's default temp dir too: nothing of this head lands in /tmp/ray
    log = open(base / "head.log", "w")
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the head's processes, and nothing else
    )
    try:
        _wait_until_started(base / "head.log", proc, [dash_port, agent_port], timeout=240)
        yield dict(
            env=env,
            base=base,
            temp_dir=temp_dir,
            gcs_port=gcs_port,
            dashboard=f"http://127.0.0.1:{dash_port}",
            log=base / "head.log",
        )
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        deadline = time.monotonic() + 15
        while (left := _our_pids(str(temp_dir))) and time.monotonic() < deadline:
            time.sleep(0.5)
        # Whatever of this head is left: processes naming its temp dir, and its own process group.
        for pid in left:
            _sigkill(os.kill, pid)
        _sigkill(os.killpg, proc.pid)
        shutil.rmtree(base, ignore_errors=True)


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_job_submit_on_a_cluster(head_node):
    """The README's submit block against the head: refused without the token, then the job
    succeeds, its driver joined this cluster (no second GCS: it connected to this head's GCS port,
    and the run's actors are this cluster's), and its outputs are in `$SHARED/mopd/tiny`, not in
    Ray's copy of the working dir, whose path mopd's warning recognises."""
    shared = head_node["base"] / "shared"
    env = {**head_node["env"], "RAY_ADDRESS": head_node["dashboard"], "SHARED": str(shared)}
    ray = str(BIN / "ray")

    # Token auth is on: the token in HOME alone does not get a client in (the failure mode).
    refused = _run([ray, "job", "list"], env, timeout=60)
    assert refused.returncode != 0 and "authentication token" in refused.stdout + refused.stderr, refused
    # A driver pointed at the cluster without RAY_AUTH_MODE: one line saying what to set, exit 2.
    gcs = f"127.0.0.1:{head_node['gcs_port']}"
    train = [str(BIN / "mopd"), "train", "recipes/tiny.yaml", f"ray.address={gcs}", f"run.output_dir={shared}/x"]
    no_token = _run(train, {k: v for k, v in env.items() if k != "RAY_ADDRESS"}, timeout=120)
    assert no_token.returncode == 2, no_token.stderr[-3000:]
    assert "export RAY_AUTH_MODE=token" in no_token.stderr.strip().splitlines()[-1], no_token.stderr[-3000:]

    proc = _run(["bash", "-euo", "pipefail", "-c", readme_block("cluster-submit")], env, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{out[-4000:]}\n--- head:\n{head_node['log'].read_text()[-2000:]}"
    assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
    # The driver was handed this cluster's GCS address and connected to it (mopd logs which).
    # (Ray puts the node's own IP, not 127.0.0.1, in a head node's GCS address.)
    assert re.search(rf"connecting to Ray at \S+:{head_node['gcs_port']}\b", out), out[-3000:]
    assert "starting a local Ray" not in out

    authed = {**env, "RAY_AUTH_MODE": "token"}
    listed = _run([ray, "list", "actors", "--format=json", "--limit=1000"], authed, timeout=60)
    assert listed.returncode == 0, listed.stderr[-2000:]
    classes = {a["class_name"] for a in json.loads(listed.stdout)}
    assert any("Trainer" in c for c in classes) and any("Teacher" in c for c in classes), classes

    run_dir = shared / "mopd" / "tiny"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3, steps
    assert (run_dir / "checkpoints" / "step_000003").is_dir()
    unpacked = head_node["temp_dir"].glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    copies = sorted({c.resolve() for c in unpacked if c.is_dir()})  # not the zips' lock files
    assert copies, "no unpacked working dir found under the head's temp dir"
    assert not any((c / "runs").exists() for c in copies), "outputs were written into Ray's copy of the working dir"
    assert ray_working_dir_copy(copies[0] / "runs" / "tiny") == copies[0]  # the warning's detection, on Ray's layout


# In a submitted job: where a relative run.output_dir resolves, and mopd's warning about it.
WARN_JOB = (
    "import logging; logging.basicConfig(); from mopd.dist.runtime import warn_if_in_ray_working_dir as w; "
    "assert w({'run.output_dir': 'runs/tiny'}) == ['run.output_dir']"
)


@pytest.mark.slow
@pytest.mark.extended  # the detection is covered above on Ray's real layout, and in-process
def test_relative_output_dir_in_a_job_warns(head_node):
    """In a submitted job, a relative run.output_dir resolves in Ray's copy of the working dir, and
    mopd's warning (what `mopd train` logs) names the key and the copy."""
    env = {**head_node["env"], "RAY_ADDRESS": head_node["dashboard"], "RAY_AUTH_MODE": "token"}
    ray = str(BIN / "ray")
    warned = _run([ray, "job", "submit", "--working-dir", ".", "--", "python", "-c", WARN_JOB], env, timeout=120)
    out = warned.stdout + warned.stderr
    assert warned.returncode == 0, out[-3000:]
    assert re.search(
        r"run\.output_dir resolves to \S*/runtime_resources/working_dir_files/_ray_pkg_\w+/runs/tiny", out
    ), out[-3000:]
