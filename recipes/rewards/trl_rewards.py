"""Reward functions exactly as TRL's GRPOTrainer takes them (`reward_funcs`): lists in, one float
(or None) per completion out, every dataset column as a keyword. recipes/from-trl.yaml uses them."""

import re

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def accuracy_reward(prompts, completions, solution, **kwargs):
    """1 when the last \\boxed{} answer equals the `solution` column."""
    rewards = []
    for completion, answer in zip(completions, solution):
        found = BOXED.findall(completion)
        rewards.append(1.0 if found and found[-1].strip() == answer.strip() else 0.0)
    return rewards


def format_reward(prompts, completions, **kwargs):
    """1 when the completion holds exactly one \\boxed{} answer."""
    return [1.0 if len(BOXED.findall(completion)) == 1 else 0.0 for completion in completions]
