"""A reward exactly as verl's `custom_reward_function` takes it: compute_score(data_source,
solution_str, ground_truth, extra_info) -> float or {"score": ...}, routed by data_source as
verl's default_compute_score does. recipes/from-verl.yaml uses it."""

import re

ANSWER_IS = re.compile(r"answer is\s*\$?(-?\d+)", re.IGNORECASE)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "small-sums":
        found = ANSWER_IS.findall(solution_str)
        return {"score": 1.0 if found and found[-1] == ground_truth else 0.0, "stated": bool(found)}
    raise NotImplementedError(f"no scorer for data_source {data_source!r}")
