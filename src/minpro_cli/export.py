"""`minpro export verl RECIPE` and `minpro export verl-data RECIPE`: the hand-over to verl.

Beyond one node (tensor-parallel samplers, clusters, agentic rollouts) verl runs the job and
minpro's objectives run inside it (`plugins/minpro-verl`). `verl_command` maps a recipe onto
verl 0.9.1's config: one `(verl key, value, minpro key)` per line of the command, and what does
not carry over said in words; `write_verl_data` writes the recipe's tasks as verl's RL parquet
(chat messages, `reward_model.ground_truth`, and the minpro verifier that scores them, which
`minpro_verl.reward.compute_score` calls inside verl).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from minpro_cli.config import Recipe
from minpro_cli.errors import ConfigError
from minpro_cli.fileio import atomic_path
from minpro_cli.rundir import check_replaceable
from minpro_cli.sampling import load_split
from minpro_cli.tasks import Problem, render_prompt

VERL = "0.9.1"  # the verl whose config the mapping is tested against (scripts/setup_verl_env.sh)
ENTRY = {
    "sync": "verl.trainer.main_ppo",
    "one_step_off": "verl.experimental.one_step_off_policy.main_ppo",
    "fully_async": "verl.experimental.fully_async_policy.fully_async_main",
}
LOSS_MODE = {"minpro": "minpro", "prefix": "prefix", "grpo": "vanilla", "dapo": "vanilla", "dr_grpo": "vanilla",
             "cispo": "cispo", "gspo": "gspo"}  # fmt: skip
KL_TYPE = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
ROLLOUT_IS = {"token": "token", "sequence": "sequence"}
A = "actor_rollout_ref.actor."
R = "actor_rollout_ref.rollout."


@dataclass
class VerlExport:
    mode: str  # sync | one_step_off | fully_async
    lines: list[tuple[str, Any, str]] = field(default_factory=list)  # (verl key, value, from which minpro key)
    notes: list[str] = field(default_factory=list)  # what does not carry over, and why

    def set(self, key: str, value: Any, source: str) -> None:
        self.lines.append((key, value, source))

    def overrides(self) -> list[str]:
        return [f"{key}={render(value)}" for key, value, _ in self.lines]

    def text(self) -> str:
        """The command, then the mapping and the notes as shell comments."""
        command = " \\\n    ".join([f"python3 -m {ENTRY[self.mode]}", *self.overrides()])
        width = max(len(o) for o in self.overrides())
        mapping = [f"#   {o:{width}s}  <- {source}" for o, (_, _, source) in zip(self.overrides(), self.lines)]
        notes = [f"# - {note}" for note in self.notes]
        return "\n".join([command, "", f"# mapping (verl {VERL}):", *mapping, "# not carried over:", *notes]) + "\n"


def render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def staleness_mode(recipe: Recipe) -> str:
    t = recipe.train
    if t.max_staleness is not None or t.staleness >= 2:
        return "fully_async"
    return "one_step_off" if t.staleness == 1 else "sync"


def verl_command(recipe: Recipe, data_dir: str = "$DATA", gpus: int = 8) -> VerlExport:
    """The verl command that runs `recipe`'s training; `data_dir` holds `minpro export verl-data`'s files."""
    t, o, obj, sampler = recipe.train, recipe.optim, recipe.objective, recipe.sampler.options
    if t.rollouts:
        raise ConfigError("train.rollouts trains on stored rollouts, which verl does not do: export an online recipe")
    if obj.name not in LOSS_MODE:
        raise ConfigError(f"objective '{obj.name}' has no verl policy loss; exportable: {', '.join(sorted(LOSS_MODE))}")
    if t.prompts_per_iteration % t.minibatches:
        raise ConfigError(f"train.prompts_per_iteration={t.prompts_per_iteration} must be a multiple of "
                          f"train.minibatches={t.minibatches}: verl counts its mini-batch in prompts")  # fmt: skip
    out = VerlExport(staleness_mode(recipe))
    model = recipe.model.path
    out.set("data.train_files", f"{data_dir}/train.parquet", "data.train (minpro export verl-data)")
    out.set("data.val_files", f"{data_dir}/val.parquet", "data.eval (minpro export verl-data)")
    out.set("data.prompt_key", "prompt", "data.prompt_template (applied by export verl-data)")
    out.set("data.max_response_length", sampler.get("max_new_tokens", 64), "sampler.options.max_new_tokens")
    out.set("data.train_batch_size", t.prompts_per_iteration, "train.prompts_per_iteration")
    out.set("data.seed", recipe.seed, "seed")
    out.set("actor_rollout_ref.model.path", model if Path(model).is_dir() else "$MODEL", "model.path")
    if not Path(model).is_dir():
        out.notes.append(f"model.path '{model}' is not a directory: put an HF checkpoint directory in $MODEL")
    advantage = t.advantage or ("dr_grpo" if obj.name == "dr_grpo" else "grpo")
    out.set("algorithm.adv_estimator", "rloo" if advantage == "rloo" else "grpo", "train.advantage")
    out.set("algorithm.norm_adv_by_std_in_grpo", advantage == "grpo", "train.advantage (dr_grpo: not divided by std)")
    out.set("algorithm.use_kl_in_reward", False, "(minpro's KL is a loss term)")
    out.set(A + "policy_loss.loss_mode", LOSS_MODE[obj.name], "objective.name")
    objective = recipe.plugin("objectives")  # its options with their defaults
    out.set(A + "loss_agg_mode", objective.loss_agg, "objective.options.loss_agg")
    for side in ("low", "high"):
        out.set(A + f"clip_ratio_{side}", getattr(objective, f"eps_{side}"), f"objective.options.eps_{side}")
    out.set(A + "ppo_mini_batch_size", t.prompts_per_iteration // t.minibatches, "train.prompts_per_iteration / minibatches")
    out.set(A + "ppo_epochs", t.epochs, "train.epochs")
    out.set(A + "optim.lr", o.lr, "optim.lr")
    out.set(A + "optim.weight_decay", o.weight_decay, "optim.weight_decay")
    out.set(A + "optim.betas", list(o.betas), "optim.betas")
    out.set(A + "optim.lr_warmup_steps", o.warmup_steps, "optim.warmup_steps")
    out.set(A + "optim.lr_scheduler_type", "cosine" if o.schedule == "cosine" else "constant", "optim.schedule")
    out.set(A + "optim.min_lr_ratio", o.min_lr_ratio, "optim.min_lr_ratio")
    out.set(A + "grad_clip", o.grad_clip, "optim.grad_clip")
    out.set(A + "entropy_coeff", t.entropy_coef, "train.entropy_coef")
    out.set(A + "use_kl_loss", t.kl_coef > 0, "train.kl_coef > 0")
    if t.kl_coef > 0:
        out.set(A + "kl_loss_coef", t.kl_coef, "train.kl_coef")
        out.set(A + "kl_loss_type", KL_TYPE[t.kl_estimator], "train.kl_estimator")
    if recipe.model.lora:
        lora = recipe.model.lora
        out.set("actor_rollout_ref.model.lora_rank", lora.r, "model.lora.r")
        out.set("actor_rollout_ref.model.lora_alpha", lora.alpha, "model.lora.alpha")
        out.set("actor_rollout_ref.model.target_modules", lora.target_modules, "model.lora.target_modules")
    out.set(R + "name", "vllm", "sampler (verl's engine)")
    out.set(R + "n", t.group_size, "train.group_size")
    out.set(R + "temperature", sampler.get("temperature", 1.0), "sampler.options.temperature")
    out.set(R + "top_p", sampler.get("top_p", 1.0), "sampler.options.top_p")
    out.set(R + "top_k", sampler.get("top_k", 0) or -1, "sampler.options.top_k (0: off, verl's -1)")
    out.set(R + "calculate_log_probs", True, "(the behaviour log-probs every minpro row records)")
    out.set("reward.custom_reward_function.path", "$MINPRO_VERL_REWARD", f"verifier ({recipe.verifier.name})")
    out.set("reward.custom_reward_function.name", "compute_score", "verifier")
    correction(recipe, out)
    schedule(recipe, out, gpus)
    out.notes += [
        ("$MINPRO_VERL_REWARD is minpro_verl/reward.py in verl's environment, where minpro and plugins/minpro-verl "
         "are installed (docs/verl.md): python -c 'import minpro_verl.reward as r; print(r.__file__)'"),
        "data.max_prompt_length stays verl's 512 tokens: raise it for longer prompts",
        f"model.dtype={recipe.model.dtype}: verl trains in its own mixed precision (bf16 compute, fp32 masters)",
    ]
    if o.name != "adamw" or o.schedule == "linear":
        out.notes.append(f"optim.name={o.name}, optim.schedule={o.schedule}: verl's actor uses AdamW with a constant "
                         "or cosine schedule; the command has AdamW and a constant schedule")  # fmt: skip
    if t.drop_zero_variance_groups:
        out.notes.append("train.drop_zero_variance_groups: verl's algorithm.filter_groups resamples such groups "
                         "instead of dropping them (DAPO's dynamic sampling); not set")  # fmt: skip
    return out


def correction(recipe: Recipe, out: VerlExport) -> None:
    """minpro's anchor and correction onto verl's rollout_correction (decoupled mode)."""
    c, anchor = recipe.correction, recipe.train.anchor
    out.set("algorithm.rollout_correction.bypass_mode", False, "train.anchor (never bypass: it replaces the loss)")
    if anchor != "round_start":  # verl's π_old = μ (bypass_mode) would replace minpro's loss with its own
        out.notes.append(f"train.anchor={anchor}: verl recomputes π_old under the weights the batch starts from "
                         "(minpro's round_start)")  # fmt: skip
    if c.level in ROLLOUT_IS and not c.metrics_only:
        out.set("algorithm.rollout_correction.rollout_is", ROLLOUT_IS[c.level], "correction.level")
        out.set("algorithm.rollout_correction.rollout_is_threshold", c.high, "correction.high")
        if c.action == "mask" or c.low is not None:
            out.notes.append("correction.action=mask / correction.low: verl's TIS truncates above only")
    elif c.enabled:
        out.notes.append(f"correction (level {c.level}, rules {len(c.reject)}): minpro's prefix-aware and rejection "
                         "forms have no verl key; verl gets no rollout correction")  # fmt: skip


def schedule(recipe: Recipe, out: VerlExport, gpus: int) -> None:
    """Staleness: verl's one-step-off trainer for s = 1, the fully async one for more."""
    t = recipe.train
    out.set("trainer.total_training_steps", t.iterations, "train.iterations")
    out.set("trainer.total_epochs", 1000, "(train.iterations bounds the run)")
    out.set("trainer.test_freq", t.eval_every or -1, "train.eval_every")
    out.set("trainer.save_freq", t.checkpoint_every, "train.checkpoint_every")
    out.set("trainer.project_name", "minpro", "(a name)")
    out.set("trainer.experiment_name", Path(recipe.run_dir).name, "run_dir")
    if out.mode == "sync":
        out.set("trainer.n_gpus_per_node", gpus, "--gpus")
        return
    half = max(1, gpus // 2)
    out.set("trainer.n_gpus_per_node", gpus - half, "--gpus (the trainer's half)")
    out.set("rollout.n_gpus_per_node", half, "--gpus (the sampler's half)")
    if out.mode == "one_step_off":
        return
    steps = t.epochs * t.minibatches
    out.set("async_training.trigger_parameter_sync_step", steps, "train.epochs × minibatches (weights each round)")
    ahead = max(t.staleness, 1) if t.max_staleness is None else max(1, t.max_staleness // steps)
    out.set("async_training.staleness_threshold", ahead - 1, "train.staleness (rounds ahead − 1)")
    out.set("async_training.partial_rollout", False, "(minpro samples each response with one weights version)")
    out.set("rollout.total_rollout_steps", t.iterations * t.prompts_per_iteration, "train.iterations × prompts")
    out.notes.append("verl bounds how many samples its rollouter makes per weights version, not each row's age: "
                     + ("exact staleness" if t.max_staleness is None else "train.max_staleness")
                     + " is approximated by staleness_threshold")  # fmt: skip


def verl_rows(recipe: Recipe, split: str, problems: list[Problem]) -> list[dict[str, Any]]:
    d, verifier = recipe.data, recipe.verifier
    rows = []
    for index, problem in enumerate(problems):
        messages = problem.messages or [{"role": "user", "content": render_prompt(d.prompt_template, problem)}]
        if d.system_prompt and all(m["role"] != "system" for m in messages):
            messages = [{"role": "system", "content": d.system_prompt}, *messages]
        rows.append({
            "data_source": f"minpro/{verifier.name}",
            "prompt": messages,
            "ability": "minpro",
            "reward_model": {"style": "rule", "ground_truth": problem.answer},
            "extra_info": {"split": split, "index": index, "id": problem.id, "verifier": verifier.name,
                           "verifier_options": json.dumps(verifier.options)},
        })  # fmt: skip
    return rows


def write_verl_data(recipe: Recipe, out: Path) -> list[Path]:
    """`train.parquet` (data.train) and `val.parquet` (data.eval) in verl's RL layout; a file
    there that minpro did not write is refused before anything is written."""
    splits = {split: out / f"{name}.parquet" for split, name in (("train", "train"), ("eval", "val"))
              if getattr(recipe.data, split) is not None}  # fmt: skip
    for path in splits.values():
        check_replaceable(path, "export verl-data")
    for split, path in splits.items():
        table = pa.Table.from_pylist(verl_rows(recipe, split, load_split(recipe, split)))
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # minpro's mark, so that a rerun may replace it
            pq.write_table(table.replace_schema_metadata({b"minpro.export": b"verl-data"}), tmp)
    return list(splits.values())
