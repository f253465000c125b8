"""Learning-rate schedules: a pure function of the optimizer step, so a resumed run continues exactly."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_multiplier(step: int, total_steps: int, schedule: Schedule, warmup_steps: int, min_lr_ratio: float) -> float:
    """Factor on `optim.lr` for optimizer step `step` (0-based) of `total_steps`.

        warm-up (step < W):  (step + 1) / W
        then, with p = (step − W) / max(1, total − W) clipped to [0, 1] and m = min_lr_ratio:
          constant  1
          linear    1 − (1 − m)·p
          cosine    m + (1 − m)·(1 + cos(π·p)) / 2
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
