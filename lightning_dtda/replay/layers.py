"""Exact, differentiable twins of the layers whose training-mode forward a replay must reproduce."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

_BATCH_NORMS = nn.modules.batchnorm._BatchNorm


def running_statistics(model: nn.Module) -> list[str]:
    """Names of the buffers a train-mode forward updates: batch norms' running means and variances."""
    return [
        f"{name}.{buffer}"
        for name, m in model.named_modules()
        if isinstance(m, _BATCH_NORMS) and m.track_running_stats
        for buffer in ("running_mean", "running_var")
    ]


def _normalized(input: Tensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(input - mean) / sqrt(var + eps)`` over ``dims`` from primitives, with the mean and (biased) variance."""
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, unbiased=False, keepdim=True)
    return (input - mean) * torch.rsqrt(var + eps), mean, var


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    out = out if weight is None else out * weight.view(shape)
    return out if bias is None else out + bias.view(shape)


# Torch's fused batch-, instance- and layer-norm kernels give second derivatives under vmap(grad(...))
# that are off by 1e-5 to 1e-3 relative (measured against finite differences and plain autograd; group
# and RMS norm are exact), and the replay differentiates the training gradient. It normalises with
# these decompositions instead, exact to rounding.
def _batch_norm_forward(self: nn.Module, input: Tensor) -> Tensor:
    dims = [0, *range(2, input.ndim)]
    shape = [1, -1, *[1] * (input.ndim - 2)]
    var, mean = torch.var_mean(input, dims, unbiased=False, keepdim=True)
    if self.track_running_stats:  # torch's running variance is the unbiased one
        count = input.numel() // input.shape[1]
        self._replay_collected[self._replay_name] = (mean.flatten(), var.flatten() * count / max(count - 1, 1))
    # input * scale + shift, as torch's CPU kernel computes it: two passes over the activations instead of
    # four, which made unrolling's query-batched double backward through a batch norm 25% cheaper.
    scale = torch.rsqrt(var + self.eps)
    scale = scale if self.weight is None else scale * self.weight.view(shape)
    shift = -mean * scale if self.bias is None else self.bias.view(shape) - mean * scale
    return input * scale + shift


def _instance_norm_forward(self: nn.Module, input: Tensor) -> Tensor:
    channel_dim = input.ndim - self._get_no_batch_dim()  # 1 for batched input, 0 for one example
    out, _, _ = _normalized(input, list(range(channel_dim + 1, input.ndim)), self.eps)
    return _affine(out, self.weight, self.bias, [-1, *[1] * (input.ndim - channel_dim - 1)])


def _layer_norm_forward(self: nn.Module, input: Tensor) -> Tensor:
    out, _, _ = _normalized(input, list(range(input.ndim - len(self.normalized_shape), input.ndim)), self.eps)
    return _affine(out, self.weight, self.bias, list(self.normalized_shape))


class _EagerDropoutMasks(TorchFunctionMode):
    """``F.dropout`` drawing its mask as it does outside ``vmap``.

    Torch's CPU kernel fills ``empty_like(input)`` with Bernoulli draws in memory order; under
    ``vmap(randomness="same")``, and under ``grad`` (whose wrappers are contiguous), the mask is drawn in
    logical order. For a non-contiguous input (attention's output after its transpose, in every transformer
    layer) these are different masks, so the replay of a run would drop other units than the run did. This
    draws into a tensor laid out as the input is.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            bound = dict(zip(("input", "p", "training", "inplace"), args)) | kwargs
            input, p = bound["input"], bound.get("p", 0.5)
            if bound.get("training", True) and 0 < p < 1 and input.device.type == "cpu" and not input.is_contiguous():
                layout = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device=input.device)
                return input * torch.empty_like(layout).bernoulli_(1 - p).div_(1 - p)
        return func(*args, **kwargs)


_DECOMPOSED = (
    (_BATCH_NORMS, _batch_norm_forward),
    (nn.modules.instancenorm._InstanceNorm, _instance_norm_forward),
    (nn.LayerNorm, _layer_norm_forward),
)


@contextlib.contextmanager
def _train_mode(model: nn.Module, collected: dict[str, tuple[Tensor, Tensor]], eager_masks: bool) -> Iterator[None]:
    """Train mode, with normalisation layers decomposed (see above), and batch norms normalising by their
    batch's statistics without touching their buffers, putting the statistics (mean, unbiased
    variance) they saw in ``collected`` by module name. ``eager_masks``: draw CPU dropout masks as
    outside vmap (needed only when the training step drew random numbers: the mode costs every op a
    Python call)."""
    modes = {m: m.training for m in model.modules()}
    patched = []
    for name, m in model.named_modules():
        forward = next((f for kind, f in _DECOMPOSED if isinstance(m, kind)), None)
        if forward is not None:
            m._replay_name, m._replay_collected = name, collected
            m.forward = types.MethodType(forward, m)
            patched.append(m)
    model.train()
    try:
        # The fused attention kernels have no second derivatives; the math one does.
        with sdpa_kernel(SDPBackend.MATH), _EagerDropoutMasks() if eager_masks else contextlib.nullcontext():
            yield
    finally:
        for m in patched:
            del m.forward, m._replay_name, m._replay_collected
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def differentiable_running_statistics(model: nn.Module) -> Iterator[None]:
    """Eval-mode batch norms written out, so autograd reaches their running statistics (torch's kernel
    refuses to differentiate with respect to them)."""

    def forward(self: nn.Module, input: Tensor) -> Tensor:
        shape = [1, -1, *[1] * (input.ndim - 2)]
        out = (input - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        return _affine(out, self.weight, self.bias, shape)

    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    for m in norms:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward
