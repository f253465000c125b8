from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:  # scripts/test.sh sets it: one thread per pytest worker
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def policy():
    from minpro_cli.modeling import load_policy

    return load_policy("embedded")
