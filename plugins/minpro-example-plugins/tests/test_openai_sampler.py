"""The OpenAI-compatible sampler against a fake completions server on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minpro_cli.conformance import check_plugin
from minpro_cli.errors import MinproError
from minpro_cli.modeling import load_policy
from minpro_cli.registry import load_sampler

REQUESTS: list[dict] = []


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers /v1/completions like vLLM with return_tokens_as_token_ids. Each prompt gets the
    tokens [len(prompt) % 90 + 2, 5, 1 (EOS)] with fixed log-probs. Mode 'strings' mimics a
    server without token ids, and mode 'fail' answers 500."""

    mode = "ok"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        REQUESTS.append(body)
        if self.mode == "fail":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"model not loaded")
            return
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            ids = [len(prompt) % 90 + 2, 5, 1]
            tokens = [f"tok{t}" if self.mode == "strings" else f"token_id:{t}" for t in ids]
            choices.append({"index": i, "finish_reason": "stop" if i % 2 == 0 else "length",
                            "logprobs": {"tokens": tokens, "token_logprobs": [-0.5, -1.25, -0.01]}})
        payload = json.dumps({"choices": list(reversed(choices))}).encode()  # order must not matter
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    FakeVLLM.mode = "ok"
    REQUESTS.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_generations_come_back_as_token_ids_with_logprobs(server):
    sampler = load_sampler("openai", base_url=server, batch_size=2, temperature=0.7, top_k=0)
    prompts = [[3, 4], [3, 4, 5], [6]]
    out = sampler.generate(None, prompts, seed=11)
    assert [g.token_ids for g in out] == [[4, 5, 1], [5, 5, 1], [3, 5, 1]]
    assert all(g.logprobs == [-0.5, -1.25, -0.01] for g in out)
    assert [g.finish_reason for g in out] == ["stop", "length", "stop"]
    assert [r["prompt"] for r in REQUESTS] == [[[3, 4], [3, 4, 5]], [[6]]]  # batches of 2, token ids sent
    assert REQUESTS[0]["return_tokens_as_token_ids"] is True and REQUESTS[0]["logprobs"] == 1
    assert REQUESTS[0]["top_k"] == -1 and REQUESTS[0]["temperature"] == 0.7 and REQUESTS[0]["seed"] == 11


def test_server_errors_are_clear(server):
    FakeVLLM.mode = "fail"
    with pytest.raises(MinproError, match="answered 500: model not loaded"):
        load_sampler("openai", base_url=server).generate(None, [[1]], seed=0)
    FakeVLLM.mode = "strings"
    with pytest.raises(MinproError, match="return_tokens_as_token_ids"):
        load_sampler("openai", base_url=server).generate(None, [[1]], seed=0)
    with pytest.raises(MinproError, match="cannot reach"):
        load_sampler("openai", base_url="http://127.0.0.1:9/v1", timeout_s=2).generate(None, [[1]], seed=0)


def test_passes_minpro_conformance_checks(server):
    results = check_plugin("samplers", "openai", {"base_url": server}, policy=lambda: load_policy("embedded"))
    assert all(r.passed for r in results), [r for r in results if not r.passed]
