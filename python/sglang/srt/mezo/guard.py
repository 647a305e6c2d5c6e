"""The divergence guard: a run is judged on training examples it never trains on, keeps its
best weights, backs off when it gets worse, and ends on the best it found.

A training batch's loss is too noisy to judge a run by (a 30% rise of the eval loss hid in
windows of batch losses), and a run's last weights are not necessarily its best. So the
guard scores the weights on a fixed held-back slice of the training data (`held-back
checks`: the loss, and the accuracy where examples carry candidates) at the start, every
`window` forward passes, and after the last step. A check is **acceptable** when it is no
worse than the start on either measure (loss <= the start's, accuracy >= the start's); the
**best** check is the acceptable one with the lowest loss (the start, until one beats it).

* an acceptable check with a loss below the best's: the new best; its weights are kept
  (a snapshot, on disk);
* a check whose loss is above best + tolerance x |best| (a reward objective's loss is
  minus the mean reward, often negative): the run is diverging. The best weights come
  back, bit for bit, and the learning rate is halved for the rest of the run; a line is
  logged;
* the last step's check, when it is not the best: the best weights come back (no halving:
  the run is over). A run never ends worse on its held-back slice than it began.

This is early stopping with the best weights restored (HF Trainer's
``load_best_model_at_end``), plus a back-off that spends the remaining budget at a smaller
rate instead of ending. The snapshot is the trainer's (`MeZOTrainer.snapshot_best_weights`);
this class holds the rule and its state, which checkpoints record (`state_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

SNAPSHOT, RESTORE = "snapshot", "restore"
BEST_WEIGHTS_FILE = "guard_best_weights.safetensors"  # in the trainer's temp dir and in checkpoints


@dataclass
class DivergenceGuard:
    window: int  # forward passes of training between held-back checks
    tolerance: float
    start: Optional[dict] = None  # the starting weights' check: {"loss", "accuracy" (or None)}
    best: Optional[dict] = None  # the best check so far
    best_step: int = 0  # the global step whose weights the snapshot holds (0: the starting weights)
    passes_since_check: int = 0
    lr_scale: float = 1.0
    trips: int = 0
    check_passes: int = 0  # forward passes spent on held-back checks, the start's included

    def due(self, passes: int, last: bool) -> bool:
        """After a step of `passes` forward passes (`last`: the run's final step): is a check due?"""
        self.passes_since_check += passes
        return last or self.passes_since_check >= self.window

    def begin(self, check: dict) -> None:
        """The starting weights' check: the level every later one is held to."""
        self.start = self.best = check

    def judge(self, step: int, check: dict, last: bool) -> Optional[str]:
        """The check of the weights after `step` updates (`last`: the run's final ones):
        SNAPSHOT (the new best), RESTORE (back to the best), or None (go on)."""
        if self.start is None:
            raise RuntimeError("the divergence guard has no starting check: MeZOTrainer.train makes it")
        self.passes_since_check = 0
        if self.acceptable(check) and check["loss"] < self.best["loss"]:
            self.best, self.best_step = check, step
            return SNAPSHOT
        if last:
            return RESTORE  # the run ends on its best weights
        if check["loss"] > self.limit:
            self.lr_scale /= 2
            self.trips += 1
            return RESTORE
        return None

    def acceptable(self, check: dict) -> bool:
        """No worse than the start: loss no higher, accuracy (where measured) no lower."""
        accuracy, start_accuracy = check.get("accuracy"), self.start.get("accuracy")
        return check["loss"] <= self.start["loss"] and (start_accuracy is None or accuracy >= start_accuracy)

    @property
    def limit(self) -> float:
        """The highest held-back loss that does not count as diverging."""
        return self.best["loss"] + self.tolerance * abs(self.best["loss"])

    def explain(self, step: int, check: dict, last: bool) -> str:
        measured = describe(check)
        if last:
            return (
                f"divergence guard: the final weights score {measured} on the held-back examples; the run ends on "
                f"those of step {self.best_step} ({describe(self.best)}), its best (the start: {describe(self.start)})"
            )
        return (
            f"divergence guard at step {step}: held-back {measured}, above {self.limit:.4g} (the best's "
            f"{self.best['loss']:.4g} + {self.tolerance:g} x its size); the weights of step {self.best_step} are "
            f"restored and the learning rate scaled by {self.lr_scale:g}"
        )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def describe(check: dict) -> str:
    accuracy = check.get("accuracy")
    return f"loss {check['loss']:.4g}" + ("" if accuracy is None else f", accuracy {accuracy:.4g}")
