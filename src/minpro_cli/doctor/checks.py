"""The doctor's checks, each on a small fixed batch drawn with the recipe's own sampler: every
function returns `Finding`s (docs/doctor.md has each threshold and why)."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch

from minpro_cli.advantages import group_indices, zero_variance_groups
from minpro_cli.correction import FactorTally
from minpro_cli.doctor.findings import Finding, graded
from minpro_cli.doctor.forward import budget_groups, processed_logprobs, trainer_logprobs
from minpro_cli.hardware import bf16_matmul_speedup, emulated_bf16_advice, native_bf16
from minpro_cli.logprobs import pad_rows
from minpro_cli.modeling import Policy
from minpro_cli.objectives import Objective
from minpro_cli.objectives.logratios import log_min_prefix_ratio
from minpro_cli.ratiostats import absolute_bin, absolute_bin_labels
from minpro_cli.rollouts import RolloutRow
from minpro_cli.sampling import SamplingJob
from minpro_cli.tasks import Problem
from minpro_cli.verifiers import Verifier, verify_batch

# |Δ log p| a sampler that *is* the trainer may show, by the trainer's compute precision: the
# decode path (KV cache, one column at a time) and the full forward round differently
PARITY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.02}
# on-policy ratios of the same rows scored in other arrangements: batch-variant kernels only
INVARIANCE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.01}
# verl's documented alarm levels for a sampler–trainer mismatch (rollout correction)
VERL_ESS, VERL_KL, VERL_CHI2 = 0.3, 0.1, 1.0
PROBE_TEMPERATURE, PROBE_TOP_P = 0.7, 0.9  # check 2 draws with these, whatever the recipe's
ROUND_TRIP_WARN, ROUND_TRIP_FAIL = 0.98, 0.9  # responses whose ids survive decode → encode
TRUNCATED_WARN = 0.25  # responses that hit max_new_tokens
NO_SIGNAL_WARN = 0.75  # groups whose rewards are all equal
REWARD_SECONDS_WARN = 1.0  # verifier time per response
# bf16 is suggested where its matmul is this much faster at a model this wide: at width 128 (the
# embedded models) a bf16 run is slower than a float32 one however fast the matmul (docs/speed.md)
BF16_PAYS, BF16_WIDTH = 1.5, 512


def tolerance(table: dict[torch.dtype, float], dtype: torch.dtype) -> float:
    """The precision's entry of `table` (float32's for any other dtype)."""
    return table.get(dtype, table[torch.float32])


@dataclass
class Draw:
    """Responses drawn by the recipe's sampler, with what it recorded."""

    rows: list[RolloutRow]
    temperature: float
    top_p: float
    top_k: int

    @property
    def prompts(self) -> list[list[int]]:
        return [r.prompt_token_ids for r in self.rows]

    @property
    def responses(self) -> list[list[int]]:
        return [r.response_token_ids for r in self.rows]

    @functools.cached_property
    def recorded(self) -> list[torch.Tensor]:
        return [torch.tensor(r.behavior_logprobs, dtype=torch.float32) for r in self.rows]

    @property
    def truncated(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) float64 values and their mask."""
    width = max((len(r) for r in rows), default=0)
    mask = torch.tensor([[t < len(r) for t in range(width)] for r in rows], dtype=torch.bool)
    return pad_rows([r.tolist() for r in rows], torch.zeros(mask.shape, dtype=torch.float64)), mask


def by_position(values: torch.Tensor, mask: torch.Tensor) -> list[dict[str, float | str]]:
    """Mean and max of `values` per absolute position bin (1, 2–3, 4–7, …)."""
    bins = absolute_bin(torch.arange(mask.shape[1]))[None].expand_as(mask)[mask]
    flat, labels = values[mask], absolute_bin_labels()
    return [{"bin": labels[k], "tokens": int((bins == k).sum()), "mean": float(flat[bins == k].mean()),
             "max": float(flat[bins == k].max())} for k in bins.unique().tolist()]  # fmt: skip


# --- 1. sampler vs trainer ---------------------------------------------------------------------


def recommendation(level: str) -> str:
    """The correction layer's setting for a measured mismatch level (docs/correction.md)."""
    return {
        "ok": "train.anchor: behavior (the default) needs no correction",
        "warn": "use train.anchor: sampling_weights with correction: {level: token, high: 2.0} (token TIS): the "
        "anchor keeps the mismatch out of the objective's ratio and MinPRO's prefix minimum",
        "fail": "fix the sampler first; until then train.anchor: sampling_weights with correction: {level: "
        "sequence, action: mask, low: 0.5, high: 2.0} (IcePop) drops the worst responses",
    }[level]


