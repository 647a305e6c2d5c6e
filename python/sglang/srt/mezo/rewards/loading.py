"""``--reward SPEC`` to a callable, and the checks every reward output passes."""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Protocol, Sequence

from sglang.srt.mezo.usage_errors import ConfigError, UsageError


class RewardError(UsageError):
    """A reward function failed on a batch: it raised, or returned something that is not one
    finite number per completion. The message names the reward and what it returned."""


class RewardFunction(Protocol):
    def __call__(self, prompts: list, completions: list, examples: list) -> Sequence[float]:
        """One reward per completion; ``prompts[i]`` and ``examples[i]`` (the data record,
        every field) belong to ``completions[i]``."""


def load_reward(spec: str) -> RewardFunction:
    """The reward `spec` names: a built-in (``exact_match``, ``math``, ``reasoning_gym``,
    ``length=N``, ``regex=PATTERN``) or ``module:function`` (imported here, once)."""
    from sglang.srt.mezo.rewards.builtin import BUILTIN_REWARDS

    if ":" not in spec:
        name, _, argument = spec.partition("=")
        if name not in BUILTIN_REWARDS:
            raise ConfigError(
                f"--reward {spec!r}: not a built-in reward ({', '.join(sorted(BUILTIN_REWARDS))}) "
                "nor module:function"
            )
        try:
            return BUILTIN_REWARDS[name](argument)
        except ValueError as error:
            raise ConfigError(f"--reward {spec!r}: {error}") from error
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"--reward {spec!r}: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"--reward {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return function


def checked_rewards(spec: str, function: RewardFunction, prompts: list, completions: list, examples: list) -> list:
    """``function``'s rewards as floats, or a `RewardError` that says what went wrong."""
    try:
        values = function(prompts, completions, examples)
    except Exception as error:  # a user's function: whatever it raises is reported, with its type
        raise RewardError(f"--reward {spec} raised {type(error).__name__}: {error}") from error
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"--reward {spec} returned {type(values).__name__}, not a list of {len(completions)} numbers"
        ) from None
    if len(values) != len(completions):
        raise RewardError(f"--reward {spec} returned {len(values)} values for {len(completions)} completions")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"--reward {spec} returned {value!r} for completion {i}: not a number")
        if not math.isfinite(value):
            raise RewardError(f"--reward {spec} returned {value} for completion {i} ({completions[i]!r})")
    return [float(v) for v in values]
