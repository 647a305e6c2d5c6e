"""`RewardObjective`: minus the mean reward of completions generated under the perturbed weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from sglang.srt.mezo.generation import GenerationSettings
from sglang.srt.mezo.rewards.loading import RewardFunction, checked_rewards, load_reward


@dataclass
class RewardObjective:
    """The ``reward`` objective: backends generate completions of a batch's prompts under
    the pass's weights (``completions(batch, settings, seed, scale)``) and hand them to
    `reduce`, which scores them and returns ``(-sum of rewards, count)``, so that the
    estimators' minimisation maximises the mean reward.

    One instance per step (`at_step`): it carries the step's sampling seed, common to all
    its passes, and collects the step's rewards for the metrics (`summary`).
    """

    spec: str
    function: RewardFunction
    settings: GenerationSettings
    run_seed: int
    tokenizer: object  # decodes (and, on the transformers backend, stops) the generation
    rewards: list = field(default_factory=list)  # every reward of this step's passes
    samples: list = field(default_factory=list)  # (prompt, completion, reward) of the last pass
    name = "reward"

    @classmethod
    def from_config(cls, config, tokenizer) -> "RewardObjective":
        if tokenizer is None:
            raise ValueError("the reward objective decodes generated tokens: pass the tokenizer to MeZOTrainer")
        function = load_reward(config.reward)
        return cls(config.reward, function, GenerationSettings.from_config(config), config.seed, tokenizer)

    def at_step(self, step: Optional[int]) -> "RewardObjective":
        """A fresh objective for the passes of `step` (None: greedy evaluation)."""
        return replace(self, settings=self.settings.at_step(self.run_seed, step), rewards=[], samples=[])

    def reduce(self, batch: dict, completions: list) -> tuple:
        """(-sum of rewards as float64, number of completions) of `completions`, which hold
        ``settings.num_samples`` adjacent completions per prompt of `batch`."""
        repeat = self.settings.num_samples
        examples = [record for record in batch["records"] for _ in range(repeat)]
        prompts = [prompt for prompt in batch["prompts"] for _ in range(repeat)]
        values = checked_rewards(self.spec, self.function, prompts, completions, examples)
        self.rewards.extend(values)
        self.samples = list(zip(prompts, completions, values))
        return -torch.tensor(values, dtype=torch.float64).sum(), len(values)

    def summary(self) -> dict:
        """Mean and standard deviation of the rewards collected so far (every pass's samples)."""
        n = len(self.rewards)
        mean = sum(self.rewards) / n
        return {"mean": mean, "std": math.sqrt(sum((r - mean) ** 2 for r in self.rewards) / n), "samples": n}
