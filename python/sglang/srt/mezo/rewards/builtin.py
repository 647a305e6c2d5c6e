"""Built-in rewards, each ``factory(argument) -> RewardFunction`` (the text after ``=`` in
``--reward name=argument``). Answer checking is the field's libraries': ``math`` is
`math-verify`'s (LaTeX/numeric equivalence), ``reasoning_gym`` calls the scorer of the
reasoning-gym task that generated the record."""

from __future__ import annotations

import re


def _no_argument(name: str, argument: str) -> None:
    if argument:
        raise ValueError(f"the built-in {name!r} takes no argument")


def _answers(examples: list) -> list:
    try:
        return [str(example["answer"]) for example in examples]
    except KeyError:
        raise ValueError(f"needs an 'answer' field in every record (the record has {sorted(examples[0])})") from None


def exact_match(argument: str):
    """1 when the completion, stripped and with runs of whitespace collapsed, equals the
    record's ``answer`` the same way, else 0."""
    _no_argument("exact_match", argument)

    def normal(text: str) -> str:
        return " ".join(text.split())

    def reward(prompts, completions, examples):
        return [float(normal(c) == normal(a)) for c, a in zip(completions, _answers(examples))]

    return reward


def math_answer(argument: str):
    """1 when math-verify finds the completion's final answer equivalent to the record's
    ``answer`` (numbers, fractions, LaTeX expressions), else 0."""
    _no_argument("math", argument)
    from math_verify import parse, verify

    def reward(prompts, completions, examples):
        return [float(verify(parse(a), parse(c))) for c, a in zip(completions, _answers(examples))]

    return reward


def reasoning_gym_answer(argument: str):
    """The score reasoning-gym's own task gives the completion as an answer to the record (a
    reasoning-gym entry: ``answer`` and ``metadata.source_dataset``), in [0, 1]."""
    _no_argument("reasoning_gym", argument)
    import reasoning_gym

    def reward(prompts, completions, examples):
        values = []
        for completion, example in zip(completions, examples):
            task = (example.get("metadata") or {}).get("source_dataset")
            if task is None:
                raise ValueError("the record is not a reasoning-gym entry (no metadata.source_dataset)")
            values.append(float(reasoning_gym.get_score_answer_fn(task)(completion.strip(), example)))
        return values

    return reward


def length_target(argument: str):
    """``length=N``: 1 - |characters - N| / N, at least 0 (1 at exactly N characters)."""
    try:
        target = int(argument)
    except ValueError:
        raise ValueError(f"length=N needs a whole number of characters N, got {argument!r}") from None
    if target < 1:
        raise ValueError(f"length=N needs N >= 1, got {target}")

    def reward(prompts, completions, examples):
        return [max(0.0, 1.0 - abs(len(c) - target) / target) for c in completions]

    return reward


def regex_format(argument: str):
    """``regex=PATTERN``: 1 when the whole stripped completion matches PATTERN, else 0."""
    if not argument:
        raise ValueError("regex=PATTERN needs a pattern")
    try:
        pattern = re.compile(argument, re.DOTALL)
    except re.error as error:
        raise ValueError(f"{argument!r} is not a regular expression ({error})") from None

    def reward(prompts, completions, examples):
        return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]

    return reward


BUILTIN_REWARDS = {
    "exact_match": exact_match,
    "math": math_answer,
    "reasoning_gym": reasoning_gym_answer,
    "length": length_target,
    "regex": regex_format,
}
