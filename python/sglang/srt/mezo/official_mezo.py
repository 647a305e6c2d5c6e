"""The official MeZO step (princeton-nlp/MeZO, large_models/trainer.py: zo_perturb_parameters,
zo_forward, zo_step, zo_update), re-implemented as the baseline this project is measured
against: the benchmarks time it and measure its memory on the same model and batch, and the
test suite measures its memory beside the trainer's. Not used for training.
"""

from __future__ import annotations

import numpy as np
import torch


class OfficialMeZOReference:
    """The official MeZO step: seeded global RNG, `torch.normal` per parameter, out of place.

    One step makes four sweeps over the trainable parameters, each drawing z afresh after
    ``torch.manual_seed(seed)``: +eps z, -2 eps z, +eps z (back to the start, up to
    rounding), then the update ``w <- w - lr (g z + wd w)`` (no decay for names containing
    bias / layer_norm / layernorm, as in the official code). Both losses come from a forward
    under ``torch.inference_mode()`` in eval mode. The loss is the objective the MeZO trainer
    uses, so only the step pattern differs.
    """

    def __init__(self, model, objective, learning_rate: float, epsilon: float, weight_decay: float = 0.0, seed=0):
        self.model = model
        self.objective = objective
        self.learning_rate = learning_rate
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.rng = np.random.RandomState(seed)
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.zo_random_seed = 0
        self.projected_grad = 0.0

    def zo_perturb_parameters(self, scaling_factor: float = 1.0) -> None:
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.epsilon

    def zo_forward(self, batch: dict):
        self.model.eval()
        with torch.inference_mode():
            total, count = self.objective(self.model, batch)
            loss = total / count
        return loss.detach()

    def zo_step(self, batch: dict):
        self.zo_random_seed = int(self.rng.randint(1000000000))
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(batch)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(batch)
        self.projected_grad = ((loss1 - loss2) / (2 * self.epsilon)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self) -> None:
        torch.manual_seed(self.zo_random_seed)
        lr, wd = self.learning_rate, self.weight_decay
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - lr * (self.projected_grad * z + wd * param.data)
            else:
                param.data = param.data - lr * (self.projected_grad * z)

    def step(self, batch: dict):
        loss = self.zo_step(batch)
        self.zo_update()
        return loss
