"""`minpro import verl-rollouts DIR OUT --model M`: verl's rollout dumps as minpro rollout files.

verl writes `trainer.rollout_data_dir/<step>.jsonl`, one line per response: `input`, `output`,
`gts`, `score`, `step`, and any per-response extra column. Its own dump is text only; run
under `python -m minpro_verl.dump verl.trainer.main_ppo …` (with
`rollout.calculate_log_probs=true`) it also holds `prompt_ids`, `response_ids` and
`rollout_log_probs`, which minpro needs: the tokens and log μ the sampler drew them with. Each
step becomes `OUT/step_00007.parquet`, so `inspect-ratios`, `probe` and the reports read a verl
run as they read a minpro one. A response is grouped with the others of its prompt (same input
text, same step); its `policy_version` is verl's global step (verl's unit: a step holds
`ppo_mini_batch_size`-many optimizer steps), so `inspect-ratios --by policy_version` splits a
verl run by step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from minpro_cli.errors import InputFileError
from minpro_cli.fileio import read_jsonl
from minpro_cli.modeling import Policy, tokenizer_fingerprint
from minpro_cli.rollouts import RolloutRow, write_rollouts
from minpro_cli.rundir import check_replaceable

NEEDED = ("prompt_ids", "response_ids", "rollout_log_probs")


def import_verl_rollouts(directory: Path, out: Path, policy: Policy, sampling: dict[str, Any]) -> list[Path]:
    """Every `<step>.jsonl` of `directory` as `out/step_<step>.parquet`; `sampling`: the
    temperature, top_p and top_k verl sampled with (its dump does not say)."""
    dumps = sorted((p for p in Path(directory).glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not dumps:
        raise InputFileError(f"{directory}: no verl rollout dumps (<step>.jsonl); point at trainer.rollout_data_dir")
    for dump in dumps:  # before anything is written
        check_replaceable(out / f"step_{int(dump.stem):05d}.parquet", "import verl-rollouts")
    written = []
    for dump in dumps:
        rows = [to_row(dump, i, record, policy, sampling) for i, record in enumerate(read_jsonl(dump))]
        indices: dict[str, int] = {}
        for row in rows:  # the k-th response to a prompt in this step
            row.sample_index = indices[row.prompt_id] = indices.get(row.prompt_id, -1) + 1
        path = out / f"step_{int(dump.stem):05d}.parquet"
        out.mkdir(parents=True, exist_ok=True)
        write_rollouts(path, rows, {"imported_from": "verl", "dump": str(dump), **sampling})
        written.append(path)
    return written


def to_row(dump: Path, index: int, record: dict[str, Any], policy: Policy, sampling: dict[str, Any]) -> RolloutRow:
    missing = [key for key in NEEDED if key not in record]
    if missing:
        raise InputFileError(
            f"{dump} row {index}: no {', '.join(missing)}: verl's own dump is text only; rerun verl as "
            "`python -m minpro_verl.dump verl.trainer.main_ppo …` with rollout.calculate_log_probs=true (docs/verl.md)"
        )
    response_ids, logprobs = list(record["response_ids"]), [float(x) for x in record["rollout_log_probs"]]
    if len(response_ids) != len(logprobs) or not response_ids:
        raise InputFileError(f"{dump} row {index}: {len(response_ids)} response tokens but {len(logprobs)} log-probs; "
                             "the dump is damaged: dump that step again")  # fmt: skip
    step = int(record.get("step", dump.stem))
    prompt_id = "verl-" + hashlib.sha1(record["input"].encode()).hexdigest()[:12]
    return RolloutRow(
        prompt_id=prompt_id, sample_index=0, prompt=record["input"], response=record["output"],
        prompt_token_ids=list(record["prompt_ids"]), response_token_ids=response_ids, behavior_logprobs=logprobs,
        reference_answer=str(record.get("gts") or ""), reward=float(record["score"]), verifier="verl",
        verifier_details=json.dumps({k: v for k, v in record.items() if k not in (*NEEDED, "input", "output")}),
        finish_reason="stop" if response_ids[-1] == policy.eos_token_id else "length", policy_version=step,
        model_fingerprint=f"verl step {step}", tokenizer_fingerprint=tokenizer_fingerprint(policy.tokenizer),
        sampler="verl", temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"], seed=-1,
    )  # fmt: skip
