"""Remote teacher backend: a teacher that a vLLM OpenAI-compatible server runs elsewhere (another
team's endpoint, another cluster), scored over HTTP with the completions API's prompt log-probs.

    teachers:
      math:
        backend: remote
        path: /models/Qwen3-8B-tokenizer        # the served model's tokenizer + config.json, no weights
        remote: {url: "http://teacher-host:8000/v1", api_key_env: TEACHER_KEY}

    worker = RemoteTeacherWorker("math", teacher_cfg, seed=0, max_logprobs=64)
    scores = worker.score(input_ids, attention_mask, response_mask, topk=64)

Token ids go in and come back (``prompt`` as a list of ids, ``return_token_ids``): the student's
ids are what is scored, never a text round trip. Each row's response is prefilled as the prompt of a
one-token request with ``prompt_logprobs=k``, as the in-process vLLM backend does with its engine
(teachers/vllm.py), so both give the same numbers from the same engine. A response lists, per
position after the first, a dict ``{token id: {logprob, rank, decoded_token}}`` holding the
position's own token and the ``k`` most likely ones (``rank`` 1..k).

The server is checked before it is trusted (``check_server``; ``mopd check`` and every worker at
start-up run it): it serves the named model, tokenises a probe text into the ids the local
tokenizer gives, decodes ids as the local tokenizer does, knows exactly the local tokenizer's ids,
and answers ``k`` prompt log-probs (vLLM's ``--max-logprobs`` defaults to 20). Requests that time
out, lose their connection or get a 429 / 5xx answer are retried ``remote.retries`` times with
exponential back-off; any other error answer is raised with the server's message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mopd.config import ConfigError, TeacherConfig
from mopd.dist.runtime import set_torch_threads
from mopd.models import load_tokenizer, model_config
from mopd.types import TeacherScores
from mopd.vocab import PROBE_TEXT, config_vocab_size, tokenizer_signature
from teachers.common import check_score_inputs, empty_scores, put_row_scores, row_chunks, rows_to_score

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_S = 0.5  # first wait before a retry; doubles each time
# Ids spread over the vocabulary whose decoding the server must share with the local tokenizer.
DECODE_SAMPLE = 512


class RemoteTeacherError(RuntimeError):
    """The server could not be reached, or answered with an error or with scores that do not fit."""


class ServerMismatchError(ConfigError):
    """The server serves another model, tokenizer or vocabulary than the recipe names."""


def api_key(cfg: TeacherConfig, key: str) -> str | None:
    """The API key named by ``remote.api_key_env`` from this process's environment (None: no key)."""
    var = cfg.remote.api_key_env
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"{key}.remote.api_key_env: the environment variable {var} is not set (the server's API key)")
    return value


