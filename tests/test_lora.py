"""`model.lora`: only the adapters train; checkpoints hold merged HF weights (what the samplers
use) and the adapter in peft's layout; both give the trained model's log-probs; resume is exact."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_step import ragged_batch
from transformers import AutoModelForCausalLM

from minpro_cli.config import load_recipe
from minpro_cli.distributed import SINGLE
from minpro_cli.errors import ConfigError
from minpro_cli.logprobs import response_logprobs
from minpro_cli.lora import LoraAdapters
from minpro_cli.penalties import reference_logprobs
from minpro_cli.sections import LoraConfig
from minpro_cli.train import run_train

peft = pytest.importorskip("peft")
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = [
    "train.prompts_per_iteration=4", "train.group_size=4", "sampler.options.max_new_tokens=24",
    "optim.warmup_steps=0", "optim.lr=2e-2", "train.checkpoint_every=2", "train.keep_checkpoints=2",
    "model.lora.r=4", "model.lora.alpha=8",
    "train.entropy_coef=0.05", "train.kl_coef=0.1",  # a gradient even when every reward is equal; π_ref = adapters off
]  # fmt: skip


def randomised(adapters: LoraAdapters, seed: int = 0) -> None:
    """Non-zero B (peft starts it at 0), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapters.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run_train(load_recipe(QUICKSTART, [f"run_dir={run_dir}", "train.iterations=4", *TINY]))
    return run_dir


def test_attach_freezes_the_base_and_changes_nothing_until_trained(policy):
    model = copy.deepcopy(policy.model)
    batch = ragged_batch(policy)
    before = response_logprobs(model, batch)[0]
    adapters = LoraAdapters.attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.rsplit(".", 1)[-1] for n in adapters.scaling} == {"q_proj", "v_proj"}
    assert set(adapters.scaling.values()) == {32.0 / 4}  # alpha / r
    torch.testing.assert_close(response_logprobs(model, batch)[0], before, atol=0, rtol=0)


def test_the_adapters_start_from_the_seed_alone(policy):
    """Every rank of a torchrun job (and every rerun) must start from the same A, whatever its
    random state: FSDP2 would otherwise stitch shards of different adapters together."""

    def start(seed: int, noise: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(noise)  # another process's random state
        model = copy.deepcopy(policy.model)
        LoraAdapters.attach(model, LoraConfig(r=4), seed=seed)
        return {k: v for k, v in model.state_dict().items() if "lora_A" in k}

    a, b, c = start(0, noise=1), start(0, noise=2), start(1, noise=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    LoraAdapters.attach(copy.deepcopy(policy.model), LoraConfig(r=4), seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched


def test_merged_weights_equal_peft_s_own_merge_and_give_the_adapted_log_probs(policy):
    base = copy.deepcopy(policy.model).double()  # float64: agreement up to rounding, not float32's 1e-5
    model = copy.deepcopy(base)
    adapters = LoraAdapters.attach(model, LoraConfig(r=4, alpha=6.0))
    randomised(adapters)
    merged = adapters.merged(model.state_dict())
    theirs = copy.deepcopy(adapters.peft_model).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(theirs) == sorted(base.state_dict())
    for key in merged:
        torch.testing.assert_close(merged[key], theirs[key], atol=1e-12, rtol=0)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    batch = ragged_batch(policy)
    adapted = response_logprobs(model, batch)[0]
    assert (adapted - response_logprobs(base, batch)[0]).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(response_logprobs(plain, batch)[0], adapted, atol=1e-10, rtol=0)
    reference = reference_logprobs(load_recipe(None), policy_with(policy, model, adapters), model, SINGLE)
    off = reference(batch, 1.0)  # the KL reference: the adapters switched off, the base model
    torch.testing.assert_close(off, response_logprobs(base, batch)[0], atol=1e-12, rtol=0)


def policy_with(policy, model, adapters):
    out = copy.copy(policy)
    out.model, out.adapters = model, adapters
    return out


def test_a_lora_run_trains_the_adapters_and_exports_merged_weights_and_the_adapter(trained, policy):
    final = trained / "final"
    merged = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)  # plain transformers
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(policy.model), final / "adapter")
    batch = ragged_batch(policy)
    ours = response_logprobs(merged, batch)[0]
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(adapted, batch)[0], ours, atol=1e-5, rtol=1e-5)  # float32
    assert (ours - response_logprobs(policy.model, batch)[0]).abs().max() > 1e-3  # training changed the policy
    weights, base = load_file(final / "model.safetensors"), policy.model.state_dict()
    untouched = [k for k in weights if not k.endswith("_proj.weight")]  # embeddings, norms: not adapted
    assert untouched and all(torch.equal(weights[k], base[k]) for k in untouched)
    assert any(not torch.equal(weights[k], base[k]) for k in weights if k.endswith("_proj.weight"))


def test_sampling_uses_the_merged_weights_of_each_round(trained):
    """On-policy, every round's log-probs at training time match the sampler's (ρ ≈ 1): the
    sampling copy is refreshed with the merged weights after every update."""
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert 0.99 < r["ratio_min"] and r["ratio_max"] < 1.01, r


def test_a_lora_run_resumes_exactly(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    run_train(load_recipe(QUICKSTART, [f"run_dir={run_dir}", "train.iterations=4", *TINY]),
              resume=str(run_dir / "checkpoints" / "round_00002"))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(trained / "final" / name), load_file(run_dir / "final" / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_errors_name_the_key_and_the_fix(policy, monkeypatch):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        LoraAdapters.attach(copy.deepcopy(policy.model), LoraConfig(target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match="not a plain linear layer"):
        LoraAdapters.attach(copy.deepcopy(policy.model), LoraConfig(target_modules=["embed_tokens"]))
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'minpro\[lora\]'"):
        LoraAdapters.attach(copy.deepcopy(policy.model), LoraConfig())


def test_recipe_validates_lora_options():
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_recipe(None, ["model.lora.r=0"])
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_recipe(None, ["model.lora.dropout=1.5"])
    assert load_recipe(None, ["model.lora.r=8"]).model.lora == LoraConfig(r=8)
