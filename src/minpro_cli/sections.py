"""The recipe's sections as Pydantic models: model, data, sampler/verifier/objective plugin
references, rollout, optimizer, training, distributed, eval, sweep and logging. Unknown keys
and wrong types are errors; `config.Recipe` puts them together.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from minpro_cli.errors import ConfigError
from minpro_cli.objectives import AdvantageEstimator
from minpro_cli.objectives.kl import KLEstimator
from minpro_cli.schedule import Schedule
from minpro_cli.tasks import PresetName


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """Low-rank adapters (peft, `pip install 'minpro[lora]'`): only A and B train, W + (alpha/r)·B·A."""

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0.0, description="scale: the update is (alpha / r)·B·A")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the adapter's input while training; 0 keeps π_θ = μ on-policy, which the "
        "importance ratios assume",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the head"
    )


class ModelConfig(Section):
    path: str = Field(
        "embedded", description="local checkpoint directory, or a shipped model: 'embedded', 'embedded:chain'"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="compute precision (autocast); weights and AdamW states stay float32. float16: rollout and "
        "eval only (training it would need loss scaling)",
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint")
    lora: LoraConfig | None = Field(
        None,
        description="train low-rank adapters instead of every weight (minpro train); checkpoints hold merged weights "
        "and the adapter, and sampling uses the merged weights",
    )

    @field_validator("device")
    @classmethod
    def _device_is_a_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"'{value}' is not a device: use cpu, cuda, cuda:N or mps") from None
        return value

    def check_device(self) -> None:
        """Before a stage loads the model: a device this torch cannot use is a one-line error."""
        device, build = torch.device(self.device), f"this torch ({torch.__version__})"
        if device.type == "cuda" and not torch.cuda.is_available():
            problem = f"{build} sees no CUDA device; on a GPU machine install a CUDA build of torch (README: 'On a GPU')"
        elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            problem = f"only {torch.cuda.device_count()} CUDA device(s) are visible"
        elif device.type == "mps" and not torch.backends.mps.is_available():
            problem = f"{build} has no MPS backend"
        else:
            return
        raise ConfigError(f"model.device is '{self.device}' but {problem}, or use model.device=cpu")


class DataConfig(Section):
    train: str = Field(
        "embedded:arith-train",
        description="embedded:<name>, a .jsonl/.json/.parquet/.csv file, a directory of them, or a Hugging Face "
        "dataset id (org/name) already in the local datasets cache",
    )
    eval: str = "embedded:arith-test"
    train_split: str = Field("train", description="split of a hub dataset id in data.train")
    eval_split: str = Field("test", description="split of a hub dataset id in data.eval")
    subset: str | None = Field(None, description="configuration (subset) of a hub dataset id, e.g. gsm8k's 'main'")
    prompt_template: str = Field(
        "{question}\n", description="'{question}' is replaced by the problem (text prompts; chat prompts are as given)"
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="wrap a text prompt as a user message in the tokenizer's chat template (auto: if it has one); "
        "chat-message prompts always use it",
    )
    system_prompt: str | None = Field(None, description="system message, when the chat template is used")
    id_field: str = "id"
    question_field: str = "question"
    answer_field: str = "answer"
    preset: PresetName | None = Field(
        None, description="field names and answer form of a public benchmark export (math500, gsm8k, aime, …)"
    )


class PluginRef(Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class RolloutConfig(Section):
    num_prompts: int = Field(64, ge=1, description="problems taken from data.train")
    group_size: int = Field(8, ge=1, description="responses per problem")
    output: str = Field("rollouts.parquet", description="relative to run_dir unless absolute")


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw, or sgd: plain gradient steps, no per-coordinate normalisation"
    )
    lr: float = Field(1e-4, gt=0.0, lt=1e30, description="peak learning rate (below 1e30: torch keeps it in float32)")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="AdamW's moment decays, each in [0, 1)"
    )
    eps: float = Field(
        1e-8, gt=0.0, allow_inf_nan=False, description="AdamW's ε; raised, it damps the per-coordinate normalisation"
    )
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD's momentum (sgd only)")
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    grad_clip: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    schedule: Schedule = Field("constant", description="lr after warm-up: constant, linear or cosine decay")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from lr/warmup_steps to lr")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="linear/cosine decay ends at lr × min_lr_ratio")

    @model_validator(mode="after")
    def _momentum_is_sgd_s(self) -> OptimConfig:
        if self.momentum and self.name != "sgd":
            raise ValueError("optim.momentum is SGD's: set optim.name=sgd, or drop it (AdamW has betas)")
        return self

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over `params`; the learning rate is set per step by the schedule."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


Anchor = Literal["behavior", "sampling_weights", "round_start", "loglinear"]


class PartialRollout(Section):
    """Responses continued under newer weights mid-way (partial rollouts, docs/partial-rollouts.md):
    round r's responses start with the weights of round r − staleness, and at each token of
    `switch_at` move on to newer ones, reaching round r's own starting weights at the last switch."""

    switch_at: list[int] = Field(
        min_length=1,
        description="response tokens (0-based) where the weights change, increasing; at most train.staleness of them",
    )

    @field_validator("switch_at")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"switch_at must be increasing token positions of at least 1, not {value}")
        return value

    def sources(self, round_: int, staleness: int) -> list[tuple[int, int]]:
        """(first token, round whose starting weights draw from it) of each segment of round
        `round_`'s responses: from round r − s to round r in len(switch_at) equal steps (rounded up),
        never before round 0; a switch to the weights already in use is no switch."""
        steps = len(self.switch_at)
        rounds = [max(0, round_ - staleness + -(-i * staleness // steps)) for i in range(steps + 1)]
        segments = [(0, rounds[0])]
        for at, source in zip(self.switch_at, rounds[1:]):
            if source != segments[-1][1]:
                segments.append((at, source))
        return segments


class TrainConfig(Section):
    iterations: int = Field(20, ge=1, description="rounds of rollout → update")
    staleness: int = Field(
        0, ge=0, description="exact staleness: round r samples with the weights of round r − staleness (reproducible)"
    )
    max_staleness: int | None = Field(
        None,
        ge=0,
        description="bounded staleness, with sampler.options.placement=dedicated: rounds sample with the newest "
        "weights the sampler has, and a round whose rows are more than max_staleness optimizer steps old when its "
        "training starts is dropped, counted (rounds_dropped) and sampled again; null: exact (train.staleness)",
    )
    anchor: Anchor = Field(
        "behavior",
        description="π_old, the objective's ratio's denominator: behavior (μ as sampled), sampling_weights (the "
        "trainer under the weights that sampled the row), round_start (the trainer under the round's starting "
        "weights) or loglinear (A-3PO's interpolation, no forward); see docs/correction.md",
    )
    factor_metrics: bool = Field(
        False,
        description="log the mismatch, staleness and drift factors each on its own whatever the anchor (one or two "
        "extra no-grad forwards per round)",
    )
    prompts_per_iteration: int = Field(32, ge=1)
    group_size: int = Field(
        8, ge=2, description="responses per problem; at least 2: every advantage estimator compares a response "
        "with the others of its group, so one alone has advantage 0 and trains nothing",
    )
    epochs: int = Field(1, ge=1, description="passes over each round's rollouts")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass")
    rollouts: str | None = Field(None, description="train on stored rollouts instead of sampling")
    advantage: AdvantageEstimator | None = Field(
        None, description="grpo | dr_grpo | rloo; default: the objective's own (dr_grpo for dr_grpo, else grpo)"
    )
    drop_zero_variance_groups: bool = Field(
        False, description="leave out groups whose responses all got the same reward (they carry no signal)"
    )
    checkpoint_every: int = Field(5, ge=1, description="rounds between checkpoints")
    eval_every: int = Field(
        0, ge=0, description="rounds between held-out evaluations (eval section, data.eval) into evals.jsonl; 0: none"
    )
    keep_checkpoints: int = Field(2, ge=1)
    kl_coef: float = Field(
        0.0,
        ge=0.0,
        description="weight of a KL penalty to the frozen starting model (model.path), aggregated like the "
        "objective's loss; 0: off (as in the paper), no reference model is loaded",
    )
    kl_estimator: KLEstimator = Field("k3", description="k1 (log π − log π_ref), k2 (½ squared) or k3 (low variance)")
    entropy_coef: float = Field(
        0.0, description="weight of an entropy bonus: the loss minus entropy_coef × the responses' entropy, "
        "aggregated like the objective's loss"
    )
    micro_batch_tokens: int | None = Field(
        16384,
        ge=1,
        description="tokens (rows × longest prompt + response, padding included) per forward/backward, rows "
        "sorted by length; each optimizer step accumulates micro-batches within it, and the update does not "
        "depend on it. null: one forward/backward per minibatch, rows in their order",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward: far less memory, one more forward pass"
    )
    pipeline: bool = Field(
        False,
        description="with staleness >= 1: sample round r+1 (with the stale weights it uses anyway) in a background "
        "thread while round r trains; the same results as without. Single process only",
    )
    partial_rollout: PartialRollout | None = Field(
        None,
        description="continue responses under newer weights mid-way (a response written by several policies, each "
        "token stamped with its version): {switch_at: [k, ...]}, with train.staleness >= the number of switches; "
        "null: every response is drawn by one policy",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer for training (dynamic shapes): fused kernels, faster training "
        "and less activation memory after a one-off compile of ~20-60 s at the first step; sampling stays eager. "
        "Needs a C++ compiler on CPU",
    )

    @model_validator(mode="after")
    def _one_staleness(self) -> TrainConfig:
        if self.max_staleness is not None and (self.staleness or self.pipeline or self.rollouts):
            raise ValueError(
                "train.max_staleness (bounded: the newest weights, too-old rounds dropped) and train.staleness (exact) "
                "are two semantics of one knob, and it needs online sampling by a dedicated sampler: set one of them, "
                "drop train.pipeline and train.rollouts"
            )
        return self

    @model_validator(mode="after")
    def _switches_need_newer_weights(self) -> TrainConfig:
        if self.partial_rollout is not None and (len(self.partial_rollout.switch_at) > self.staleness or self.rollouts):
            raise ValueError(
                f"train.partial_rollout switches {len(self.partial_rollout.switch_at)} time(s) to newer weights while "
                f"a response is drawn, and round r samples from round r − train.staleness ({self.staleness}): set "
                "train.staleness to at least the number of switches (and sample online: no train.rollouts)"
            )
        return self

    @model_validator(mode="after")
    def _pipeline_needs_staleness(self) -> TrainConfig:
        if self.pipeline and (self.staleness < 1 or self.rollouts):
            raise ValueError(
                "train.pipeline overlaps sampling round r+1 with training round r, so it needs train.staleness >= 1 "
                "(round r+1 samples with weights older than round r's update) and online sampling (no train.rollouts)"
            )
        return self

class DistributedConfig(Section):
    """How `minpro train` runs under torchrun (`--nproc N`); ignored in a single process."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: whole weights on every rank; fsdp: FSDP2, weights, gradients and optimizer sharded"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with CUDA, else gloo")
    timeout_s: float = Field(600.0, gt=0.0, description="how long a collective waits for a silent rank")


class BenchmarkConfig(Section):
    """One benchmark of a multi-benchmark eval; unset fields fall back to `data` / `eval` / `verifier`."""

    data: str = Field(description="embedded:<name> or a .jsonl/.json/.parquet/.csv file")
    preset: PresetName | None = None
    question_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    verifier: PluginRef | None = None
    n_samples: int | None = Field(None, ge=1)
    max_problems: int | None = Field(None, ge=1)


class EvalConfig(Section):
    policy: str | None = Field(None, description="checkpoint to evaluate; default model.path")
    n_samples: int = Field(4, ge=1, description="samples per problem")
    k: list[int] = Field(default_factory=lambda: [1], description="pass@k and maj@k values to report")
    max_problems: int | None = Field(None, ge=1)
    benchmarks: dict[str, BenchmarkConfig] = Field(
        default_factory=dict, description="several named benchmarks; empty: data.eval alone"
    )

    @model_validator(mode="after")
    def _benchmark_names_are_file_names(self) -> EvalConfig:
        bad = [name for name in self.benchmarks if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)]
        if bad:
            raise ValueError(f"benchmark names become file names: use letters, digits, '_', '.', '-' ({bad})")
        return self

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalConfig:
        for where, n in [("eval", self.n_samples), *((f"benchmark {b}", c.n_samples) for b, c in self.benchmarks.items())]:
            bad = [k for k in self.k if n is not None and not 1 <= k <= n]
            if bad:
                raise ValueError(f"{where}: every k must be in [1, n_samples={n}], got {bad}")
        return self


class QuickSweepConfig(Section):
    """What `minpro sweep --quick` changes: a smoke-sized version of the same study."""

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="replaces these keys' values in sweep.grid")
    seeds: int | None = Field(None, ge=1)
    overrides: list[str] = Field(default_factory=list, description="dotted KEY=VALUE applied to every run")


class SweepConfig(Section):
    """`minpro sweep`: one training run per combination of grid values and seed."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted recipe key → values, e.g. train.staleness: [0, 4, 8]"
    )
    seeds: int = Field(1, ge=1, description="runs per grid point; run i uses the recipe's seed + i")
    jobs: int = Field(1, ge=1, description="runs at a time, each in its own process with cores / jobs threads")
    quick: QuickSweepConfig = Field(default_factory=QuickSweepConfig)

    @model_validator(mode="after")
    def _grid_values_are_lists(self) -> SweepConfig:
        empty = [key for key, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"sweep.grid keys with no values: {empty}")
        return self


TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]


class LoggingConfig(Section):
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="trackers besides metrics.jsonl (optional extras): tensorboard (RUN_DIR/tensorboard), wandb, "
        "trackio (its local database), mlflow",
    )
    project: str = Field("minpro", description="wandb and trackio project, MLflow experiment")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store; default $MLFLOW_TRACKING_URI, else sqlite RUN_DIR/mlflow.db"
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: RUN_DIR/wandb, uploaded later with `wandb sync`; online: live"
    )
