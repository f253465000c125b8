"""`vllm` sampler: offline `vllm.LLM` in a separate environment, weights synced every round.

vLLM pins its own torch and transformers, so it never shares minpro's environment: the
sampler starts `worker.py` with the vllm environment's interpreter (made by
`scripts/setup_vllm.sh`) and talks JSON lines over a pipe. Whenever the policy's weights were
written since the last round (torch's per-tensor write counters, no hashing), it streams them
into a shared-memory segment (`minpro_cli.weightsync`) and the engine reloads them in place from
there, in memory: each round samples with the weights being trained. `transport: disk` exports
a safetensors checkpoint instead (debugging). The engine starts from the config alone
(`load_format: dummy`): the weights never touch the disk.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, PrivateAttr
from safetensors.torch import save_file

from minpro_cli import weightsync
from minpro_cli.errors import MinproError
from minpro_cli.modeling import DTYPES, Policy, weights_written
from minpro_cli.samplers import Generation, SamplingParams
from minpro_cli.weightsync import PREFIX, WeightSegment, named_weights, planned_bytes, shm_directory

WORKER = Path(__file__).with_name("worker.py")
ENGINE_PATH = Path(__file__).with_name("engine_path")  # importable by vLLM's engine processes
EXTENSION = "minpro_segment_loader.SegmentLoader"
PYTHON_ENV = "MINPRO_VLLM_PYTHON"
# torchrun's variables: an engine that inherits them takes the trainer's rank, world and
# rendezvous for its own (vLLM reads LOCAL_RANK, RANK and MASTER_* too)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def default_python() -> str:
    return os.environ.get(PYTHON_ENV, ".venv-vllm/bin/python")


def memory_info() -> tuple[int, int, str] | None:
    """Free and total bytes where the engine will run: the rank's GPU, or the machine's RAM
    (None where neither can be read)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))
        return free, total, "GPU"
    if not Path("/proc/meminfo").is_file():
        return None
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    kib = {key: int(meminfo[key].split()[0]) * 1024 for key in ("MemAvailable", "MemTotal")}
    return kib["MemAvailable"], kib["MemTotal"], "RAM"


def worker_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: none of torchrun's variables, the rank's own GPU (torchrun
    sets LOCAL_RANK, not CUDA_VISIBLE_DEVICES: every rank's engine would land on GPU 0), and
    the worker extension's directory on the engine processes' path."""
    env = {k: v for k, v in parent.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    if "LOCAL_RANK" in parent:
        local = int(parent["LOCAL_RANK"])
        visible = [d for d in parent.get("CUDA_VISIBLE_DEVICES", str(local)).split(",") if d.strip()]
        if visible:  # an empty list means no GPU at all: leave it so
            env["CUDA_VISIBLE_DEVICES"] = visible[local % len(visible)]  # fewer devices than ranks: shared
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_PATH), parent.get("PYTHONPATH")]))
    return env


class Worker:
    """One vLLM engine in a child process, and the scratch directory its weights come from."""

    def __init__(self, python: str, timeout_s: float) -> None:
        if not Path(python).is_file():
            raise MinproError(
                f"sampler 'vllm': no vllm environment at {python}; make it with scripts/setup_vllm.sh, "
                f"or point sampler.options.python (or ${PYTHON_ENV}) at its interpreter"
            )
        self.timeout_s = timeout_s
        self.weights = Path(tempfile.mkdtemp(prefix="minpro-vllm-"))
        self.process = subprocess.Popen(  # its own process group: vLLM starts engine processes of its own
            [python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True, env=worker_environment(os.environ),
        )
        self.segment: WeightSegment | None = None
        # the engine's results: named like a segment, so a killed run's file is cleaned up too
        self.results = shm_directory() / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}.results"
        self.version = 0  # of the weights the engine holds
        self.synced: tuple[weakref.ref[torch.nn.Module], tuple[int, ...]] | None = None
        weakref.finalize(self, Worker.close, self.process, self.weights, self.results)

    @staticmethod
    def close(process: subprocess.Popen, weights: Path, results: Path) -> None:
        """End of input lets vLLM shut its engine down; whatever is left of the group is killed."""
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(weights, ignore_errors=True)
        results.unlink(missing_ok=True)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: reported below
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            state = f"exited with code {self.process.poll()}" if self.process.poll() is not None else "timed out"
            raise MinproError(
                f"sampler 'vllm': the vLLM worker {state} during '{request['op']}' (its log is above); "
                "check sampler.options (memory_fraction, max_model_len) and the vllm environment"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise MinproError(f"sampler 'vllm': vLLM failed during '{request['op']}': {reply['error']}")
        return reply

    def generate(self, prompts: list[list[int]], seed: int, seed_mode: str, sampling: dict[str, Any]) -> list[Generation]:
        """One engine call; token ids and log-probs come back through a binary file."""
        reply = self.call({"op": "generate", "prompts": prompts, "seed": seed, "seed_mode": seed_mode,
                           "sampling": sampling, "results": str(self.results)})  # fmt: skip
        total = sum(reply["lengths"])
        tokens = np.fromfile(self.results, dtype=np.int32, count=total).tolist()
        logprobs = np.fromfile(self.results, dtype=np.float32, count=total, offset=4 * total).tolist()
        ends = list(itertools.accumulate(reply["lengths"]))
        return [Generation(tokens[end - n : end], logprobs[end - n : end], finish)
                for n, end, finish in zip(reply["lengths"], ends, reply["finish_reasons"])]  # fmt: skip

    def sync(self, policy: Policy, engine: dict[str, Any], transport: str, dtype: torch.dtype) -> None:
        """Load the policy's weights into vLLM unless none was written since the last sync."""
        written = weights_written(policy.model)
        if self.synced is not None and self.synced[0]() is policy.model and self.synced[1] == written:
            return
        if self.synced is None and transport == "shm":
            export_config(policy, self.weights)
            self.call({"op": "load", "model": str(self.weights), "engine": engine | {"load_format": "dummy"}})
        elif self.synced is None:
            export_untied(policy, self.weights)
            self.call({"op": "load", "model": str(self.weights), "engine": engine})
        if transport == "shm":
            self.segment = self.segment or WeightSegment()
            self.version += 1
            weights = named_weights(policy.model, dtype)
            self.segment.write(weights, self.version, planned_bytes(policy.model, dtype))
            reply = self.call({"op": "update", "table": str(self.segment.table), "module": weightsync.__file__})
            if reply["version"] != self.version:
                raise MinproError(f"sampler 'vllm': the engine loaded weights version {reply['version']}, "
                                  f"not {self.version}")  # fmt: skip
        elif self.synced is not None:
            export_untied(policy, self.weights)
            self.call({"op": "reload", "model": str(self.weights)})
        self.synced = (weakref.ref(policy.model), written)


def export_config(policy: Policy, directory: Path) -> None:
    """What an engine needs to build the model, without its weights: config (head untied, see
    `export_untied`) and tokenizer."""
    config = copy.deepcopy(policy.model.config)
    config.tie_word_embeddings = False
    config.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)