class RemoteServer:
    """The HTTP client of one vLLM OpenAI-compatible server (``url`` ends in ``/v1``).

    Every call retries ``retries`` times on a timeout, a lost connection or a 429 / 5xx answer
    (back-off 0.5 s, 1 s, 2 s, ...) and raises ``RemoteTeacherError`` with the server's message
    otherwise. Thread-safe: the worker sends several requests at once."""

    def __init__(
        self, url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 3
    ) -> None:
        import httpx

        self.url, self.model, self.retries = url.rstrip("/"), model, retries
        # /tokenize and /detokenize sit at the server's root, beside /v1.
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)
        self.attempts = 0  # requests sent, retries included

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, url: str, body: Mapping[str, Any] | None = None) -> Any:
        """The JSON answer of one request, retried as the class says."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                r = self._http.request(method, url, json=body)
            except httpx.TimeoutException as e:
                last = f"no answer within {self._http.timeout.read} s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {_message(r)}"
                continue
            if r.status_code >= 400:
                raise RemoteTeacherError(f"{method} {url}: HTTP {r.status_code}: {_message(r)}")
            return r.json()
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        raise RemoteTeacherError(f"{method} {url}: failed after {tries}; last: {last}")

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("GET", f"{self.url}/models")["data"]]

    def tokenize(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": True}
        return list(self.request("POST", f"{self.root}/tokenize", body)["tokens"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(
            self.request("POST", f"{self.root}/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"]
        )

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], k: int) -> list[dict[str, Any]]:
        """One completion choice per prompt, in prompt order: ``prompt_logprobs`` (k top log-probs
        per position) and ``prompt_token_ids`` (what the server scored)."""
        body = {
            "model": self.model,
            "prompt": [list(p) for p in prompts],
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": k,
            "return_token_ids": True,
        }
        choices = self.request("POST", f"{self.url}/completions", body)["choices"]
        if len(choices) != len(prompts):
            raise RemoteTeacherError(f"{self.url}: {len(choices)} completions for {len(prompts)} prompts")
        return sorted(choices, key=lambda c: c["index"])


def _message(r: Any) -> str:
    """The error text of an answer (vLLM: ``{"error": {"message": ...}}``), shortened."""
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        text = r.text
    return " ".join(str(text).split())[:500]


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class ServerCheck:
    check: str
    ok: bool
    result: str


def check_server(server: RemoteServer, tokenizer: Any, rows: int, topk: int, key: str) -> list[ServerCheck]:
    """What the server must share with the local copy of its tokenizer (``key`` names the recipe
    entry in messages): the model, the ids of a probe text, the text of ids spread over the
    vocabulary, the vocabulary's size, and ``topk`` prompt log-probs. Stops at the first check the
    server fails to answer (an unreachable server raises ``RemoteTeacherError``)."""
    out = []
    served = server.models()
    if server.model not in served:
        out.append(
            ServerCheck(
                "served model",
                False,
                f"{server.url} serves {', '.join(served) or 'nothing'}, not {server.model} "
                f"(set {key}.remote.model to the served name, or point {key}.remote.url at the right server)",
            )
        )
        return out
    out.append(ServerCheck("served model", True, f"{server.model} at {server.url}"))
    local = list(tokenizer(PROBE_TEXT)["input_ids"])
    remote = server.tokenize(PROBE_TEXT)
    if remote != local:
        at = next(
            (i for i, (a, b) in enumerate(zip(remote, local, strict=False)) if a != b), min(len(remote), len(local))
        )
        out.append(
            ServerCheck(
                "probe ids",
                False,
                f"the server tokenises the probe text into {len(remote)} ids, {key}.path's tokenizer into "
                f"{len(local)}; first difference at {at}: {remote[at : at + 3]} vs {local[at : at + 3]}",
            )
        )
    else:
        out.append(ServerCheck("probe ids", True, f"{len(local)} ids, as {key}.path's tokenizer gives"))
    n = len(tokenizer)
    sample = sorted({round(i * (n - 1) / (DECODE_SAMPLE - 1)) for i in range(DECODE_SAMPLE)})
    text, want = server.detokenize(sample), tokenizer.decode(sample)
    if text != want:
        out.append(
            ServerCheck(
                "decoded ids",
                False,
                f"{len(sample)} ids spread over {n} decode to other text than {key}.path's tokenizer gives",
            )
        )
    else:
        out.append(ServerCheck("decoded ids", True, f"{len(sample)} ids spread over the {n} decode alike"))
    out.append(_vocabulary_check(server, rows, key))
    out.append(_logprobs_check(server, local[:4], topk))
    return out


def _vocabulary_check(server: RemoteServer, rows: int, key: str) -> ServerCheck:
    """The server's model must score id ``rows - 1`` and refuse id ``rows`` (vLLM refuses a prompt
    id past its model's vocabulary): as many output rows as ``path``'s config.json says. (Its
    ``/detokenize`` refuses nothing: ids past the tokenizer decode to "".)"""
    try:
        server.prompt_logprobs([[0, rows - 1]], 0)
    except RemoteTeacherError as e:
        return ServerCheck("vocabulary", False, f"refuses id {rows - 1} of {key}.path's {rows} output rows: {e}")
    try:
        server.prompt_logprobs([[0, rows]], 0)
    except RemoteTeacherError:
        return ServerCheck("vocabulary", True, f"{rows} output rows, as {key}.path's config.json says")
    return ServerCheck(
        "vocabulary", False, f"scores id {rows}: its model has more than the {rows} output rows of {key}.path"
    )


def _logprobs_check(server: RemoteServer, ids: list[int], topk: int) -> ServerCheck:
    ids = ids if len(ids) >= 2 else [*ids, *ids, 0][:2]
    try:
        choice = server.prompt_logprobs([ids], topk)[0]
    except RemoteTeacherError as e:
        return ServerCheck(
            "prompt log-probs",
            False,
            f"{topk} per position refused ({e}); start the server with --max-logprobs {max(topk, 1)}",
        )
    if choice.get("prompt_token_ids") != ids:
        return ServerCheck(
            "prompt log-probs", False, "the server scored other ids than it was sent (does it take token-id prompts?)"
        )
    return ServerCheck("prompt log-probs", True, f"top-{topk} per position")


# --------------------------------------------------------------------------- the worker


class RemoteTeacherWorker:
    """A client of one server: scores (B, T) batches over HTTP, ``cfg.batch_size`` rows a request,
    up to ``cfg.remote.concurrency`` requests at once (the server batches them with its others).

    max_logprobs  the largest ``topk`` ``score`` will be asked for: the server must answer it
    """

    def __init__(
        self,
        name: str,
        cfg: TeacherConfig,
        seed: int,
        *,
        max_logprobs: int = 64,
        set_threads: bool = True,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        if adapters or cfg.adapter:
            raise ValueError(f"teachers.{name}: adapter teachers run on the hf backend, not remote")
        if set_threads:
            set_torch_threads(cfg.resources.num_cpus)
        key, r = f"teachers.{name}", cfg.remote
        if r.url is None or cfg.path is None:
            raise ConfigError(f"{key}: backend remote needs remote.url and path (mopd validate says more)")
        self.name, self.cfg, self.max_logprobs = name, cfg, max_logprobs
        self.tokenizer = load_tokenizer(cfg)
        self.model_vocab_size = config_vocab_size(model_config(cfg))
        self.server = RemoteServer(r.url, r.model or cfg.path, api_key(cfg, key), r.timeout_s, r.retries)
        checks = check_server(self.server, self.tokenizer, self.model_vocab_size, max_logprobs, key)
        failed = [c for c in checks if not c.ok]
        if failed:
            self.server.close()
            raise ServerMismatchError(f"{key}: " + "; ".join(f"{c.check}: {c.result}" for c in failed))
        self._pool = ThreadPoolExecutor(r.concurrency, thread_name_prefix=f"remote-{name}")

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        return {}

    def vocab_signature(self) -> dict[str, Any]:
        """The local copy's signature: ``check_server`` found the server's tokenizer to be that one."""
        return tokenizer_signature(self.tokenizer, self.model_vocab_size)

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        topk: int = 0,
        domains: Sequence[str] | None = None,
    ) -> TeacherScores:
        """Teacher log-probs of the response tokens; the contract of ``TeacherWorker.score``
        (``domains`` unused: one model)."""
        start = time.perf_counter()
        check_score_inputs(input_ids, attention_mask, response_mask, topk)
        if topk > self.max_logprobs:
            raise ValueError(
                f"teacher '{self.name}': topk={topk} exceeds the max_logprobs={self.max_logprobs} it was started with"
            )
        B, T = input_ids.shape
        out = empty_scores(B, T, topk)
        rows, spans = rows_to_score(attention_mask, response_mask)
        prompts = [input_ids[i, a:b].tolist() for i, (a, b) in zip(rows, spans, strict=True)]
        chunks = list(row_chunks(len(prompts), self.cfg.batch_size))
        answers = self._pool.map(lambda c: self.server.prompt_logprobs(prompts[c], topk), chunks)
        choices = [choice for answer in answers for choice in answer]
        for i, (a, b), ids, choice in zip(rows, spans, prompts, choices, strict=True):
            if choice.get("prompt_token_ids") != ids:
                raise RemoteTeacherError(f"teacher '{self.name}': the server scored other ids than it was sent")
            lp, top = choice_to_tensors(choice["prompt_logprobs"], ids, topk)
            put_row_scores(out, i, slice(a, b), response_mask[i, a:b], lp, top)
        out.latency_s = time.perf_counter() - start
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.server.close()


def choice_to_tensors(
    prompt_logprobs: Sequence[Mapping[str, Mapping[str, Any]] | None], ids: Sequence[int], k: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One prompt's ``prompt_logprobs`` (JSON) -> log-probs (n,) f32 of ``ids`` and, with k > 0,
    top-k ids (n, k) int64 and log-probs (n, k) f32 in rank order; position 0 (no context) is 0."""
    n = len(ids)
    if len(prompt_logprobs) != n:
        raise RemoteTeacherError(f"the server returned prompt log-probs for {len(prompt_logprobs)} of {n} positions")
    own, top_ids, top_lp = [0.0], [[0] * k], [[0.0] * k]  # position 0: no context
    for j in range(1, n):
        entries = prompt_logprobs[j]
        mine = None if entries is None else entries.get(str(ids[j]))
        if entries is None or mine is None:
            raise RemoteTeacherError(f"the server returned no log-prob for token {ids[j]} at position {j}")
        own.append(mine["logprob"])
        if k:
            ranked = sorted((e["rank"], int(t), e["logprob"]) for t, e in entries.items() if e["rank"] <= k)
            if len(ranked) != k:
                raise RemoteTeacherError(f"the server returned {len(ranked)} top log-probs at position {j}, not {k}")
            top_ids.append([t for _, t, _ in ranked])
            top_lp.append([v for _, _, v in ranked])
    lp = torch.tensor(own, dtype=torch.float32)
    if not k:
        return lp, None
    return lp, (torch.tensor(top_ids, dtype=torch.int64), torch.tensor(top_lp, dtype=torch.float32))


if TYPE_CHECKING:  # mypy holds the class to the contract TeacherPool calls (teachers/backend.py)
    from teachers.backend import TeacherBackend, TeacherWorker

    _backend: TeacherBackend = RemoteTeacherWorker  # the constructor, as the pool calls it

    def _conforms(worker: RemoteTeacherWorker) -> TeacherWorker:  # an error here names the method that differs
        return worker