def parity(draw: Draw, trainer: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> Finding:
    """log μ as the sampler recorded it against the trainer's forward of the same weights at the
    sampler's settings (`reference`: processed when the sampler truncates, else the trainer's own
    path `trainer`)."""
    log_f, mask = padded([ref - rec for ref, rec in zip(reference, draw.recorded)])
    tally = FactorTally.empty()
    tally.add(log_f, mask)
    stats = {k.removeprefix("mismatch/"): float(v) for k, v in tally.tensors("mismatch").items()}
    delta = log_f.abs()[mask]
    bound = tolerance(PARITY_TOLERANCE, dtype)
    alarms = [name for name, bad in (("ESS", stats["ess_token"] < VERL_ESS), ("|KL|", abs(stats["kl_k1"]) > VERL_KL),
                                     ("χ²", stats["chi2_token"] > VERL_CHI2)) if bad]  # fmt: skip
    verdict = "fail" if alarms else graded(float(delta.max()), bound, float("inf"))
    quantiles = torch.quantile(delta, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    details = {"abs_delta": dict(zip(("p50", "p90", "p99"), quantiles)) | {"max": float(delta.max())},
               "kl_k1": stats["kl_k1"], "kl_k3": stats["kl_k3"], "chi2_token": stats["chi2_token"],
               "chi2_seq": stats["chi2_seq"], "ess_token": stats["ess_token"], "ess_seq": stats["ess_seq"],
               "token_mult_prob_error": float(delta.exp().mean()),  # NeMo-RL's: > 1.05 "a framework bug"
               "tokens": int(mask.sum()), "by_position": by_position(log_f.abs(), mask),
               "compared_with": "processed forward (truncated)" if draw.truncated else "trainer path",
               "recommended": recommendation(verdict)}  # fmt: skip
    why = f"verl's alarm: {', '.join(alarms)}; " if alarms else ""
    return Finding(
        "parity", "sampler vs trainer: recorded log μ against the trainer's forward", verdict, float(delta.max()),
        f"max |Δ log p| ≤ {bound:g} ({str(dtype).removeprefix('torch.')} trainer); ESS ≥ {VERL_ESS}, |KL| ≤ "
        f"{VERL_KL}, χ² ≤ {VERL_CHI2}", why + recommendation(verdict), details,
    )  # fmt: skip


# --- 2. processed vs raw log-probs ---------------------------------------------------------------


def processed(policy: Policy, draw: Draw) -> Finding:
    """Which distribution the recorded log-probs belong to, among the sampled one (temperature
    and truncation applied) and the usual mistakes: the best fit by mean |Δ log p| must be it."""
    candidates = {
        "processed (temperature and truncation)": (draw.temperature, draw.top_p, draw.top_k),
        "tempered, untruncated": (draw.temperature, 1.0, 0),
        "raw logits (T = 1, untruncated)": (1.0, 1.0, 0),
        "truncated, untempered": (1.0, draw.top_p, draw.top_k),
    }
    recorded = torch.cat(draw.recorded).double()
    fits, outside = {}, 0
    for name, (temperature, top_p, top_k) in candidates.items():
        logp = torch.cat(processed_logprobs(policy, draw.prompts, draw.responses, temperature, top_p, top_k)).double()
        if name.startswith("processed"):
            outside = int(torch.isinf(logp).sum())
        fits[name] = float((logp.clamp(min=-100.0) - recorded).abs().mean())
    best = min(fits, key=fits.__getitem__)
    sampled = next(iter(candidates))
    ok = best == sampled and outside == 0
    advice = ("the recorded log-probs are those of the distribution sampled" if ok else
              f"the sampler records {best if best != sampled else 'log-probs of tokens it should not have drawn'}: "
              "fix the sampler plugin to return log-probs after temperature and truncation")  # fmt: skip
    return Finding(
        "processed_logprobs", f"processed vs raw log-probs (drawn at T = {draw.temperature:g}, top-p = {draw.top_p:g})",
        "ok" if ok else "fail", fits[sampled], "best fit is the sampled distribution; no token outside its support",
        advice, {"mean_abs_delta": fits, "best_fit": best, "tokens_outside_support": outside,
                 "tokens": int(recorded.numel())},
    )  # fmt: skip


def processed_unavailable() -> Finding:
    return Finding("processed_logprobs", "processed vs raw log-probs", "warn", None,
                   "a sampler whose temperature and top_p can be set", "the sampler's options cannot be copied with "
                   "another temperature: make it a Pydantic model (docs/plugins.md)")  # fmt: skip


# --- 3. batch and micro-batch invariance ---------------------------------------------------------


def invariance(policy: Policy, draw: Draw, temperature: float, budget: int | None, rows: int = 16) -> Finding:
    """The trainer's log-probs of the same rows alone (no padding) against the same rows in one
    batch, in the recipe's micro-batches and one row's worth, reversed, and with extra left padding."""
    prompts, responses = draw.prompts[:rows], draw.responses[:rows]
    alone = trainer_logprobs(policy, prompts, responses, temperature, [[i] for i in range(len(prompts))])
    tight = max(len(p) + len(r) for p, r in zip(prompts, responses))
    variants = {
        "one batch": trainer_logprobs(policy, prompts, responses, temperature),
        f"micro-batches of {budget} tokens (recipe)": trainer_logprobs(
            policy, prompts, responses, temperature, budget_groups(prompts, responses, budget)),
        f"micro-batches of {tight} tokens": trainer_logprobs(
            policy, prompts, responses, temperature, budget_groups(prompts, responses, tight)),
        "reversed order": trainer_logprobs(policy, prompts, responses, temperature, [list(range(len(prompts)))[::-1]]),
        "extra left padding": trainer_logprobs(policy, prompts, responses, temperature,
                                               filler=max(prompts, key=len) * 2),
    }  # fmt: skip
    reference = torch.cat(alone).double()
    worst_by = {name: float((torch.cat(v).double() - reference).abs().max()) for name, v in variants.items()}
    value = max(worst_by.values())
    bound = tolerance(INVARIANCE_TOLERANCE, policy.compute_dtype)
    verdict = graded(value, bound, 10 * bound)
    worst_name = max(worst_by, key=worst_by.__getitem__)
    advice = ("on-policy ratios are 1 within the precision's tolerance however rows are batched" if verdict == "ok"
              else f"log-probs change with the batching ({worst_name}): on-policy ratios are not 1; check position ids "
              "under padding and batch-variant kernels, or train in float32")  # fmt: skip
    return Finding("invariance", "batch and micro-batch invariance of the trainer's log-probs", verdict, value,
                   f"max |Δ log p| ≤ {bound:g} against each row alone", advice,
                   {"max_abs_delta": worst_by, "rows": len(prompts)})  # fmt: skip


# --- 4. tokenizer ---------------------------------------------------------------------------------


def round_trip(job: SamplingJob, draw: Draw, problems: list[Problem]) -> Finding:
    """decode → encode of each response gives its ids back; each prompt's text survives encode → decode."""
    tok = job.policy.tokenizer
    same = [tok.encode(tok.decode(ids), add_special_tokens=False) == ids for ids in draw.responses]
    texts = [job.prompt(p) for p in problems]
    lost = [t for t in texts if tok.decode(tok.encode(t, add_special_tokens=False)) != t]
    fraction = sum(same) / max(len(same), 1)
    verdict = "fail" if lost else graded(1.0 - fraction, 1.0 - ROUND_TRIP_WARN, 1.0 - ROUND_TRIP_FAIL)
    if lost:
        advice = f"the tokenizer does not give text back: encode → decode of a prompt changes it ({lost[0][:60]!r})"
    elif verdict == "ok":
        advice = "token ids survive decode → encode: text-based samplers and multi-turn re-encoding lose nothing"
    else:
        first = next(i for i, s in enumerate(same) if not s)
        advice = (f"{len(same) - sum(same)} response(s) change ids on decode → encode (first: row {first}): keep ids "
                  "from the sampler, never re-encode its text")  # fmt: skip
    return Finding("tokenizer_round_trip", "tokenizer: decode → encode round trip", verdict, fraction,
                   f"≥ {ROUND_TRIP_WARN:.0%} of responses (fail below {ROUND_TRIP_FAIL:.0%}); every prompt's text",
                   advice, {"responses": len(same), "responses_round_trip": sum(same), "prompts_changed": len(lost)})


def special_tokens(job: SamplingJob) -> Finding:
    """EOS set; pad set and not EOS, or its absence harmless; the chat template renders when used."""
    tok = job.policy.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    details: dict[str, object] = {"eos_token_id": eos, "pad_token_id": pad, "chat_template_used": job.chat}
    if eos is None:
        return Finding("special_tokens", "tokenizer: EOS, pad and chat template", "fail", None, "EOS id set",
                       "the tokenizer has no EOS: responses cannot end; set eos_token in tokenizer_config.json", details)
    if job.chat:
        try:
            rendered = str(tok.apply_chat_template([{"role": "user", "content": "2+3?"}], add_generation_prompt=True,
                                                   tokenize=False))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 — any template error is the finding
            return Finding("special_tokens", "tokenizer: EOS, pad and chat template", "fail", None, "template renders",
                           f"the chat template does not render: {type(exc).__name__}: {exc}", details)
        if "2+3?" not in rendered:
            return Finding("special_tokens", "tokenizer: EOS, pad and chat template", "fail", None,
                           "template keeps the message", "the chat template drops the user's message", details)
    note = ("pad is EOS: harmless here (minpro masks responses by length and trains the EOS); a tool that masks by "
            "pad id would drop the EOS from the loss" if pad == eos else
            "no pad id: minpro pads with EOS and masks by length" if pad is None else "EOS and pad are set and distinct")
    return Finding("special_tokens", "tokenizer: EOS, pad and chat template", "ok", None,
                   "EOS set; chat template renders when used", note, details)  # fmt: skip


def truncation(draw: Draw, max_new_tokens: int | None) -> Finding:
    """Responses that hit max_new_tokens: their reward is that of an unfinished answer."""
    fraction = sum(r.finish_reason == "length" for r in draw.rows) / max(len(draw.rows), 1)
    verdict = graded(fraction, TRUNCATED_WARN, float("inf"))
    advice = ("few responses are cut off" if verdict == "ok" else
              f"{fraction:.0%} of responses hit max_new_tokens={max_new_tokens}: truncation biases the reward; raise "
              "sampler.options.max_new_tokens or ask for shorter answers")  # fmt: skip
    return Finding("truncated_responses", "responses cut at max_new_tokens", verdict, fraction,
                   f"≤ {TRUNCATED_WARN:.0%} of responses", advice, {"max_new_tokens": max_new_tokens})


# --- 5. truncated sampling with prefix objectives -------------------------------------------------


def truncated_sampling(draw: Draw, trainer: list[torch.Tensor], objective: Objective, name: str) -> Finding:
    """On-policy ρ̲_t = min_{i<t} π/μ with π the trainer's untruncated forward: 1 unless the
    sampler truncates (μ ≥ π on the support, so every ratio is ≤ 1 and the minimum only falls)."""
    log_rho, mask = padded([t - r for t, r in zip(trainer, draw.recorded)])
    min_prefix = log_min_prefix_ratio(log_rho, mask).exp()
    decay = by_position(min_prefix, mask)
    last = float(decay[-1]["mean"]) if decay else 1.0
    details = {"min_prefix_ratio_by_position": decay, "top_p": draw.top_p, "top_k": draw.top_k,
               "prefix_objective": objective.uses_prefix_weight}  # fmt: skip
    title = "truncated sampling with a prefix objective"
    if not draw.truncated:
        return Finding("truncated_sampling", title, "ok", last, "top_p = 1 and top_k = 0",
                       "the sampler does not truncate: on-policy ρ̲_t stays 1", details)
    if objective.uses_prefix_weight:
        return Finding("truncated_sampling", title, "fail", last, "no truncation with a prefix objective",
                       f"objective '{name}' multiplies ratios over the prefix and top-p/top-k makes each ≤ 1: on-policy "
                       f"ρ̲_t falls to {last:.3f} by the last positions; set top_p: 1.0, top_k: 0", details)  # fmt: skip
    return Finding("truncated_sampling", title, "warn", last, "no truncation",
                   "truncation biases the token ratio low by the truncated mass; set top_p: 1.0, top_k: 0", details)


# --- 6. reward ------------------------------------------------------------------------------------


def references(verifier: Verifier, name: str, problems: list[Problem]) -> Finding:
    """The verifier on each reference, written as a correct response would write it."""
    render = getattr(verifier, "reference_response", lambda reference: reference)
    results = verify_batch(verifier, [render(p.answer) for p in problems], [p.answer for p in problems])
    missed = [p for p, r in zip(problems, results) if r.reward < 1.0]
    advice = ("every reference scores 1" if not missed else
              f"verifier '{name}' does not reward the reference of problem '{missed[0].id}' "
              f"({render(missed[0].answer)[:60]!r}): fix the verifier or the data's answer field")  # fmt: skip
    return Finding("reference_reward", "verifier on the references", "ok" if not missed else "fail",
                   1.0 - len(missed) / max(len(problems), 1), "every reference scores 1", advice,
                   {"problems": len(problems), "missed": [p.id for p in missed[:10]]})  # fmt: skip


def signal(draw: Draw) -> Finding:
    """Groups whose rewards are all equal give no policy-gradient signal."""
    rewards = torch.tensor([float(r.reward) for r in draw.rows])
    flat = zero_variance_groups(rewards, group_indices([r.prompt_id for r in draw.rows]))
    fraction = float(flat.float().mean()) if flat.numel() else 0.0
    verdict = graded(fraction, NO_SIGNAL_WARN, float("inf"))
    advice = ("most groups carry signal" if verdict == "ok" else
              f"{fraction:.0%} of groups have one reward for every response: raise train.group_size or pick problems "
              "the model solves sometimes")  # fmt: skip
    return Finding("reward_signal", "groups with reward signal", verdict, fraction, f"≤ {NO_SIGNAL_WARN:.0%} zero-variance groups",
                   advice, {"reward_mean": statistics.fmean(r.reward for r in draw.rows) if draw.rows else 0.0})


def reward_time(verifier: Verifier, draw: Draw) -> Finding:
    started = time.perf_counter()
    verify_batch(verifier, [r.response for r in draw.rows], [r.reference_answer for r in draw.rows])
    per = (time.perf_counter() - started) / max(len(draw.rows), 1)
    verdict = graded(per, REWARD_SECONDS_WARN, float("inf"))
    return Finding("reward_time", "verifier time per response", verdict, per, f"≤ {REWARD_SECONDS_WARN:g} s",
                   "fast enough" if verdict == "ok" else "the verifier is slow: rounds will wait on it", {})


def precision(policy: Policy, sampler_dtype: str | None) -> Finding:
    """bf16 where this machine emulates it is several times slower than float32; float32 where it
    runs bf16 natively leaves the sampler's speed lever unused."""
    device, width = policy.model.device, policy.model.config.hidden_size
    speedup, native = bf16_matmul_speedup(width, device), native_bf16(device)
    chosen = [name for name, dtype in (("model.dtype", str(policy.compute_dtype).removeprefix("torch.")),
                                       ("sampler.options.dtype", sampler_dtype)) if dtype == "bfloat16"]  # fmt: skip
    emulated = bool(chosen) and native is False
    if emulated:  # every chosen setting runs on the same device: the first one names the fix
        advice = emulated_bf16_advice(chosen[0], device) or ""
    elif chosen:
        runs = "runs natively here" if native else "is chosen; whether it is native here is not known"
        advice = f"bf16 {runs}: its matmul is {speedup:.1f}× float32's at width {width}"
    elif native and speedup >= BF16_PAYS and width >= BF16_WIDTH:
        advice = (f"float32; this machine runs bf16 natively ({speedup:.1f}× float32's matmul at width {width}): "
                  "sampler.options.dtype: bfloat16 with train.anchor: sampling_weights and token TIS is the speed "
                  "lever (docs/speed.md)")  # fmt: skip
    else:
        why = (f"below width {BF16_WIDTH} a whole bf16 step has not paid, whatever its matmul's {speedup:.1f}× here"
               if width < BF16_WIDTH else f"its matmul is {speedup:.1f}× float32's here")  # fmt: skip
        advice = f"float32: bf16 is not expected to pay ({why}; docs/speed.md)"
    return Finding("precision", "bf16 native or emulated on this machine", "warn" if emulated else "ok", speedup,
                   "bf16 only where it runs natively", advice,
                   {"native_bf16": native, "bf16_chosen": chosen, "width": width})  # fmt: skip
