"""minpro's verifiers as verl's custom reward function.

    reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score

`minpro export verl-data` writes each row's verifier and its options into `extra_info`; verl
calls `compute_score(data_source, solution_str, ground_truth, extra_info)` per response and
gets the verifier's reward in [0, 1]. One verifier instance per (name, options), kept.
"""

from __future__ import annotations

import functools
import json
from typing import Any


@functools.cache
def verifier(name: str, options: str) -> Any:
    from minpro_cli.registry import load_plugin

    return load_plugin("verifiers", name, json.loads(options))


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict[str, Any] | None = None,
                  **_: Any) -> float:  # fmt: skip
    if not extra_info or "verifier" not in extra_info:
        raise ValueError(f"{data_source}: the row has no minpro verifier in extra_info; write the data with "
                         "`minpro export verl-data`")  # fmt: skip
    check = verifier(extra_info["verifier"], extra_info.get("verifier_options", "{}"))
    return float(check(solution_str, ground_truth).reward)
