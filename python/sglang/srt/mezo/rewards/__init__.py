"""Rewards of generated text: the ``reward`` objective's scoring side.

A reward function is a callable ``(prompts, completions, examples) -> list[float]``: one
value per completion, higher is better (`RewardFunction`). ``--reward`` names one: a
built-in (`builtin.BUILTIN_REWARDS`) or ``module:function``, imported once
(`loading.load_reward`). Every call's output is checked (`loading.checked_rewards`): a
reward that raises, returns a non-number, NaN or the wrong count stops the run with a
one-line `RewardError`.
"""

from sglang.srt.mezo.rewards.loading import RewardError, RewardFunction, checked_rewards, load_reward

__all__ = ["RewardError", "RewardFunction", "checked_rewards", "load_reward"]
