"""Every built-in objective against the loop-based reference (loss and gradient), plus the
edge cases worked by hand: first token, fully masked row, ratios at the clip bounds, ±20 clamp."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from objective_reference import reference

from minpro_cli.errors import PluginError
from minpro_cli.fileio import read_yaml
from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.registry import discover, load_objective

CONFIGS = [
    ("minpro", {}),
    ("minpro", {"clip_mode": "ppo"}),
    ("minpro", {"clip_mode": "ppo", "eps_low": 0.2}),
    ("minpro", {"prefix_cap_at_one": True, "eps_low": 0.3}),
    ("grpo", {}),
    ("grpo", {"dual_clip": 2.0}),
    ("dapo", {}),
    ("dr_grpo", {}),
    ("gspo", {}),
    ("gspo", {"eps_low": 0.1, "eps_high": 0.1}),
    ("cispo", {}),
    ("cispo", {"eps_low": 0.5, "eps_high": 4.0}),
    ("prefix", {}),
    ("prefix", {"eps_low": 0.9, "eps_high": 9.0}),
    ("m2po", {}),
    ("m2po", {"m2_threshold": 0.01}),
]
LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def random_batch(seed: int, per_token_adv: bool) -> ObjectiveInputs:
    """Right-padded rows of random lengths, holes of non-policy tokens, one fully masked row."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = 6, 11
    logp = -3 * torch.rand(rows, width, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([11, 7, 1, 0, 9, 4])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    mask &= torch.rand(rows, width, generator=gen) > 0.15
    mask[0, 0] = True  # a row whose first token is trained
    shape = (rows, width) if per_token_adv else (rows,)
    adv = torch.randn(*shape, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.float64)  # TOPR splits on them
    return ObjectiveInputs(logp.requires_grad_(True), old, adv, mask, rewards=rewards)


def check_against_reference(name: str, options: dict, inputs: ObjectiveInputs) -> dict[str, float]:
    out = load_objective(name, **options)(inputs)
    out.loss.backward()
    ref_loss, ref_grad = reference(
        name, options, inputs.logprobs.tolist(), inputs.old_logprobs.tolist(),
        inputs.token_advantages().tolist(), inputs.response_mask.tolist(),
    )
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6, abs=1e-12)
    torch.testing.assert_close(inputs.logprobs.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-6, atol=1e-12)
    return out.metrics


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("name,options", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_loss_and_gradient_match_loop_reference(name, options, loss_agg):
    for seed, per_token in [(0, False), (1, True), (2, False)]:
        metrics = check_against_reference(name, {**options, "loss_agg": loss_agg}, random_batch(seed, per_token))
        assert all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("m2_kept"))


@pytest.mark.parametrize("name", ["dr_grpo", "grpo"])
def test_constant_normaliser_uses_max_response_length(name):
    options = {"loss_agg": "seq-mean-token-sum-norm", "max_response_length": 32}
    check_against_reference(name, options, random_batch(3, False))
    short = load_objective(name, **options)(random_batch(3, False)).loss
    longest = load_objective(name, loss_agg="seq-mean-token-sum-norm")(random_batch(3, False)).loss
    mask = random_batch(3, False).response_mask
    span = int(max(t + 1 for t in range(mask.shape[1]) if mask[:, t].any()))  # the last trained column
    assert short.item() == pytest.approx(longest.item() * span / 32, rel=1e-12)


def test_reference_sees_clipping_on_these_inputs():
    """The random batches really exercise the clipped branches (else the comparison is weak)."""
    batch = random_batch(0, False)
    grpo = load_objective("grpo")(batch).metrics
    assert 0 < grpo["clip_frac_high"] < 1 and 0 < grpo["clip_frac_low"] < 1
    assert load_objective("grpo", dual_clip=2.0)(random_batch(0, False)).metrics["clip_frac_high"] > grpo["clip_frac_high"]
    minpro = load_objective("minpro")(random_batch(0, False)).metrics
    assert 0 < minpro["clip_frac_high"] < 1 and minpro["weight_below_half_frac"] > 0
    m2po = load_objective("m2po")(random_batch(0, False)).metrics
    assert 0 < m2po["m2_masked_frac"] < 1 and m2po["m2_kept"] <= 0.04 < m2po["m2"]


@pytest.mark.parametrize("name", sorted(discover("objectives")))
def test_every_builtin_has_a_formula_in_its_docstring(name):
    cls = discover("objectives")[name].load()
    assert cls.__doc__ and re.search(r"^\s+(L|ℓ_t)\s+=", cls.__doc__, re.MULTILINE), "no formula line"


# --- edge cases by hand -------------------------------------------------------------------


