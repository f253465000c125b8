"""torchrun worker: the embedded model under FSDP2 on N gloo ranks, streamed into a segment
by `named_weights` (every rank joins each parameter's gather; rank 0 writes), and the segment
copied to OUT for the test to read once the ranks are gone. Then a staleness snapshot
(`snapshot_state`): each rank holds only its bf16 shards, and gathered they equal the whole
weights as they were (OUT/snapshot-ok).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/weightsync_worker.py OUT
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from minpro_cli.distributed import (
    HeldShard,
    close_world,
    full_state_dict,
    init_world,
    parallelize,
    snapshot_state,
    whole_state,
)
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
    # a staleness snapshot: this rank's shards only, in bf16, and whole again when gathered
    snapshot = snapshot_state(model, world, torch.bfloat16)
    held, total = sum(v.local.numel() for v in snapshot.values()), sum(v.shape.numel() for v in snapshot.values())
    assert all(isinstance(v, HeldShard) and v.local.dtype == torch.bfloat16 for v in snapshot.values())
    assert held < 0.6 * total, (held, total)
    expected = full_state_dict(model, world, torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # training goes on: the snapshot is a copy
    gathered = whole_state(snapshot)
    assert list(gathered) == list(expected) and all(torch.equal(gathered[k], expected[k]) for k in expected)
    if world.is_main:
        (out / "snapshot-ok").write_text(f"{held} of {total}")
    close_world(world)
