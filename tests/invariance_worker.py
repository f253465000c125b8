"""torchrun worker: the invariance grid on N gloo ranks; rank 0 saves every case's weights.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/invariance_worker.py OUT DTYPE
"""

from __future__ import annotations

import sys

import torch
from invariance_cases import run_grid
from safetensors.torch import save_file

from minpro_cli.distributed import close_world, init_world

if __name__ == "__main__":
    out, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    torch.set_num_threads(1)
    world = init_world("gloo", 300)
    weights = run_grid(dtype, world)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, out)
    close_world(world)