def batch_from_ratios(ratios, mask, adv=1.0, logp=None):
    ratios = torch.tensor([ratios], dtype=torch.float64)
    logp = torch.full_like(ratios, -1.0) if logp is None else torch.tensor([logp], dtype=torch.float64)
    return ObjectiveInputs(
        logp.requires_grad_(True), logp.detach() - ratios.log(), torch.tensor([adv], dtype=torch.float64),
        torch.tensor([mask]), rewards=torch.tensor([float(adv > 0)], dtype=torch.float64),
    )


@pytest.mark.parametrize("name", ["minpro", "prefix"])
def test_first_token_weight_is_its_own_ratio(name):
    # ρ_1 = 1.1: ρ̲_1·ρ_1 = ρ_{1:1} = 1.1, inside the clip range; grad = −w·A/N
    inp = batch_from_ratios([1.1, 0.5], [True, True], adv=2.0, logp=[-0.7, -1.3])
    load_objective(name)(inp).loss.backward()
    assert inp.logprobs.grad[0, 0].item() == pytest.approx(-1.1 * 2.0 / 2, rel=1e-12)


def test_minpro_and_prefix_differ_only_after_the_first_token():
    # ρ = [0.5, 2, 0.9]: ρ̲ρ = [0.5, 1.0, 0.45]; ρ_1:t = [0.5, 1.0, 0.9]
    inp = batch_from_ratios([0.5, 2.0, 0.9], [True] * 3, adv=1.0, logp=[-1.0, -1.0, -1.0])
    load_objective("minpro")(inp).loss.backward()
    assert (-3 * inp.logprobs.grad[0]).tolist() == pytest.approx([0.5, 1.0, 0.45], rel=1e-12)
    inp = batch_from_ratios([0.5, 2.0, 0.9], [True] * 3, adv=1.0, logp=[-1.0, -1.0, -1.0])
    load_objective("prefix")(inp).loss.backward()
    assert (-3 * inp.logprobs.grad[0]).tolist() == pytest.approx([0.5, 1.0, 0.9], rel=1e-12)


@pytest.mark.parametrize("name", sorted(["minpro", "grpo", "dapo", "dr_grpo", "gspo", "cispo", "prefix", "m2po"]))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_fully_masked_row_changes_nothing(name, loss_agg):
    """A row with no trained token is not a sequence of the batch: same loss, zero gradient."""
    base = random_batch(4, False)
    logp = torch.cat([base.logprobs.detach(), -torch.ones(1, 11, dtype=torch.float64)]).requires_grad_(True)
    old = torch.cat([base.old_logprobs, torch.full((1, 11), -5.0, dtype=torch.float64)])
    adv = torch.cat([base.advantages, torch.tensor([3.0], dtype=torch.float64)])
    mask = torch.cat([base.response_mask, torch.zeros(1, 11, dtype=torch.bool)])
    objective = load_objective(name, loss_agg=loss_agg)
    with_row = objective(ObjectiveInputs(logp, old, adv, mask))
    with_row.loss.backward()
    assert with_row.loss.item() == pytest.approx(objective(base).loss.item(), rel=1e-12)
    assert logp.grad[-1].abs().max().item() == 0.0


def test_constant_normaliser_counts_every_row():
    """seq-mean-token-sum-norm divides by B·L with B all rows (TRL's dr_grpo): a fully masked
    row dilutes it by B/(B+1)."""
    base = random_batch(4, False)
    extra = ObjectiveInputs(
        torch.cat([base.logprobs.detach(), torch.zeros(1, 11, dtype=torch.float64)]),
        torch.cat([base.old_logprobs, torch.zeros(1, 11, dtype=torch.float64)]),
        torch.cat([base.advantages, torch.ones(1, dtype=torch.float64)]),
        torch.cat([base.response_mask, torch.zeros(1, 11, dtype=torch.bool)]),
    )
    objective = load_objective("dr_grpo")
    assert objective(extra).loss.item() == pytest.approx(objective(base).loss.item() * 6 / 7, rel=1e-12)


def test_all_masked_batch_gives_zero_loss_and_gradient():
    inp = batch_from_ratios([1.5, 0.5], [False, False])
    for name in discover("objectives"):
        out = load_objective(name)(inp)
        assert out.loss.item() == 0.0


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_ratio_exactly_at_the_bound_still_gets_gradient(adv):
    """With ε = 0 the clip interval is [1, 1]; ρ = 1 exactly (log ρ = 0) sits on both bounds.
    PPO-clip passes the gradient at the bound (−A·ρ), the detached weight is 1."""
    inp = batch_from_ratios([1.0, 1.0], [True, True], adv=adv, logp=[-0.5, -2.0])
    load_objective("grpo", eps_low=0.0, eps_high=0.0, loss_agg="token-mean")(inp).loss.backward()
    assert inp.logprobs.grad[0].tolist() == pytest.approx([-adv / 2, -adv / 2], rel=1e-12)
    inp = batch_from_ratios([1.0, 1.0], [True, True], adv=adv, logp=[-0.5, -2.0])
    out = load_objective("cispo", eps_low=0.0, eps_high=0.0)(inp)
    assert out.metrics["clip_frac"] == 0.0
    assert out.loss.item() == pytest.approx(-adv * (-0.5 - 2.0) / 2, rel=1e-12)


