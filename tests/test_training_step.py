"""The training step at real scale: chunked log-probs, mixed precision, checkpointing, schedules, devices."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import minpro_cli.logprobs as chunked_head
from minpro_cli import modeling
from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError
from minpro_cli.logprobs import ChunkedLogProbs, pack, response_logprobs
from minpro_cli.modeling import Policy, load_policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.rollout import run_rollout
from minpro_cli.schedule import lr_multiplier
from minpro_cli.step import RolloutBatch, Trainee, update_step
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def ragged_rows(policy: Policy, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and responses of uneven lengths, random token ids."""
    gen = torch.Generator().manual_seed(seed)
    vocab = policy.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 7, 5, 2)]
    responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 1, 9, 4)]
    return prompts, responses


def ragged_batch(policy: Policy, seed: int = 0):
    return pack(*ragged_rows(policy, seed), policy.pad_token_id)


def full_vocabulary_reference(model: torch.nn.Module, batch, temperature: float):
    """log-softmax over the model's whole (B, R, V) logits, as the code did before chunking."""
    width = batch.response_ids.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=width + 1).logits[:, :-1]
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    mask = batch.response_mask
    logprobs = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * mask
    return logprobs, (-(logp_all.exp() * logp_all).sum(-1) * mask).detach()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_the_full_vocabulary_values_and_gradients(monkeypatch, dtype, tolerance, temperature):
    monkeypatch.setattr(chunked_head, "CHUNK_ELEMENTS", 3 * 1024)  # chunks of 3 tokens: several per batch
    policy = load_policy("embedded")
    model = policy.model.to(dtype)
    batch = ragged_batch(policy)
    weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def run(fn):
        model.zero_grad()
        logprobs, entropy = fn()
        (logprobs * weights).sum().backward()
        return logprobs.detach(), entropy, {k: p.grad.clone() for k, p in model.named_parameters()}

    ours = run(lambda: response_logprobs(model, batch, temperature, with_entropy=True))
    theirs = run(lambda: full_vocabulary_reference(model, batch, temperature))
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), atol=tolerance, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1].to(ours[1].dtype), atol=tolerance, rtol=0)
    for name, grad in ours[2].items():  # relative to the tensor's largest entry: rounding scales with it
        scale = float(theirs[2][name].abs().max())
        assert float((grad - theirs[2][name]).abs().max()) <= tolerance * scale, name
    assert ours[2]["lm_head.weight" if "lm_head.weight" in ours[2] else "model.embed_tokens.weight"].abs().max() > 0


def test_chunked_head_passes_gradcheck_with_a_bias_and_the_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(
        lambda h, w, b: ChunkedLogProbs.apply(h, w, b, targets, 0.7, False, 2)[0], (hidden, weight, bias)
    )
    mix = torch.randn(5, dtype=torch.float64, generator=gen)

    def with_entropy(h, w, b):  # the entropy bonus's gradient, with and without log-probs in the loss
        logprobs, entropy = ChunkedLogProbs.apply(h, w, b, targets, 0.7, True, 2)
        return entropy, logprobs + mix * entropy

    assert torch.autograd.gradcheck(with_entropy, (hidden, weight, bias))
    logprobs, entropy = ChunkedLogProbs.apply(hidden, weight, bias, targets, 0.7, True, 2)
    by_hand = torch.log_softmax((hidden @ weight.T + bias) / 0.7, -1)  # independent of the chunking
    torch.testing.assert_close(logprobs, by_hand[torch.arange(5), targets])
    torch.testing.assert_close(entropy, -(by_hand.exp() * by_hand).sum(-1))


def test_chunk_size_bounds_the_logits_held_at_once():
    assert chunked_head.chunk_tokens(49_152) * 49_152 <= chunked_head.CHUNK_ELEMENTS
    assert chunked_head.chunk_tokens(151_936) >= 200 and chunked_head.chunk_tokens(10**9) == 1


def test_activation_checkpointing_gives_the_same_gradients():
    policy = load_policy("embedded")
    model = policy.model.double()
    batch = ragged_batch(policy)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        logprobs, _ = response_logprobs(m, batch)
        logprobs.sum().backward()
        assert m.is_activation_checkpointing == checkpointing
        return {k: p.grad for k, p in m.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-12, rtol=0)


def test_compiled_blocks_give_the_same_gradients_and_sampling_stays_eager():
    """train.compile: each decoder block's forward compiled (dynamic shapes). Its float32 gradients
    are as close to the exact (float64 eager) ones as eager float32's are, on two batch shapes
    with one compile; the sampler never compiles and draws the same tokens."""
    from torch._dynamo.utils import counters

    from minpro_cli.samplers.hf import HFSampler

    policy = load_policy("embedded")
    exact = copy.deepcopy(policy.model).double()
    compiled = copy.deepcopy(policy.model)
    assert modeling.compile_blocks(compiled) == compiled.config.num_hidden_layers

    def grads(model: torch.nn.Module, seed: int) -> torch.Tensor:
        model.zero_grad()
        logprobs, _ = response_logprobs(model, ragged_batch(policy, seed))
        logprobs.sum().backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    torch._dynamo.reset()
    counters.clear()
    for seed in (0, 1):  # a second batch of other lengths: dynamic shapes, no recompile per shape
        reference = grads(exact, seed)
        eager_error = (grads(policy.model, seed) - reference).norm()
        compiled_error = (grads(compiled, seed) - reference).norm()
        assert 0 < eager_error < 1e-4 * reference.norm()
        assert compiled_error < 2 * eager_error
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 4  # compiled once, not once per shape
    prompts = ragged_rows(policy)[0]
    sampled = HFSampler(max_new_tokens=8).generate(Policy(compiled, policy.tokenizer, policy.path), prompts, seed=0)
    assert counters["stats"]["unique_graphs"] == graphs  # sampling ran eagerly
    plain = HFSampler(max_new_tokens=8).generate(policy, prompts, seed=0)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in plain]


