"""verl's rollout dumps with what minpro needs: token ids and the sampler's log-probs.

    python -m minpro_verl.dump verl.trainer.main_ppo trainer.rollout_data_dir=DIR \\
        actor_rollout_ref.rollout.calculate_log_probs=true …

runs verl's entry module (any of them whose trainer is a `RayPPOTrainer` in this process:
`main_ppo`, the one-step-off trainer) with its rollout dump extended: each line of
`DIR/<step>.jsonl` also holds `prompt_ids`, `response_ids` (padding removed) and
`rollout_log_probs` (log μ of each response token), which `minpro import verl-rollouts`
turns into minpro rollout files. verl's own dump is decoded text only.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

NEEDS = "rollout_log_probs"  # in the batch only with rollout.calculate_log_probs=true


def token_columns(batch: Any) -> dict[str, list[list[Any]]]:
    """Per response: its prompt's and its own token ids and its log μ, without padding."""
    prompts, responses = batch.batch["prompts"], batch.batch["responses"]
    attention = batch.batch["attention_mask"].bool()
    in_prompt, in_response = attention[:, : prompts.shape[1]], attention[:, prompts.shape[1] :]
    columns: dict[str, list[list[Any]]] = {"prompt_ids": [], "response_ids": [], NEEDS: []}
    for i in range(prompts.shape[0]):
        columns["prompt_ids"].append(prompts[i][in_prompt[i]].tolist())
        columns["response_ids"].append(responses[i][in_response[i]].tolist())
        columns[NEEDS].append(batch.batch[NEEDS][i][in_response[i]].float().tolist())
    return columns


def install() -> None:
    """Extend `RayPPOTrainer._log_rollout_data` (verl 0.9.1) with `token_columns`."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    original = RayPPOTrainer._log_rollout_data
    if getattr(original, "minpro", False):
        return

    def _log_rollout_data(self: Any, batch: Any, reward_extra_infos_dict: dict, timing_raw: dict, directory: str) -> Any:
        if NEEDS not in batch.batch.keys():  # noqa: SIM118 (a TensorDict: `in` it is not a key lookup)
            raise RuntimeError("minpro_verl.dump needs actor_rollout_ref.rollout.calculate_log_probs=true")
        extended = {**reward_extra_infos_dict, **token_columns(batch)}
        return original(self, batch, extended, timing_raw, directory)

    _log_rollout_data.minpro = True  # type: ignore[attr-defined]
    RayPPOTrainer._log_rollout_data = _log_rollout_data


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m minpro_verl.dump VERL_ENTRY_MODULE [hydra overrides …]")
    entry = sys.argv.pop(1)
    install()
    runpy.run_module(entry, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