@pytest.mark.parametrize("nudge,clipped", [(1 - 1e-9, False), (1 + 1e-9, True)])
def test_ppo_clip_switches_exactly_at_one_plus_eps_high(nudge, clipped):
    inp = batch_from_ratios([1.2 * nudge], [True], adv=1.0)
    out = load_objective("grpo", eps_high=0.2)(inp)
    out.loss.backward()
    assert out.metrics["clip_frac_high"] == float(clipped)
    assert inp.logprobs.grad[0, 0].item() == pytest.approx(0.0 if clipped else -1.2 * nudge, rel=1e-9)
    assert out.loss.item() == pytest.approx(-1.2 * min(nudge, 1.0), rel=1e-9)


def test_ppo_lower_clip_only_binds_negative_advantages():
    for adv, grad in [(-1.0, 0.0), (1.0, -0.5)]:
        inp = batch_from_ratios([0.5], [True], adv=adv)
        out = load_objective("grpo")(inp)
        out.loss.backward()
        assert inp.logprobs.grad[0, 0].item() == pytest.approx(grad, abs=1e-12)
        assert out.loss.item() == pytest.approx(-adv * (0.8 if adv < 0 else 0.5), rel=1e-12)


def test_dual_clip_bounds_negative_advantage_loss():
    inp = batch_from_ratios([10.0], [True], adv=-2.0)
    assert load_objective("grpo")(inp).loss.item() == pytest.approx(20.0, rel=1e-12)
    out = load_objective("grpo", dual_clip=3.0)(inp)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(6.0, rel=1e-12)  # min(−A·ρ, −A·c) = 2·3
    assert inp.logprobs.grad[0, 0].item() == 0.0


