"""`minpro train --nproc N`: the stage rerun under torchrun, one process per rank (the ranks
themselves use `distributed`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from minpro_cli.checkpoints import latest_checkpoint
from minpro_cli.errors import MinproError
from minpro_cli.rundir import owned


def torchrun_command(nproc: int, stage_args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "minpro_cli", *stage_args,
    ]  # fmt: skip


def run_under_torchrun(nproc: int, stage_args: list[str], run_dir: Path) -> None:
    """`minpro train --nproc N`: run the stage under torchrun; a failed rank becomes one clear error."""
    with owned(run_dir):  # a foreign or busy run_dir is refused here, before any rank starts
        pass
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(torchrun_command(nproc, stage_args), env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    if code != 0:
        last = latest_checkpoint(run_dir)
        raise MinproError(
            f"distributed training stopped: torchrun exited with code {code} (its report above names the rank "
            f"that failed and why); last complete checkpoint: {last or 'none'}; rerun the same command to resume "
            "from it"
        )
