"""Blurring ReLU's kink in second derivatives, for unrolled differentiation of ReLU networks.

A ReLU network's training step is discontinuous in the weights: the gradient carries ReLU's step
``1[z > 0]``, and autograd's second derivatives drop the step's delta ``ReLU''(z) = delta(z)``. The
exact derivative of a training run therefore describes removals so small that no pre-activation
crosses zero (on the digits benchmark, finite differences follow it up to a weight change of 1e-5
and no further). Removing a whole example crosses many kinks, and their expected effect is first
order in the removal. ``ReLUSmoothing`` stands a Gaussian density of width ``sigma`` in for
that delta: the derivative of training with each kink blurred over ``sigma`` of pre-activation.
Forward values and first derivatives stay exact, so a replay still lands on the recorded weights.
Only ReLU is blurred; other kinks (max-pooling, LeakyReLU, clamps) stay exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _OfPreActivation(torch.autograd.Function):
    """A function of the pre-activation ``z`` (saved for backward) and the kink width ``sigma``."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.sigma = inputs[1]


class _ReLUStep(_OfPreActivation):
    """``1[z > 0]``, whose derivative is a Gaussian density of width ``sigma`` instead of zero."""

    @staticmethod
    def forward(z: Tensor, sigma: float) -> Tensor:
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (z,) = ctx.saved_tensors
        density = torch.exp(-0.5 * (z / ctx.sigma) ** 2) / (ctx.sigma * math.sqrt(2 * math.pi))
        return grad * density, None


class _SmoothedReLU(_OfPreActivation):
    """ReLU with the exact value and first derivative, and a differentiable step in its backward."""

    @staticmethod
    def forward(z: Tensor, sigma: float) -> Tensor:
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (z,) = ctx.saved_tensors
        return grad * _ReLUStep.apply(z, ctx.sigma), None


class ReLUSmoothing(TorchFunctionMode):
    """Within this context every ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place
    or not) keeps its value and gradient but has second derivative ``N(z; 0, sigma^2)`` instead of 0.

    ``used`` tells afterwards whether any ReLU ran. In-place calls return a new tensor, which is what
    the callers of ``nn.ReLU(inplace=True)`` use.
    """

    _RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_})

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.used = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self._RELUS:
            self.used = True
            return _SmoothedReLU.apply(args[0], self.sigma)
        return func(*args, **(kwargs or {}))
