"""The divergence guard: a run whose training loss climbs well above where it started backs off.

The training loss of a step is the mean of its perturbed and baseline losses (what the
progress bar shows); one batch's is noisy, so the guard reads means over windows of
`window` steps. The starting level is the loss of the starting weights on the first
window's batches, measured before any update (`MeZOTrainer.train`: `window` passes), so a
rate too large to survive even the first window is caught there. At the end of each window:

* mean <= start + tolerance x |start| (for a positive loss: (1 + tolerance) x start; a
  reward objective's loss is minus the mean reward, often negative): the weights are good; they are kept (a snapshot) as
  the ones to come back to;
* mean above that: the run is diverging. The weights go back to the last snapshot, bit
  for bit, and the learning rate is halved (for the rest of the run); a line is logged.
  A window that ends good can end on weights worse than its mean: when the window after a
  restore is still bad, the weights go back to the starting ones (a run never ends
  worse than it began for lack of a good place to return to).

The snapshot is the trainer's (`MeZOTrainer._snapshot_good_weights`); this class holds the
rule and its state, which checkpoints record (`state_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

SNAPSHOT, RESTORE = "snapshot", "restore"
# The snapshot's file and the starting weights' (in the trainer's temp dir and in checkpoints).
GOOD_WEIGHTS_FILE = "guard_good_weights.safetensors"
START_WEIGHTS_FILE = "guard_start_weights.safetensors"


@dataclass
class DivergenceGuard:
    window: int
    tolerance: float
    start: Optional[float] = None  # the starting weights' mean loss on the first window's batches
    losses: list = field(default_factory=list)  # the current window's
    lr_scale: float = 1.0
    good_step: int = 0  # the step whose weights the snapshot holds (0: the starting weights)
    trips: int = 0
    last_mean: Optional[float] = None  # the last full window's mean
    restored_last: bool = False  # the previous window ended in a restore

    def observe(self, step: int, loss: float) -> Optional[str]:
        """After step `step` (its weights now hold `step + 1` updates) with training loss
        `loss`: SNAPSHOT, RESTORE, or None (mid-window)."""
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return None
        mean = self.last_mean = sum(self.losses) / len(self.losses)
        self.losses = []
        if self.start is None:
            raise RuntimeError("the divergence guard has no starting level: MeZOTrainer.train measures it")
        if mean <= self.limit:
            self.good_step, self.restored_last = step + 1, False
            return SNAPSHOT
        if self.restored_last:  # the snapshot did not hold up: back to the start
            self.good_step = 0
        self.lr_scale /= 2
        self.trips += 1
        self.restored_last = True
        return RESTORE

    @property
    def limit(self) -> float:
        """The highest window mean that counts as good."""
        return self.start + self.tolerance * abs(self.start)

    def explain(self, step: int) -> str:
        return (
            f"divergence guard at step {step}: training loss {self.last_mean:.4g} over the last {self.window} steps is "
            f"above {self.limit:.4g} (the start's {self.start:.4g} + {self.tolerance:g} x its size); the weights of step {self.good_step} "
            f"are restored and the learning rate scaled by {self.lr_scale:g}"
        )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
