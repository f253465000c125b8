"""`minpro doctor`: each check passes on the healthy quickstart setup and flags its own
deliberately broken setup, with the verdict the issue asks for; exit codes and reports."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch
from typer.testing import CliRunner

from minpro_cli import hardware
from minpro_cli.cli import app
from minpro_cli.config import load_recipe
from minpro_cli.doctor import PAGE_RESPONSES, diagnose, forward
from minpro_cli.doctor.findings import Finding, exit_code
from minpro_cli.logprobs import pack
from minpro_cli.samplers import Generation, policy_logprobs
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.sampling import Plugins, load_recipe_policy, sampling_job
from minpro_cli.verifiers import VerifierOptions, VerifyResult

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
KEYS = ["parity", "processed_logprobs", "invariance", "tokenizer_round_trip", "special_tokens",
        "truncated_responses", "truncated_sampling", "reference_reward", "reward_signal", "reward_time", "precision"]  # fmt: skip


class RawLogprobs(HFSampler):
    """Broken: draws at its temperature, records log-probs of the raw logits (T = 1)."""

    def generate(self, policy, prompts, seed, switches=()):
        generations = super().generate(policy, prompts, seed, switches)
        raw = policy_logprobs(policy, prompts, generations, temperature=1.0)
        return [Generation(g.token_ids, r.tolist(), g.finish_reason) for g, r in zip(generations, raw)]


class UntruncatedRecord(HFSampler):
    """Broken: draws with top-p, records the tempered but untruncated log-probs."""

    def generate(self, policy, prompts, seed, switches=()):
        generations = super().generate(policy, prompts, seed, switches)
        full = policy_logprobs(policy, prompts, generations, temperature=self.temperature)
        return [Generation(g.token_ids, r.tolist(), g.finish_reason) for g, r in zip(generations, full)]


class NeverRewards(VerifierOptions):
    """Broken: no response scores, the reference included."""

    bounded_in_process = True

    def __call__(self, response: str, reference: str) -> VerifyResult:
        return VerifyResult(0.0)


def attends_to_padding(prompts, responses, pad_id):
    """Broken trainer path: the attention mask covers the padding, so a row's log-probs depend on
    how much padding the batch gives it. (Positions that ignore the padding would not show: a
    uniform shift leaves RoPE's relative positions as they are.)"""
    batch = pack(prompts, responses, pad_id)
    return dataclasses.replace(batch, attention_mask=torch.ones_like(batch.attention_mask))


def drop_spaces(tokenizer) -> None:
    """Broken tokenizer: decode loses the spaces, so decode → encode does not give ids back."""
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kwargs: decode(ids, **kwargs).replace(" ", "")


def findings(*overrides: str, sampler: type[HFSampler] | None = None, verifier=None, tokenizer=None) -> dict[str, Finding]:
    recipe = load_recipe(QUICKSTART, ["run_dir=unused-by-doctor", *overrides])
    plugins = Plugins.of(recipe)
    if sampler is not None:
        plugins = dataclasses.replace(plugins, sampler=sampler(**plugins.sampler.model_dump()))
    if verifier is not None:
        plugins = dataclasses.replace(plugins, verifier=verifier)
    policy = load_recipe_policy(recipe)
    if tokenizer is not None:
        tokenizer(policy.tokenizer)
    diagnosis = diagnose(recipe, sampling_job(recipe, policy, plugins), plugins, n_prompts=2)
    assert [f.key for f in diagnosis.findings] == KEYS
    return {f.key: f for f in diagnosis.findings}


@pytest.fixture(scope="module")
def healthy() -> dict[str, Finding]:
    return findings()


def test_healthy_quickstart_passes_every_check(healthy):
    assert {k: f.verdict for k, f in healthy.items()} == dict.fromkeys(KEYS, "ok")
    assert healthy["parity"].value < 1e-3  # the same float32 weights: decode vs full forward rounding only
    assert healthy["processed_logprobs"].details["best_fit"].startswith("processed")
    assert healthy["truncated_sampling"].value == pytest.approx(1.0, abs=1e-3)


BROKEN = [  # (setup, what findings() gets, the check that must catch it, its verdict)
    ("sampler records raw (pre-temperature) log-probs", {"sampler": RawLogprobs}, "processed_logprobs", "fail"),
    ("sampler draws with top-p, records untruncated log-probs", {"sampler": UntruncatedRecord},
     "processed_logprobs", "fail"),
    ("trainer log-probs depend on the padding", {"padding": True}, "invariance", "fail"),
    ("bf16 sampler against a float32 trainer", {"overrides": ["sampler.options.dtype=bfloat16"]}, "parity", "warn"),
    ("tokenizer decode → encode does not round-trip", {"tokenizer": drop_spaces}, "tokenizer_round_trip", "fail"),
    ("verifier never rewards the reference", {"verifier": NeverRewards()}, "reference_reward", "fail"),
    ("top-p sampling with MinPRO (a prefix objective)", {"overrides": ["sampler.options.top_p=0.8"]},
     "truncated_sampling", "fail"),
    ("most responses cut at max_new_tokens", {"overrides": ["sampler.options.max_new_tokens=2"]},
     "truncated_responses", "warn"),
    ("bf16 sampler on a CPU that emulates bf16 (AVX2 only)", {"overrides": ["sampler.options.dtype=bfloat16"],
     "cpuinfo": "flags\t\t: fpu sse2 avx2 fma\n"}, "precision", "warn"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "broken", "key", "verdict"), BROKEN, ids=[case[0] for case in BROKEN])
def test_each_broken_setup_is_caught(setup, broken, key, verdict, healthy, monkeypatch, tmp_path):
    broken = dict(broken)  # pop from a copy: the table stays whole for a rerun in the same process
    if broken.pop("padding", False):
        monkeypatch.setattr(forward, "pack", attends_to_padding)
    if cpuinfo := broken.pop("cpuinfo", None):
        (tmp_path / "cpuinfo").write_text(cpuinfo)
        monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
    found = findings(*broken.pop("overrides", []), **broken)
    assert found[key].verdict == verdict, (setup, found[key])
    assert healthy[key].verdict == "ok"


def test_named_diagnoses():
    """The findings say what is wrong, with the number."""
    raw = findings(sampler=RawLogprobs)["processed_logprobs"]
    assert raw.details["best_fit"].startswith("raw logits")
    untruncated = findings(sampler=UntruncatedRecord)["processed_logprobs"]
    assert untruncated.details["best_fit"] == "tempered, untruncated"
    bf16 = findings("sampler.options.dtype=bfloat16")["parity"]
    assert 1e-3 < bf16.value < 5.0 and "sampling_weights" in bf16.advice
    decay = findings("sampler.options.top_p=0.8")["truncated_sampling"]
    means = [b["mean"] for b in decay.details["min_prefix_ratio_by_position"]]
    assert means[0] == 1.0 and means[-1] < means[0]  # ρ̲_t falls with position


@pytest.mark.parametrize(("verdicts", "strict", "code"), [
    (["ok", "ok"], False, 0), (["ok", "warn"], False, 1), (["ok", "warn"], True, 2), (["warn", "fail"], False, 2),
    ([], False, 0),
])  # fmt: skip
def test_exit_codes(verdicts, strict, code):
    assert exit_code([Finding(str(i), "", v, None, "", "") for i, v in enumerate(verdicts)], strict) == code


def test_cli_reports(tmp_path):
    """Exit code 0, JSON with the documented keys, one self-contained HTML page."""
    out, page = tmp_path / "doctor.json", tmp_path / "doctor.html"
    result = CliRunner().invoke(app, ["doctor", str(QUICKSTART), "--prompts", "2", "--json", str(out), "--html", str(page)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"schema", "verdict", "exit_code", "recipe", "policy", "seconds", "settings", "checks"}
    assert [c["key"] for c in report["checks"]] == KEYS
    assert all(set(c) == {"key", "title", "verdict", "value", "threshold", "advice", "details"} for c in report["checks"])
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text and "src=" not in text
    assert text.count('class="p"') == min(report["settings"]["responses"], PAGE_RESPONSES) and 'class="t"' in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # a real headless browser renders it offline (apt install chromium)
        shot = tmp_path / "doctor.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
        pixels = matplotlib.image.imread(shot)
        assert pixels.shape[:2] == (900, 1200) and pixels[..., :3].std() > 0.05  # drawn, not blank


def test_cli_warning_exit_code_and_strict(tmp_path):
    args = ["doctor", str(QUICKSTART), "sampler.options.max_new_tokens=2", "--prompts", "2"]
    assert CliRunner().invoke(app, args).exit_code == 1
    assert CliRunner().invoke(app, [*args, "--strict"]).exit_code == 2
