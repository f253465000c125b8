"""`minpro import verl-rollouts`: verl's rollout dumps (as `minpro_verl.dump` extends them) become
minpro rollout files that inspect-ratios reads; verl's text-only dump is refused in one line.
The dump itself is made by verl's own trainer code in plugins/minpro-verl/tests/test_dump.py."""

from __future__ import annotations

import json

import pytest
import torch

from minpro_cli.errors import InputFileError
from minpro_cli.inspect_ratios import inspect_ratios
from minpro_cli.logprobs import pack, response_logprobs
from minpro_cli.rollouts import read_rollout_rows
from minpro_cli.verl_rollouts import import_verl_rollouts

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def dump_line(policy, prompt: str, response: str, score: float, step: int, **extra) -> dict:
    """One line as minpro_verl.dump writes it, log μ the embedded model's own (on-policy)."""
    prompt_ids = policy.tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = policy.tokenizer.encode(response, add_special_tokens=False) + [policy.eos_token_id]
    with torch.no_grad():
        logprobs, _ = response_logprobs(policy.model, pack([prompt_ids], [response_ids], policy.pad_token_id))
    return {"input": prompt, "output": response, "gts": "12", "score": score, "step": step, "prompt_ids": prompt_ids,
            "response_ids": response_ids, "rollout_log_probs": logprobs[0, : len(response_ids)].tolist(), **extra}  # fmt: skip


def test_dumps_become_rollout_files_inspect_ratios_reads(tmp_path, policy):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    lines = {1: [dump_line(policy, "Compute 5+7.\n", "12", 1.0, 1, uid="a"), dump_line(policy, "Compute 3*4.\n", "11", 0.0, 1),
                 dump_line(policy, "Compute 5+7.\n", "13", 0.0, 1)],
             2: [dump_line(policy, "Compute 5+7.\n", "12", 1.0, 2)]}  # fmt: skip
    for step, records in lines.items():
        (dumps / f"{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = import_verl_rollouts(dumps, tmp_path / "out", policy, SAMPLING)
    assert [p.name for p in written] == ["step_00001.parquet", "step_00002.parquet"]
    rows = read_rollout_rows(written[0])
    assert [(r.prompt_id == rows[0].prompt_id, r.sample_index) for r in rows] == [(True, 0), (False, 0), (True, 1)]
    assert [r.reward for r in rows] == [1.0, 0.0, 0.0] and {r.policy_version for r in rows} == {1}
    assert rows[0].behavior_logprobs == pytest.approx(lines[1][0]["rollout_log_probs"], abs=1e-6)
    assert rows[0].finish_reason == "stop" and json.loads(rows[0].verifier_details)["uid"] == "a"
    assert import_verl_rollouts(dumps, tmp_path / "out", policy, SAMPLING) == written  # a rerun replaces its own
    report = inspect_ratios([str(p) for p in written], policy)  # μ was the policy itself: every ratio is 1
    assert report["n_sequences"] == 4 and report["token_ratio"]["count"] == 12
    assert report["token_ratio"]["min"] == pytest.approx(1.0, abs=1e-4) == report["token_ratio"]["max"]


def test_a_text_only_dump_is_refused_naming_the_row(tmp_path, policy):
    (tmp_path / "3.jsonl").write_text(json.dumps({"input": "q", "output": "a", "gts": "1", "score": 1.0, "step": 3}) + "\n")
    with pytest.raises(InputFileError, match=r"3.jsonl row 0: no prompt_ids, response_ids, rollout_log_probs: .*minpro_verl.dump"):
        import_verl_rollouts(tmp_path, tmp_path / "out", policy, SAMPLING)
    assert not (tmp_path / "out").exists()
