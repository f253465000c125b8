"""`minpro plugins new`: a plugin package skeleton that `pip install -e` accepts as written.

The stub raises NotImplementedError and its generated test says so; `minpro plugins check`
fails on it until the stub is written. Nothing here pretends to work.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from minpro_cli.errors import ConfigError
from minpro_cli.fileio import write_text_atomic
from minpro_cli.registry import KINDS as ENTRY_POINT_KINDS

KINDS = {group[:-1]: group for group in ENTRY_POINT_KINDS}  # "objective" → "objectives", …

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A minpro $kind plugin: $name"
requires-python = ">=3.10"
dependencies = ["minpro"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."minpro.$group"]
$name = "$module:$cls"

[tool.setuptools.packages.find]
where = ["src"]
''')

README = Template('''\
# $dist

A minpro $kind plugin registered as `$name` in the `minpro.$group` entry-point group.

    pip install -e .            # then: minpro plugins           (lists it)
    minpro plugins check $name  # the conformance checks (fail until the stub is written)
    pytest tests                # this package's own tests

Use it from a recipe with `$kind: {name: $name, options: {...}}`.
''')

MODULES = {
    "objective": Template('''\
"""$cls: a minpro objective plugin."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput


class $cls(Objective):
    """One line that says what this objective does (shown by `minpro plugins`).

        L = − Σ_{i,t} w_t · Â_{i,t} · log π_θ(o_t | …) / Σ_i |o_i|      (write your formula here)

    Fields are the options, validated by Pydantic; `loss_agg` comes from Objective.
    """

    scale: float = Field(1.0, gt=0.0, description="an example option: replace it with yours")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        # inputs.logprobs (B, T) with grad, inputs.anchor_logprobs (B, T) (the ratio's π_old),
        # inputs.token_advantages() (B, T), inputs.response_mask (B, T) bool. Build a (B, T)
        # per-token loss, then normalise it by the minibatch's counts (never by your own mean):
        #     return ObjectiveOutput(self.aggregate(per_token, inputs.response_mask, inputs.counts), {"my_metric": 0.0})
        raise NotImplementedError("$name: write the objective (see docs/plugins.md in minpro)")
'''),
    "verifier": Template('''\
"""$cls: a minpro verifier plugin."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.verifiers import VerifyResult


class $cls(BaseModel):
    """One line that says what this verifier rewards (shown by `minpro plugins`).

    Fields are the options. Never raise on model output: score 0 with a reason instead.
    """

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(5.0, gt=0.0, description="bound on one call")

    def __call__(self, response: str, reference: str) -> VerifyResult:
        # return VerifyResult(reward, {"extracted": ..., "failure": ...}) with reward in [0, 1]
        raise NotImplementedError("$name: write the verifier (see docs/plugins.md in minpro)")
'''),
    "sampler": Template('''\
"""$cls: a minpro sampler plugin."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.modeling import Policy
from minpro_cli.samplers import Generation


class $cls(BaseModel):
    """One line that says where the samples come from (shown by `minpro plugins`).

    Fields are the options; temperature / top_p / top_k are recorded with every rollout row.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]:
        # one Generation(token_ids, logprobs, finish_reason) per prompt; logprobs[t] = log μ of token t
        # under the distribution that drew it (temperature and truncation applied)
        raise NotImplementedError("$name: write the sampler (see docs/plugins.md in minpro)")
'''),
}

TEST = Template('''\
"""Tests of the $name $kind. The first two hold for the stub as generated: the options are
validated, and the unwritten stub says so. Replace the last one with real checks once it works."""

import pytest
from pydantic import ValidationError

from minpro_cli.registry import load_plugin
from $module import $cls


def test_registered_under_its_entry_point():
    assert isinstance(load_plugin("$group", "$name"), $cls)


def test_unknown_options_are_rejected():
    with pytest.raises(ValidationError):
        $cls(not_an_option=1)


def test_stub_is_not_written_yet():
    plugin = $cls()
    with pytest.raises(NotImplementedError):
        $call
''')

CALLS = {
    "objective": "import torch\n        from minpro_cli.objectives import ObjectiveInputs\n\n        x = torch.zeros(1, 2)\n"
                 "        plugin(ObjectiveInputs(x, x, torch.ones(1), torch.ones(1, 2, dtype=torch.bool)))",
    "verifier": 'plugin("\\\\boxed{1}", "1")',
    "sampler": "plugin.generate(None, [[1, 2]], seed=0)  # type: ignore[arg-type]",
}


def new_plugin(kind: str, name: str, directory: Path) -> Path:
    """Write `minpro-<name>/` under `directory`; refuse to overwrite anything."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ConfigError(f"plugin name {name!r} must be a lowercase Python identifier, e.g. my_{kind}")
    dist = f"minpro-{name.replace('_', '-')}"
    root = directory / dist
    if root.exists():
        raise ConfigError(f"{root} already exists; pick another name or --dir")
    fields = {
        "dist": dist, "kind": kind, "name": name, "group": KINDS[kind], "module": f"minpro_{name}",
        "cls": "".join(part.capitalize() for part in name.split("_")), "call": CALLS[kind],
    }
    files = {
        root / "pyproject.toml": PYPROJECT.substitute(fields),
        root / "README.md": README.substitute(fields),
        root / "src" / fields["module"] / "__init__.py": MODULES[kind].substitute(fields),
        root / "tests" / f"test_{name}.py": TEST.substitute(fields),
    }
    for path, text in files.items():
        write_text_atomic(path, text)
    return root
