"""`python` verifier: reward functions written the way TRL and verl users write them.

    verifier:
      name: python
      options:
        rewards:
          - {path: rewards.py, function: accuracy_reward, weight: 1.0}   # a file and a function
          - {function: my_pkg.rewards.format_reward, weight: 0.2}         # or a dotted path

(`path` and `function` directly under `options` are the one-function short form.) The reward
is Σ weight_i · r_i; each r_i is kept in the row's `verifier_details["rewards"]` and logged
as `reward/<function>`. Two calling conventions, told apart by the function's parameters:

* TRL (`reward_funcs`): `f(prompts, completions, completion_ids=…, **columns) -> list[float]`,
  called with one-item lists; every other column of the row arrives as a keyword; a
  conversational prompt comes as its messages and the completion as
  `[{"role": "assistant", "content": …}]`. `None` means "does not apply": it adds 0.
* verl (`custom_reward_function`): `compute_score(data_source, solution_str, ground_truth,
  extra_info=None, **kwargs) -> float | {"score": float, ...}`, with the row's `data_source`
  and `extra_info` columns (route on `data_source` inside the function, as verl's default
  scorer does); `kwargs` are the options' `kwargs`.

The code runs in the worker processes every unbounded verifier runs in, each call with a
deadline (`timeout_s`). A function that raises, or returns NaN or a non-number, is an error
naming the function and the row; rewards may lie outside [0, 1].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from minpro_cli.verifiers import VerifierOptions, VerifyResult

Style = Literal["auto", "trl", "verl"]
VERL_PARAMETERS = {"data_source", "solution_str", "ground_truth"}


class RewardFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    function: str = Field(description="a function name in `path`, or a dotted path module.function")
    path: str | None = Field(None, description="a .py file (relative to the working directory)")
    weight: float = Field(1.0, allow_inf_nan=False)
    style: Style = Field("auto", description="trl | verl | auto: by the function's parameters")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of every call")

    @property
    def name(self) -> str:
        return self.function.rsplit(".", 1)[-1]

    @model_validator(mode="after")
    def _loads(self) -> RewardFunction:
        """Fail at the recipe, naming the file and function, not at the first batch."""
        if self.path is not None:
            object.__setattr__(self, "path", str(Path(self.path).expanduser().resolve()))
        try:
            load_function(self.path, self.function)
        except Exception as exc:  # noqa: BLE001 — any error of the user's module, reported in one line
            where = f"{self.path}:{self.function}" if self.path else self.function
            raise ValueError(f"cannot load reward function {where}: {type(exc).__name__}: {exc}".splitlines()[0])
        return self

    def resolved_style(self) -> Literal["trl", "verl"]:
        if self.style != "auto":
            return self.style
        parameters = set(inspect.signature(load_function(self.path, self.function)).parameters)
        return "verl" if parameters & VERL_PARAMETERS else "trl"


@cache
def load_function(path: str | None, function: str) -> Callable[..., Any]:
    """The function (once per process: worker processes load it on their first call)."""
    if path is None:
        module_name, _, attribute = function.rpartition(".")
        if not module_name:
            raise ValueError("give `path` (a .py file) or a dotted path module.function")
        module = importlib.import_module(module_name)
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"no file {file}")
        name = f"minpro_reward_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"{file} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        attribute = function
    found = getattr(module, attribute, None)
    if not callable(found):
        raise TypeError(f"no function '{attribute}' in {getattr(module, '__file__', module.__name__)}")
    return found


class PythonRewards(VerifierOptions):
    """Reward functions in Python, TRL's or verl's convention, weighted and summed."""

    path: str | None = Field(None, description="short form: the file of one function")
    function: str | None = Field(None, description="short form: one function (name in `path`, or module.function)")
    rewards: list[RewardFunction] = Field(default_factory=list, description="functions, each with a weight")

    @model_validator(mode="after")
    def _one_form(self) -> PythonRewards:
        if self.function is not None:
            if self.rewards:
                raise ValueError("give either function (and path) or rewards, not both")
            object.__setattr__(self, "rewards", [RewardFunction(path=self.path, function=self.function)])
            object.__setattr__(self, "path", None)
            object.__setattr__(self, "function", None)
        elif self.path is not None:
            raise ValueError("path needs function: the name of the reward function in that file")
        if not self.rewards:
            raise ValueError("name a reward function: options.function (and path), or options.rewards")
        names = [r.name for r in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"two reward functions share a name ({', '.join(names)}): their logs would mix")
        return self

    def __call__(self, response: str, reference: str) -> VerifyResult:
        return self.score(response, reference, {})

    def score(self, response: str, reference: str, context: Mapping[str, Any]) -> VerifyResult:
        parts: dict[str, float | None] = {}
        for reward in self.rewards:
            try:
                parts[reward.name] = call_reward(reward, response, reference, context)
            except Exception as exc:  # noqa: BLE001 — the user's code: reported with the function's name
                where = f"{Path(reward.path).name}:{reward.function}" if reward.path else reward.function
                raise RewardFunctionError(f"reward function {where} {describe(exc)}") from None
        total = sum(r.weight * v for r in self.rewards if (v := parts[r.name]) is not None)
        return VerifyResult(float(total), {"extracted": None, "rewards": parts})


def call_reward(reward: RewardFunction, response: str, reference: str, context: Mapping[str, Any]) -> float | None:
    function = load_function(reward.path, reward.function)
    columns = dict(context.get("columns") or {})
    if reward.resolved_style() == "verl":
        value = function(
            data_source=columns.get("data_source"), solution_str=response, ground_truth=reference,
            extra_info=columns.get("extra_info"), **reward.kwargs,
        )  # fmt: skip
        value = value.get("score") if isinstance(value, Mapping) else value
    else:
        prompt = context.get("messages") or context.get("prompt", "")
        completion: Any = [{"role": "assistant", "content": response}] if context.get("messages") else response
        keywords = {k: [v] for k, v in columns.items() if k not in ("prompts", "completions", "completion_ids")}
        keywords.setdefault("solution", [reference])  # TRL's accuracy_reward reads `solution`
        values = function(prompts=[prompt], completions=[completion],
                          completion_ids=[list(context.get("completion_ids") or [])], **keywords, **reward.kwargs)
        if not isinstance(values, list | tuple) or len(values) != 1:
            raise RewardFunctionError(
                f"returned {type(values).__name__} {str(values)[:60]}, not a list of one reward per completion"
            )
        value = values[0]
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardFunctionError(f"returned {value!r}, not a finite number")
    return float(value)


class RewardFunctionError(Exception):
    pass


def describe(exc: Exception) -> str:
    """'returned nan, …' for our own checks; 'raised ZeroDivisionError: …' for the function's."""
    return str(exc) if isinstance(exc, RewardFunctionError) else f"raised {type(exc).__name__}: {exc}"
