"""A sampler that asks an OpenAI-compatible completions server (vLLM, SGLang) for tokens and log-probs."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.errors import MinproError
from minpro_cli.modeling import Policy
from minpro_cli.samplers import Generation

TOKEN_ID_PREFIX = "token_id:"


class OpenAICompletionsSampler(BaseModel):
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
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k (sent as -1)")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts per request")
    timeout_s: float = Field(300.0, gt=0.0, description="per request")

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            out.extend(self._request(chunk, seed + start))
        return out

    def _request(self, prompts: list[list[int]], seed: int) -> list[Generation]:
        body = {
            "model": self.model,
            "prompt": prompts,
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
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise MinproError(f"sampler 'openai': {self.base_url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError) as exc:
            raise MinproError(f"sampler 'openai': cannot reach {self.base_url} ({exc}); is the server up?") from None
        choices = sorted(payload.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise MinproError(f"sampler 'openai': {len(choices)} choices for {len(prompts)} prompts")
        return [parse_choice(choice) for choice in choices]


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
