"""What the `vllm` sampler sets up before its engine starts: the worker's environment under
torchrun (its own GPU, none of the trainer's rank variables, the worker extension on the
engine processes' path), the dtype, and the memory budget checked against what is free. No
vLLM needed."""

from __future__ import annotations

import pytest
import torch
from minpro_vllm.sampler import ENGINE_PATH, EXTENSION, VLLMSampler, memory_info, worker_environment

from minpro_cli.errors import MinproError

GIB = 2**30

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "ROLE_RANK": "3"}


@pytest.mark.parametrize(
    ("visible", "device"),
    [(None, "1"), ("4,5", "5"), ("GPU-aa,GPU-bb,GPU-cc", "GPU-bb"), ("7", "7"), ("", "")],  # "": no GPU, kept
)
def test_each_rank_gets_its_own_device_and_none_of_torchruns_variables(visible, device):
    parent = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2", **TORCHRUN}
    if visible is not None:
        parent["CUDA_VISIBLE_DEVICES"] = visible
    env = worker_environment(parent)
    assert not set(TORCHRUN) & set(env)
    assert env["PATH"] == "/usr/bin" and env["OMP_NUM_THREADS"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == device
    assert env["PYTHONPATH"].split(":")[0] == str(ENGINE_PATH)
    assert (ENGINE_PATH / f"{EXTENSION.split('.')[0]}.py").is_file()


def test_outside_torchrun_the_devices_are_left_alone():
    env = worker_environment({"CUDA_VISIBLE_DEVICES": "2,3", "PYTHONPATH": "/opt/x"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["PYTHONPATH"].split(":") == [str(ENGINE_PATH), "/opt/x"]


def test_a_budget_larger_than_what_is_free_is_refused_with_the_numbers():
    sampler = VLLMSampler(python="unused", memory_fraction=0.9)
    sampler.check_memory(75 * GIB, 80 * GIB, "GPU")  # 72 GiB of 75 free: fits
    with pytest.raises(MinproError, match=r"memory_fraction 0.9 asks for 72.0 GiB of the GPU's 80.0 GiB, but 41.5 GiB"):
        sampler.check_memory(int(41.5 * GIB), 80 * GIB, "GPU")  # the trainer holds the rest
    in_bytes = VLLMSampler(python="unused", memory_fraction=0.9, kv_cache_bytes=20 * GIB)
    in_bytes.check_memory(int(41.5 * GIB), 80 * GIB, "GPU")
    assert in_bytes.engine()["kv_cache_memory_bytes"] == 20 * GIB
    with pytest.raises(MinproError, match=r"kv_cache_bytes asks for 20.0 GiB of the RAM's 80.0 GiB, but 8.0 GiB"):
        in_bytes.check_memory(8 * GIB, 80 * GIB, "RAM")
    free, total, where = memory_info()  # this machine: read, not made up
    assert 0 < free <= total and where in ("GPU", "RAM")


def test_auto_dtype_is_bf16_on_a_gpu_and_float32_on_cpu(monkeypatch):
    sampler = VLLMSampler(python="unused")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sampler.engine()["dtype"] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sampler.engine()["dtype"] == "bfloat16"
    assert VLLMSampler(python="unused", dtype="float32").engine()["dtype"] == "float32"  # asked for: kept
    assert "enable_chunked_prefill" not in sampler.engine()  # decided in the worker, on CPU only