@pytest.mark.parametrize("name", ["grpo", "cispo", "minpro", "prefix", "m2po", "gspo"])
def test_log_ratio_clamped_at_twenty(name):
    """log ρ = 30 is read as 20: weight e^20 (no overflow); a PPO-type ratio gets no gradient."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    inp = ObjectiveInputs(logp, torch.tensor([[-31.0]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                          torch.tensor([[True]]))
    options = {"m2_threshold": 1e6} if name == "m2po" else {"eps_high": 1e30}  # nothing clipped or masked
    out = load_objective(name, **options)(inp)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    if name in ("cispo", "minpro", "prefix"):
        assert out.loss.item() == pytest.approx(math.exp(20.0) * 1.0, rel=1e-9)  # −e^20·1·(−1)
        assert logp.grad.item() == pytest.approx(-math.exp(20.0), rel=1e-9)
    elif name in ("grpo", "m2po"):
        assert logp.grad.item() == 0.0  # through exp(clamp(·)): nothing beyond ±20
    else:  # gspo: value s = e^20, gradient through log π itself
        assert logp.grad.item() == pytest.approx(-math.exp(20.0), rel=1e-9)


def test_m2po_drops_largest_squared_log_ratios_first():
    # (log ρ)² = [0.01, 0.25, 0.0, 0.04]; mean 0.075 > 0.04 → drop 0.25; mean 0.0167 ≤ 0.04 → stop
    ratios = [math.exp(0.1), math.exp(-0.5), 1.0, math.exp(0.2)]
    inp = batch_from_ratios(ratios, [True] * 4, adv=1.0)
    out = load_objective("m2po")(inp)
    out.loss.backward()
    assert out.metrics["m2_masked_frac"] == 0.25
    assert out.metrics["m2"] == pytest.approx(0.075, rel=1e-9)
    expected = [-r / 4 for r in ratios]
    expected[1] = 0.0
    assert inp.logprobs.grad[0].tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected), rel=1e-9)  # N counts the dropped token


def test_gspo_token_value_is_the_sequence_ratio():
    # log ρ = [0.2, −0.1, 0.5] → s = exp(0.2) for every token of the row
    inp = batch_from_ratios([math.exp(0.2), math.exp(-0.1), math.exp(0.5)], [True] * 3, adv=1.0)
    out = load_objective("gspo", eps_high=1.0)(inp)
    assert out.metrics["seq_ratio_mean"] == pytest.approx(math.exp(0.2), rel=1e-12)
    assert out.loss.item() == pytest.approx(-math.exp(0.2), rel=1e-12)


@pytest.mark.parametrize(
    "name,options,field",
    [
        ("grpo", {"dual_clip": 0.5}, "dual_clip"),
        ("minpro", {"clip_mode": "dual"}, "clip_mode"),
        ("m2po", {"m2_threshold": 0.0}, "m2_threshold"),
        ("cispo", {"eps_high": -1}, "eps_high"),
        ("gspo", {"loss_agg": "mean"}, "loss_agg"),
        ("dapo", {"max_response_length": 10}, "max_response_length"),
        ("m2po", {"eps_high": 0.2}, "eps_high"),
    ],
)
def test_bad_options_are_named(name, options, field):
    with pytest.raises(PluginError, match=field):
        load_objective(name, **options)


def test_objective_defaults_are_the_published_ones():
    assert (load_objective("grpo").eps_low, load_objective("grpo").eps_high) == (0.2, 0.2)
    assert load_objective("grpo").loss_agg == "seq-mean-token-mean"
    assert (load_objective("dapo").eps_high, load_objective("dapo").loss_agg) == (0.28, "token-mean")
    assert load_objective("dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert load_objective("dr_grpo").default_advantage == "dr_grpo"
    assert (load_objective("gspo").eps_low, load_objective("gspo").eps_high) == (3e-4, 4e-4)
    assert (load_objective("minpro").eps_low, load_objective("minpro").eps_high) == (1.0, 0.2)
    assert load_objective("m2po").m2_threshold == 0.04
    assert {n for n in discover("objectives") if load_objective(n).uses_prefix_weight} == {
        "minpro", "prefix", "ctpo", "pnpo", "ctpo_la"}
    assert (load_objective("ctpo").eps_low, load_objective("ctpo").eps_high, load_objective("ctpo").dual_clip) == (
        0.2, 0.2, 3.0)  # verl's actor defaults, which the CTPO authors keep
    la = load_objective("ctpo_la")
    assert (la.la_clip_low, la.la_clip_high, la.la_clip_c, la.la_power) == (0.025, 0.05, 0.05, 0.5)  # ctpo.sh
    assert (load_objective("gmpo").eps_low, load_objective("gmpo").eps_high) == (0.4, 0.4)  # verl's GMPO example
    cppo = load_objective("cppo")  # CPPOConfig of the authors' verl PR, with DPPO's δ and c
    assert (cppo.delta, cppo.w_min, cppo.delta_b, cppo.delta_b_q, cppo.delta_b_k, cppo.delta_b_max_mult,
            cppo.truncation) == (0.15, 0.8, 0.02, 0.9, 1.0, 5.0, 20.0)  # fmt: skip
    topr = load_objective("topr")  # ROLL's pg_variant topr
    assert (topr.positive_weight, topr.negative_weight, topr.loss_agg) == (1.0, 1.0, "seq-mean-token-mean")
    sapo = load_objective("sapo")  # verl's ActorConfig and TRL's GRPOConfig
    assert (sapo.tau_pos, sapo.tau_neg, sapo.loss_agg) == (1.0, 1.05, "seq-mean-token-mean")
    gipo = load_objective("gipo")  # RLinf's GIPO design note; the paper's authors published no code
    assert (gipo.sigma, gipo.rho_min, gipo.rho_max, gipo.loss_agg) == (1.0, 0.0067, 148.0, "token-mean")
    gppo = load_objective("ce_gppo")  # the authors' 7B math recipe
    assert (gppo.beta_low, gppo.beta_high, gppo.eps_low, gppo.eps_high, gppo.dual_clip) == (0.75, 1.0, 0.2, 0.2, 10.0)
    for name, delta in (("dppo_tv", 0.15), ("dppo_kl", 0.05)):  # examples/dppo_trainer in verl
        dppo = load_objective(name)
        assert (dppo.delta_low, dppo.delta_high, dppo.truncation, dppo.loss_agg) == (
            delta, delta, 10000.0, "seq-mean-token-sum-norm")


def test_the_arena_enters_every_builtin_objective():
    """recipes/arena.yaml's sweep and scripts/arena.sh's probe name every built-in objective
    (dapo and dr_grpo are GRPO's clip and aggregation variants, MinPRO enters in both clip modes):
    a new objective must not be left out of the comparison."""
    root = Path(__file__).resolve().parents[1]
    grid = read_yaml(root / "recipes" / "arena.yaml")["sweep"]["grid"]["objective"]
    swept = [o["name"] + "".join(f":{k}={v}" for k, v in o.get("options", {}).items()) for o in grid]
    probed = re.search(r"for name in (.*?); do", (root / "scripts" / "arena.sh").read_text(), re.DOTALL).group(1).split()
    assert [n for n in probed if n != "\\"] == swept
    assert {n.split(":")[0] for n in swept} == set(discover("objectives")) - {"dapo", "dr_grpo"}
    assert "minpro:clip_mode=ppo" in swept
