"""Float64 toy objectives whose gradient, Hessian and directional derivative are known."""

from __future__ import annotations

import torch
from torch import nn

from sglang.srt.mezo.config import MeZOConfig
from sglang.srt.mezo.trainer import MeZOTrainer


class Linear(nn.Module):
    """f(theta) = b . theta + c."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.c = 0.5

    def forward(self):
        return self.b @ self.theta + self.c

    def grad(self) -> torch.Tensor:
        return self.b.clone()

    def abs_terms(self) -> float:
        """sum |b_i theta_i| + |c|: the scale of f's rounding error."""
        return float((self.b * self.theta.detach()).abs().sum() + abs(self.c))


class Quadratic(nn.Module):
    """f(theta) = 1/2 theta^T H theta + b . theta, H symmetric positive definite."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        self.register_buffer("H", a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self):
        t = self.theta
        return 0.5 * t @ (self.H @ t) + self.b @ t

    def grad(self) -> torch.Tensor:
        return self.H @ self.theta.detach() + self.b

    def abs_terms(self) -> float:
        t = self.theta.detach().abs()
        return float(0.5 * t @ (self.H.abs() @ t) + self.b.abs() @ t)


def toy_objective(model, batch):
    """MeZO objective over a toy module: (f, 1); the batch is ignored."""
    return model(), 1


TOY_BATCH = {"x": torch.zeros(1)}


def toy_trainer(model: nn.Module, **overrides) -> MeZOTrainer:
    """A MeZOTrainer of a toy model on `toy_objective` (lr 0, eps 1e-3, seed 0 unless overridden)."""
    values = dict(learning_rate=0.0, epsilon=1e-3, seed=0, disable_tqdm=True)
    values.update(overrides)
    return MeZOTrainer(model, MeZOConfig(**values), objective=toy_objective)
