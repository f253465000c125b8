"""`minpro_verl.dump`: verl 0.9.1's own `RayPPOTrainer._log_rollout_data`, extended, writes each
response's token ids (padding removed) and log μ; `minpro import verl-rollouts` (the checkout's
.venv) turns that dump into rollout files holding exactly those tokens and log-probs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
MINPRO = ROOT / ".venv" / "bin" / "minpro"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed (opt-in)")


def test_verls_dump_extended_and_imported(tmp_path):
    import torch
    from minpro_verl.dump import install
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "src" / "minpro_cli" / "assets" / "default_model")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [tokenizer.encode(q, add_special_tokens=False) for q in ("Compute 5+7.\n", "Compute 3*4.\n")]
    responses = [[5, 6, eos], [7, 8, 9, 10]]  # the second hit the length limit
    width_p, width_r = max(map(len, prompts)) + 1, 5
    prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts])  # verl pads prompts on the left
    response_ids = torch.tensor([r + [pad] * (width_r - len(r)) for r in responses])
    mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (width_r - len(r))
                         for p, r in zip(prompts, responses)])  # fmt: skip
    logprobs = -torch.rand(2, width_r, generator=torch.Generator().manual_seed(0))
    batch = DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask,
                 "rollout_log_probs": logprobs, "token_level_scores": torch.tensor([[0.0] * 4 + [1.0], [0.0] * 5])},
        non_tensors={"reward_model": np.array([{"ground_truth": "12"}, {"ground_truth": "12"}], dtype=object)},
    )  # fmt: skip
    trainer = object.__new__(RayPPOTrainer)  # only what _log_rollout_data touches
    trainer.tokenizer, trainer.global_steps = tokenizer, 3
    trainer._init_dump_executor()
    install()
    trainer._log_rollout_data(batch, {}, {}, str(tmp_path / "dumps"))
    trainer._shutdown_dump_executor()
    lines = [json.loads(line) for line in (tmp_path / "dumps" / "3.jsonl").read_text().splitlines()]
    assert [line["prompt_ids"] for line in lines] == prompts
    assert [line["response_ids"] for line in lines] == responses
    assert lines[1]["rollout_log_probs"] == pytest.approx(logprobs[1, :4].tolist())
    assert [line["score"] for line in lines] == [1.0, 0.0] and lines[0]["gts"] == "12"

    if not MINPRO.exists():
        pytest.skip("the checkout's .venv (bash scripts/setup.sh) is missing: the import half is not run")
    subprocess.run([str(MINPRO), "import", "verl-rollouts", str(tmp_path / "dumps"), str(tmp_path / "out"),
                    "--model", "embedded"], check=True, capture_output=True)  # fmt: skip
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "step_00003.parquet").to_pylist()
    assert [r["response_token_ids"] for r in rows] == responses and [r["policy_version"] for r in rows] == [3, 3]
    assert rows[0]["behavior_logprobs"] == pytest.approx(logprobs[0, :3].tolist(), abs=1e-6)
    assert [r["finish_reason"] for r in rows] == ["stop", "length"]