def export_untied(policy: Policy, directory: Path) -> None:
    """HF layout with every weight in the file and ties broken. vLLM's in-place reload puts a
    tied output head back from its old copy (vLLM 0.32 logs "ParallelLMHead: Failed to load
    weights"), so the head of each round must be a weight of its own; the values are equal."""
    export_config(policy, directory)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in policy.model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


class VLLMSampler(SamplingParams):
    """Samples with offline vLLM; records log μ of the distribution actually sampled.

    vLLM runs with `logprobs_mode=processed_logprobs`, so the recorded log-prob is the one
    after temperature and any top-k / top-p truncation: the μ that sampled (the ratio's
    denominator must be the distribution actually sampled, docs/rollout-format.md). No truncation
    unless set here. Each prompt gets its own seed (`seed + i`) unless `seed_mode: round`.
    """

    model_config = ConfigDict(extra="forbid")

    python: str = Field(default_factory=default_python, description="the vllm environment's interpreter")
    memory_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="vLLM gpu_memory_utilization: the share of the device's (on CPU: RAM's) "
        "total memory the engine takes, weights and KV cache; refused if more than is free when it starts",
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="the KV cache in bytes (vLLM kv_cache_memory_bytes), instead of memory_fraction"
    )
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + response (default: the model's)")
    dtype: str = Field(
        "auto", description="vLLM dtype; auto: bfloat16 on a GPU (FlashAttention and FlashInfer refuse float32), "
        "float32 on CPU (minpro's training dtype)",
    )
    engine_options: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM keyword arguments")
    seed_mode: Literal["prompt", "round"] = Field(
        "prompt",
        description="prompt: each prompt its own seed (seed + i), reproducible whatever the batching, on vLLM's "
        "per-request sampling path; round: the call's seed for the engine's generator and vLLM's batched path, "
        "not reproducible bit for bit (vLLM schedules requests as they reach its engine process)",
    )
    transport: Literal["shm", "disk"] = Field(
        "shm", description="how new weights reach the engine: shared memory, or a checkpoint on disk (debugging)"
    )
    timeout_s: float = Field(900.0, gt=0.0, description="longest wait for one reply (startup included)")

    prompts_per_call: ClassVar[int | None] = None  # a whole round per call: no idling on a chunk's tail
    _worker: Worker | None = PrivateAttr(None)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The engine's precision: minpro keeps copies made only for sampling in it."""
        return getattr(torch, self.engine_dtype())

    def engine_dtype(self) -> str:
        return ("bfloat16" if torch.cuda.is_available() else "float32") if self.dtype == "auto" else self.dtype

    def engine(self) -> dict[str, Any]:
        options = {
            "dtype": self.engine_dtype(),
            "gpu_memory_utilization": self.memory_fraction,
            "seed": 0,
            "generation_config": "vllm",  # not the model's defaults (a repetition penalty would change μ)
            "worker_extension_cls": EXTENSION,
        }
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        if self.kv_cache_bytes is not None:
            options["kv_cache_memory_bytes"] = self.kv_cache_bytes
        return options | self.engine_options

    def check_memory(self, free: int, total: int, where: str) -> None:
        """Refuse, before the engine starts, a budget that cannot fit what is free now (vLLM takes
        memory_fraction of the *total*: the trainer's share is not free)."""
        wanted, what = ((self.kv_cache_bytes, "kv_cache_bytes") if self.kv_cache_bytes is not None
                        else (int(self.memory_fraction * total), f"memory_fraction {self.memory_fraction}"))  # fmt: skip
        if wanted > free:
            raise MinproError(
                f"sampler 'vllm': {what} asks for {wanted / 2**30:.1f} GiB of the {where}'s {total / 2**30:.1f} GiB, "
                f"but {free / 2**30:.1f} GiB are free: lower sampler.options.memory_fraction, or give the KV cache "
                "in bytes (sampler.options.kv_cache_bytes)"
            )

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]:
        if self._worker is None:
            if (memory := memory_info()) is not None:
                self.check_memory(*memory)
            self._worker = Worker(self.python, self.timeout_s)
        dtype = DTYPES.get(self.engine_dtype(), next(policy.model.parameters()).dtype)
        self._worker.sync(policy, self.engine(), self.transport, dtype)
        sampling = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,  # 0 disables top-k in vLLM too
            "max_tokens": self.max_new_tokens,
        }
        return self._worker.generate(prompts, seed, self.seed_mode, sampling)
