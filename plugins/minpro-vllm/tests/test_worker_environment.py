"""The vLLM worker's environment under torchrun: its own GPU, none of the trainer's rank
variables, the worker extension on the engine processes' path. No vLLM needed."""

from __future__ import annotations

import pytest
from minpro_vllm.sampler import ENGINE_PATH, EXTENSION, worker_environment

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
