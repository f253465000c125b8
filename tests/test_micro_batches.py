"""Micro-batches: the update is the same whatever the token budget and the world size.

Tolerances. float64: weights after 3 SGD steps agree to ≤ 1e-6 of the update itself
(‖w_a − w_b‖ / ‖w_b − w_0‖; measured ≤ 4e-14). float32: padding and summation order differ
between micro-batch cuts, and a ratio within rounding of a clip bound may land on the other
side, so ≤ 5e-4 of the update (measured ≤ 2.9e-5 at its learning rate, `invariance_cases.LR`). SGD without clipping, because its step is linear in the gradient:
AdamW and clipping divide a constant factor out, and would hide a normaliser off by one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from invariance_cases import BUDGETS, CORRECTIONS, ROWS, budget_tokens, cases, run_grid, synthetic_minibatch, train_case
from safetensors.torch import load_file

from minpro_cli.distributed import World
from minpro_cli.modeling import load_policy
from minpro_cli.step import RolloutBatch, micro_batch_plan, micro_batches

HERE = Path(__file__).resolve().parent
TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-4}


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    gap = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    moved = sum(float((b[k].double() - start[k].double()).norm() ** 2) for k in b) ** 0.5
    assert moved > 1e-3, "the steps left the weights where they were: nothing was tested"
    return gap / moved


def case_weights(grid: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    return {k[len(case) + 1 :]: v for k, v in grid.items() if k.startswith(case + "/")}


def test_micro_batches_cover_every_row_once_within_the_budget():
    prompts, responses = [5, 3, 9, 2, 7, 4, 6], [10, 1, 3, 8, 0, 12, 5]
    for budget in (1, 20, 40, 60, 1000):
        plan = micro_batches(prompts, responses, budget)
        assert sorted(i for micro in plan for i in micro) == list(range(7))
        for micro in plan:
            tokens = len(micro) * (max(prompts[i] for i in micro) + max(max(responses[i] for i in micro), 1))
            assert len(micro) == 1 or tokens <= budget, (budget, micro)
    assert len(micro_batches(prompts, responses, 1)) == 7  # one row each
    assert micro_batches(prompts, responses, 1000) == [[5, 0, 2, 6, 3, 4, 1]]  # longest (prompt + response) first
    assert micro_batches(prompts, responses, None) == [list(range(7))]  # no budget: as given


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def one_process(request) -> tuple[torch.dtype, dict[str, torch.Tensor]]:
    return request.param, run_grid(request.param)


def start_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in load_policy("embedded").model.state_dict().items()}


def test_budgets_really_cut_the_minibatch():
    policy = load_policy("embedded")
    batch = synthetic_minibatch(policy, torch.float64)
    counts = [len(micro_batches(list(map(len, batch.prompts)), list(map(len, batch.responses)), budget_tokens(batch, b)))
              for b in BUDGETS]
    assert counts[0] == 1 and 2 <= counts[1] < ROWS and counts[2] == ROWS


def test_weights_do_not_depend_on_the_micro_batch_budget(one_process):
    dtype, grid = one_process
    start = start_weights(dtype)
    worst = 0.0
    for name, loss_agg, budget in cases(dtype):
        if budget == "whole":
            continue
        whole = case_weights(grid, f"{name}/{loss_agg}/whole")
        gap = relative_gap(case_weights(grid, f"{name}/{loss_agg}/{budget}"), whole, start)
        assert gap <= TOLERANCE[dtype], f"{name} {loss_agg} {budget}: {gap:.2e}"
        worst = max(worst, gap)
    print(f"{dtype}: worst relative gap {worst:.2e}")


def test_objectives_and_modes_are_told_apart(one_process):
    """The grid is not trivially equal: another objective or mode gives other weights."""
    dtype, grid = one_process
    start = start_weights(dtype)
    base = case_weights(grid, "minpro/token-mean/whole")
    corrected = [f"minpro+{mode}/token-mean/whole" for mode in CORRECTIONS] if dtype == torch.float64 else []
    for other in ("grpo/token-mean/whole", "minpro/seq-mean-token-sum/whole", "minpro/seq-mean-token-sum-norm/whole",
                  *corrected):
        assert relative_gap(case_weights(grid, other), base, start) > 100 * TOLERANCE[dtype], other


def test_two_gloo_ranks_take_the_one_process_step_for_every_budget(tmp_path, one_process):
    dtype, grid = one_process
    out = tmp_path / "two.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "invariance_worker.py"), str(out), str(dtype).removeprefix("torch.")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = load_file(str(out))
    start = start_weights(dtype)
    for name, loss_agg, budget in cases(dtype):
        case = f"{name}/{loss_agg}/{budget}"
        gap = relative_gap(case_weights(two, case), case_weights(grid, f"{name}/{loss_agg}/whole"), start)
        assert gap <= TOLERANCE[dtype], f"2 ranks, {case}: {gap:.2e}"


def test_every_rank_makes_as_many_passes_as_the_busiest():
    """Rank 0 gets the two long rows (one micro-batch each), rank 1 two short ones (one
    micro-batch): both make 2 passes, so DDP/FSDP2 collectives line up."""
    batch = RolloutBatch(prompts=[[1] * 10, [1] * 10, [1], [1]], responses=[[2] * 10, [2] * 10, [2], [2]],
                         behavior_logprobs=[[0.0] * 10, [0.0] * 10, [0.0], [0.0]], advantages=torch.zeros(4), temperature=1.0)
    first, passes0 = micro_batch_plan(batch, World(rank=0, size=2), budget=30)
    second, passes1 = micro_batch_plan(batch, World(rank=1, size=2), budget=30)
    assert first == [[0], [1]] and second == [[2, 3]]
    assert passes0 == passes1 == 2
    assert micro_batch_plan(batch, World(), budget=None) == ([[0, 1, 2, 3]], 1)


def test_a_plugin_written_before_micro_batches_gets_the_same_update(monkeypatch):
    """The example plugin's SPO (written against `self.aggregate` before micro-batches existed)
    takes the same step with one row per micro-batch as with the whole minibatch."""
    monkeypatch.syspath_prepend(str(HERE.parent / "plugins" / "minpro-example-plugins" / "src"))
    from minpro_examples.spo import SPO

    policy = load_policy("embedded")
    policy.model.to(torch.float64)
    batch = synthetic_minibatch(policy, torch.float64)
    start = {k: v.clone() for k, v in policy.model.state_dict().items()}
    for loss_agg in ("seq-mean-token-mean", "token-mean"):
        objective = SPO(loss_agg=loss_agg)
        whole = train_case(policy, batch, objective, budget_tokens(batch, "whole"))
        one_row = train_case(policy, batch, objective, budget_tokens(batch, "one-row"))
        assert relative_gap(one_row, whole, start) <= TOLERANCE[torch.float64], loss_agg
