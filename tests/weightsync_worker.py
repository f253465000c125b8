"""torchrun worker: the embedded model under FSDP2 on N gloo ranks, streamed into a segment
by `named_weights` (every rank joins each parameter's gather; rank 0 writes), and the segment
copied to OUT for the test to read once the ranks are gone.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/weightsync_worker.py OUT
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from minpro_cli.distributed import close_world, init_world, parallelize
from minpro_cli.modeling import load_policy
from minpro_cli.weightsync import WeightSegment, named_weights, planned_bytes

if __name__ == "__main__":
    out = Path(sys.argv[1])
    world = init_world("gloo", 300)
    model = parallelize(load_policy("embedded").model, "fsdp", world)
    assert all(hasattr(t, "full_tensor") for t in model.state_dict().values())  # every rank holds shards only
    weights = named_weights(model, torch.bfloat16)
    if world.is_main:
        segment = WeightSegment(out / "shm")
        segment.write(weights, 7, planned_bytes(model, torch.bfloat16))
        for path in (segment.data, segment.table):
            shutil.copy(path, out / path.name)
    else:
        for _ in weights:  # the gathers rank 0 waits for
            pass
    close_world(world)
