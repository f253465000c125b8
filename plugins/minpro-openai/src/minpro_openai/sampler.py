"""A sampler that asks an OpenAI-compatible completions server (vLLM, SGLang) for tokens and log-probs."""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ConfigDict, Field

from minpro_cli.errors import MinproError
from minpro_cli.modeling import Policy
from minpro_cli.samplers import Generation, SamplingParams

TOKEN_ID_PREFIX = "token_id:"


class OpenAICompletionsSampler(SamplingParams):
    """Samples from an OpenAI-compatible /v1/completions server, with token ids and log-probs.

    Prompts go out as token ids and come back as token ids (`return_tokens_as_token_ids`,
    vLLM ≥ 0.6), so nothing is re-tokenized. MinPRO needs log μ of the distribution the token
    was actually drawn from: start vLLM with `--logprobs-mode processed_logprobs`, or keep
    temperature 1, top_p 1, top_k 0, or the recorded log-probs are the raw model's. The
    server must serve the weights being trained (sync them before each round).
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field("http://127.0.0.1:8000/v1", description="server root, ending in /v1")
    model: str = Field("default", description="model name the server knows")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    top_k: int = Field(0, ge=0, description="0 disables top-k (sent as -1)")
    concurrency: int = Field(32, ge=1, description="requests in flight (one prompt each; the server batches them)")
    timeout_s: float = Field(300.0, gt=0.0, description="per request")
    max_retries: int = Field(4, ge=0, description="retries of a failed request (refused, timeout, 429, 5xx)")
    backoff_s: float = Field(1.0, ge=0.0, description="wait before the first retry; doubles each time")

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]:
        # one prompt per request: a request's seed seeds each of its prompts alike, so a group of
        # equal prompts in one request would get equal responses
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda i: self._request(prompts[i], seed + i), range(len(prompts))))

    def _request(self, prompt: list[int], seed: int) -> Generation:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or -1,
            "seed": seed,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        request = urllib.request.Request(
            f"{self.base_url.rstrip('/')}/completions", data=json.dumps(body).encode(), headers=headers
        )
        choices = self._send(request).get("choices", [])
        if len(choices) != 1:
            raise MinproError(f"sampler 'openai': {len(choices)} choices for one prompt (expected 1)")
        return parse_choice(choices[0])

    def _send(self, request: urllib.request.Request) -> dict[str, Any]:
        """POST with retries; the last failure becomes one clear error."""
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                failure = f"{self.base_url} answered {exc.code}: {detail}"
                if exc.code != 429 and exc.code < 500:
                    raise MinproError(f"sampler 'openai': {failure}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                failure = f"cannot reach {self.base_url} ({reason or type(exc).__name__}); is the server up?"
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * 2**attempt * random.uniform(0.75, 1.25))
        raise MinproError(
            f"sampler 'openai': {failure} (after {self.max_retries + 1} attempts, timeout_s {self.timeout_s})"
        )


def parse_choice(choice: dict[str, Any]) -> Generation:
    logprobs = choice.get("logprobs") or {}
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if tokens is None or values is None:
        raise MinproError("sampler 'openai': the server returned no token log-probs (the request sets logprobs=1)")
    if any(not str(t).startswith(TOKEN_ID_PREFIX) for t in tokens):
        raise MinproError(
            "sampler 'openai': the server returned token strings, not ids; it must support "
            "return_tokens_as_token_ids (vLLM ≥ 0.6, SGLang)"
        )
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return Generation(
        token_ids=[int(str(t)[len(TOKEN_ID_PREFIX) :]) for t in tokens],
        logprobs=[float(v) for v in values],
        finish_reason=finish,
    )
