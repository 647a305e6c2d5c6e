"""Reward functions the reward tests name on the command line (``mezo_test_rewards:...``).

`scripted` behaves as `FAULT` says on its `FAULT["at_call"]`-th call (1-based): raise, return
NaN, or return the wrong number of values; otherwise it rewards short completions.
"""

FAULT = {"at_call": None, "kind": None}
CALLS = {"n": 0}


def short(prompts, completions, examples):
    """1 / (1 + characters): higher for shorter completions."""
    return [1.0 / (1.0 + len(c)) for c in completions]


def scripted(prompts, completions, examples):
    CALLS["n"] += 1
    if CALLS["n"] == FAULT["at_call"]:
        if FAULT["kind"] == "raise":
            raise KeyError("answer")
        if FAULT["kind"] == "nan":
            return [float("nan")] * len(completions)
        if FAULT["kind"] == "count":
            return [0.0] * (len(completions) + 1)
    return short(prompts, completions, examples)
