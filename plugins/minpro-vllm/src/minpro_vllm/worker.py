"""The vLLM side of the `vllm` sampler: runs in the vllm environment, never imports minpro.

Started by `minpro_vllm.sampler` as `<vllm-python> worker.py`, it reads one JSON request per
line on stdin and answers one JSON line on the protocol pipe (the original stdout; vLLM's
own logging is moved to stderr):

    {"op": "load", "model": DIR, "engine": {...LLM kwargs}}            → {"ok": true}
    {"op": "update", "table": T, "module": M}  weights from the shared-memory segment whose
        table is T, read by minpro's weightsync module at path M    → {"version": V}
    {"op": "reload", "model": DIR}   weights re-read from DIR in place  → {"ok": true}
    {"op": "generate", "prompts": [[ids]], "seed": S, "seed_mode": "prompt" | "round",
     "sampling": {...}, "results": FILE}  → {"lengths": [...], "finish_reasons": [...]}
        FILE gets every response's token ids (int32), then their log-probs (float32), back to
        back: binary, not JSON text (a round of 1,024 × 8k tokens would be ~250 MB of it)

Errors come back as {"error": "..."}; the worker keeps serving.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def sampled_logprobs(completion: Any) -> list[float]:
    # logprobs=0 returns the sampled token's entry only; the mode is processed_logprobs, so this
    # is log μ of the distribution after temperature and any top-k / top-p truncation
    return [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]


class Engine:
    def __init__(self) -> None:
        self.llm: Any = None

    def load(self, model: str, engine: dict[str, Any]) -> dict[str, Any]:
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM 0.32 on CPU fails on a seeded request whose prefill was split across steps
            # ("CPU Generator does not use offset"): prefill whole prompts there, and only there
            engine = {"enable_chunked_prefill": False} | engine
        self.llm = LLM(model=model, logprobs_mode="processed_logprobs", **engine)
        return {"ok": True}

    def update(self, table: str, module: str) -> dict[str, Any]:
        versions = self.llm.collective_rpc("load_segment", kwargs={"table": table, "module": module})
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        return {"version": versions[0]}

    def reload(self, model: str) -> dict[str, Any]:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model})
        self.llm.reset_prefix_cache()
        return {"ok": True}

    def generate(
        self, prompts: list[list[int]], seed: int, seed_mode: str, sampling: dict[str, Any], results: str
    ) -> dict[str, Any]:
        import numpy as np
        from vllm import SamplingParams

        if seed_mode == "prompt":  # a generator per request: vLLM's per-request sampling path
            params = [SamplingParams(seed=seed + i, logprobs=0, **sampling) for i in range(len(prompts))]
        else:  # one seed for the engine's generator, then vLLM's batched path
            self.llm.collective_rpc("reseed", kwargs={"seed": seed})
            params = [SamplingParams(logprobs=0, **sampling)] * len(prompts)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        with open(results, "wb") as file:
            file.write(np.array([t for c in completions for t in c.token_ids], dtype=np.int32).tobytes())
            file.write(np.array([x for c in completions for x in sampled_logprobs(c)], dtype=np.float32).tobytes())
        return {"lengths": [len(c.token_ids) for c in completions],
                "finish_reasons": ["length" if c.finish_reason == "length" else "stop" for c in completions]}  # fmt: skip


def serve() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything vLLM (or a child it starts) prints goes to stderr
    engine = Engine()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(engine, op)(**request)
        except Exception as exc:  # noqa: BLE001 - reported to the sampler, which raises it there
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve()