def rollout_batch(policy: Policy, seed: int = 0, advantages: tuple[float, ...] = (1.0, -0.5, 0.8, -1.2)) -> RolloutBatch:
    prompts, responses = ragged_rows(policy, seed)
    with torch.no_grad():
        current, _ = response_logprobs(policy.model, pack(prompts, responses, policy.pad_token_id))
    old = [(current[i, : len(r)] - 0.05).tolist() for i, r in enumerate(responses)]
    return RolloutBatch(prompts, responses, old, torch.tensor(advantages), 1.0)


def train_steps(
    policy: Policy, compute: torch.dtype, steps: int, lr: float, batch: RolloutBatch | None = None
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The weights before and after each AdamW step, and each step's loss."""
    model = copy.deepcopy(policy.model)
    trainee = Trainee(model, policy.pad_token_id, compute_dtype=compute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = batch or rollout_batch(policy)
    states, losses = [{k: v.detach().clone() for k, v in model.state_dict().items()}], []
    for _ in range(steps):
        losses.append(update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0)["loss"])
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, losses


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] != before[k].to(after[k].dtype) for k in before}


def test_bfloat16_mixed_precision_loses_no_small_update():
    """At lr 1e-6, two steps of bf16 autocast with float32 master weights move the weights
    float32 steps move; pure bf16 weights (what `model.dtype: bfloat16` used to train) lose
    most of those updates. Allowed: up to 1e-4 of them (measured: 1 of 878,461), weights whose
    tiny gradient rounds differently in bf16 (below AdamW's ε, or changing sign between the
    steps so the two updates cancel): gradient rounding, not updates lost to the weights."""
    policy = load_policy("embedded")
    full, _ = train_steps(policy, torch.float32, 2, 1e-6)
    mixed, _ = train_steps(policy, torch.bfloat16, 2, 1e-6)
    assert all(v.dtype == torch.float32 for v in mixed[-1].values())  # master weights stay float32
    by_full, by_mixed = moved(full[0], full[2]), moved(mixed[0], mixed[2])
    n_full = sum(int(m.sum()) for m in by_full.values())
    assert n_full > 0.9 * sum(v.numel() for v in full[0].values())
    missed = sum(int((by_full[k] & ~by_mixed[k]).sum()) for k in by_full)
    assert missed <= 1e-4 * n_full, f"{missed} of {n_full} updates lost"

    pure = Policy(copy.deepcopy(policy.model).to(torch.bfloat16), policy.tokenizer, policy.path)
    pure_states, _ = train_steps(pure, torch.float32, 2, 1e-6)
    by_pure = moved(pure_states[0], pure_states[2])
    assert sum(int((by_full[k] & ~by_pure[k]).sum()) for k in by_full) > 0.5 * n_full  # the failure is real


def test_bfloat16_mixed_precision_follows_the_float32_loss():
    """10 steps with positive advantages (the loss is a weighted NLL, ~9.7 nats at the start,
    falling ~25%): bf16 autocast stays within 5% of float32's loss at every step. bf16 keeps 8
    mantissa bits, so log-probs carry ~0.05 nats of rounding, which the MinPRO weight (a ratio
    against float32-computed μ here) amplifies; measured: ≤ 2.4%."""
    policy = load_policy("embedded")
    batch = rollout_batch(policy, advantages=(1.0, 1.0, 1.0, 1.0))
    _, full = train_steps(policy, torch.float32, 10, 3e-5, batch)
    _, mixed = train_steps(policy, torch.bfloat16, 10, 3e-5, batch)
    assert full[-1] < 0.85 * full[0] and mixed[-1] < 0.85 * mixed[0]  # both really train
    assert max(abs(a - b) / abs(a) for a, b in zip(full, mixed)) < 0.05, (full, mixed)


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_runs_on_the_device(device):
    policy = load_policy("embedded", device=device, dtype="bfloat16" if device == "cuda" else "float32")
    batch = rollout_batch(policy)
    trainee = Trainee.of(policy, micro_batch_tokens=16)
    metrics = update_step(trainee, torch.optim.AdamW(policy.model.parameters(), lr=1e-4), MinPRO(), batch, 1.0)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert next(policy.model.parameters()).device.type == device


def test_lr_schedules_by_hand():
    # warm-up of 4 steps, then 10 steps in all: progress p = (step − 4) / 6
    assert [lr_multiplier(s, 10, "cosine", 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 10, "cosine", 4, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(7, 10, "cosine", 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # p = 1/2: halfway
    assert lr_multiplier(10, 10, "cosine", 4, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(99, 10, "cosine", 4, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_multiplier(7, 10, "linear", 4, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(5, 10, "linear", 4, 0.4) == pytest.approx(1 - 0.6 / 6)
    assert lr_multiplier(9, 10, "constant", 4, 0.4) == 1.0
    assert lr_multiplier(0, 10, "constant", 0, 0.0) == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_naming_the_key(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "model.device=cuda"])
    for stage in (run_train, run_rollout):
        with pytest.raises(ConfigError) as error:
            stage(recipe)
        message = str(error.value)
        assert "model.device" in message and "CUDA build of torch" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="model.device.*not a device"):
        load_recipe(QUICKSTART, ["model.device=gpu0"])


def test_float16_training_is_refused_with_the_alternative(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype=float16 cannot train.*bfloat16"):
        run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path}", "model.dtype=float16"]))
