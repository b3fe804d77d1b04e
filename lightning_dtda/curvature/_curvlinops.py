"""Every use of curvlinops 3.0's private attributes, in one file, so an upgrade touches only this one.

The package pins the 3.0 series (3.1 renames the operator API). What is used beyond the public API:
the base class's shapes and ``_matmat`` (to sum a sharded operator over ranks), the K-FAC inverse's
eigendecomposition hook and damping (float64 ``eigh``; one inverse for many dampings), the Kronecker
factors and EK-FAC's corrected eigenvalues (summed over ranks; replaced by a function of them), and
the operator's layer mapping, data loop and type-2 backward passes (``collect_factors``,
``collect_corrected_eigenvalues``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.kfac import FisherType, KFACType
from curvlinops.kfac_utils import extract_patches, loss_hessian_matrix_sqrt
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_dtda.errors import UnsupportedLayerError
from lightning_dtda.sharding import all_reduce_sum

__all__ = [
    "KFACInverse",
    "PyTorchLinearOperator",
    "SummedOverRanks",
    "collect_corrected_eigenvalues",
    "collect_factors",
    "eigendecompose_factors",
    "loss_hessian_matrix_sqrt",
    "sum_corrected_eigenvalues",
    "sum_factors",
    "with_eigenvalue_function",
]


class SummedOverRanks(PyTorchLinearOperator):
    """A curvature operator on this rank's shard of the data, summed over ranks at every product."""

    def __init__(self, operator: PyTorchLinearOperator) -> None:
        super().__init__(operator._in_shape, operator._out_shape)
        self.operator = operator

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        return [all_reduce_sum(t) for t in self.operator._matmat(M)]

    def _adjoint(self) -> SummedOverRanks:
        return self

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype


class KFACInverse(KFACInverseLinearOperator):
    """curvlinops' damped K-FAC inverse with the factors eigendecomposed by ``eigh`` (float64: float32
    ``eigh`` fails to converge on the rank-deficient factors of ReLU/pooling CNNs, measured on the
    1M-parameter CNN of benchmarks/speed.py), and a damping that can be changed after construction
    (the eigendecompositions it caches do not depend on it)."""

    def __init__(
        self, operator: KFACLinearOperator, eigh: Callable[[Tensor], tuple[Tensor, Tensor]], damping: float
    ) -> None:
        self._eigh = eigh
        super().__init__(operator, damping=damping, use_exact_damping=True)

    def set_damping(self, damping: float) -> None:
        self._damping = damping

    def _compute_factors_eigendecomposition(self, aaT: Tensor | None, ggT: Tensor | None) -> tuple[Any, Any]:
        def eigh(factor: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if factor is None:
                return None, None
            values, vectors = self._eigh(factor)
            return values.to(factor.dtype), vectors.to(factor.dtype)

        return eigh(aaT), eigh(ggT)


def sum_factors(operator: KFACLinearOperator) -> None:
    """Sum the Kronecker factors over ranks, in place (each rank collected them on its shard)."""
    for factors in (operator._input_covariances, operator._gradient_covariances):
        tree_map(all_reduce_sum, factors)


def eigendecompose_factors(operator: EKFACLinearOperator, eigh: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
    """What curvlinops' EK-FAC does before its eigenvalue correction, with ``eigh`` (float64, see
    ``KFACInverse``) in place of its own float32 one: each factor is replaced by its eigenvectors."""
    for name in operator._mapping:
        for source, destination in (
            (operator._input_covariances, operator._input_covariances_eigenvectors),
            (operator._gradient_covariances, operator._gradient_covariances_eigenvectors),
        ):
            factor = source.pop(name, None)
            if factor is not None:
                destination[name] = eigh(factor)[1].to(factor.dtype)


def sum_corrected_eigenvalues(operator: EKFACLinearOperator) -> None:
    """Sum EK-FAC's corrected eigenvalues over ranks, in place (a sum over the data in the summed factors' basis)."""
    tree_map(all_reduce_sum, operator._corrected_eigenvalues)


@contextlib.contextmanager
def with_eigenvalue_function(operator: EKFACLinearOperator, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside, ``operator`` multiplies by ``fn(EK-FAC)``: curvlinops 3.0 multiplies by ``Q diag(corrected
    eigenvalues) Q^T``, so ``fn`` of the (non-negative) eigenvalues stands in for them."""
    operator._maybe_compute_ekfac()
    original = operator._corrected_eigenvalues
    operator._corrected_eigenvalues = tree_map(lambda e: fn(e.clamp(min=0.0)), original)
    try:
        yield
    finally:
        operator._corrected_eigenvalues = original


# Entries of one rotated per-example gradient chunk [rows, D1, D2] (64 MiB in float32).
_CHUNK_ENTRIES = 2**24


def collect_factors(operator: KFACLinearOperator) -> None:
    """curvlinops' ``compute_kronecker_factors`` (type-2, K-FAC-expand), each layer's statistics computed once
    per batch from the output gradients of all the loss Hessian's columns (curvlinops: once per column)."""

    def add(name: str, inputs: Tensor | None, grads: Tensor, correction: float) -> None:
        if inputs is not None:
            flat = inputs.flatten(end_dim=1)
            _add(operator._input_covariances, name, (flat.T @ flat).div_(operator._N_data * inputs.shape[1]))
        _add(operator._gradient_covariances, name, _gram(grads).mul_(correction))

    operator._reset_matrix_properties()
    _type2_pass(operator, add, "KFAC matrices")


def collect_corrected_eigenvalues(operator: EKFACLinearOperator) -> None:
    """curvlinops' ``compute_eigenvalue_correction`` (after ``eigendecompose_factors``) from the same passes as
    ``collect_factors``, each layer's inputs rotated into their factor's eigenbasis once per
    batch (curvlinops: once per column of the loss Hessian), and without weight sharing the correction as one
    product: ``sum_n (Q_g^T g_n)^2 ((Q_a^T a_n)^2)^T``."""

    def add(name: str, inputs: Tensor | None, grads: Tensor, correction: float) -> None:
        basis = operator._gradient_covariances_eigenvectors[name]
        # [C, B, D1, S]; without weight sharing as one matrix product, not a batch of matrix-vector products
        rotated = (grads[..., 0] @ basis).unsqueeze(-1) if grads.shape[-1] == 1 else basis.T @ grads
        if inputs is None:  # the bias alone: one correction per output
            _add_corrected(operator, name, "bias", rotated.sum(-1).square().sum((0, 1)).mul_(correction))
            return
        inputs = inputs @ operator._input_covariances_eigenvectors[name]  # [B, S, D2]
        if inputs.shape[1] == 1:
            value = rotated[..., 0].square().sum(0).T @ inputs[:, 0].square()
        else:  # weight sharing: per-example gradients in the eigenbasis, a chunk of examples at a time
            value = rotated.new_zeros(rotated.shape[2], inputs.shape[-1])
            rows = max(1, _CHUNK_ENTRIES // value.numel())
            for column in rotated:
                for start in range(0, len(inputs), rows):
                    value += (column[start : start + rows] @ inputs[start : start + rows]).square_().sum(0)
        _add_corrected(operator, name, "weight", value.mul_(correction))

    operator._reset_matrix_properties()
    _type2_pass(operator, add, "Eigenvalue correction")


def _gram(grads: Tensor) -> Tensor:
    """``sum over c, b of grads[c, b] @ grads[c, b].T`` for ``grads [C, B, D1, S]``: ``[D1, D1]``."""
    if grads.shape[-1] == 1:
        flat = grads.reshape(-1, grads.shape[2])
        return flat.T @ flat
    # batched products, a chunk of examples at a time (einsum's permuted copy took 8x longer on convolutions)
    flat = grads.flatten(end_dim=1)
    rows = max(1, _CHUNK_ENTRIES // grads.shape[2] ** 2)
    return sum((chunk @ chunk.transpose(1, 2)).sum(0) for chunk in flat.split(rows))


def _add(store: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in store:
        store[key].add_(value)
    else:
        store[key] = value


def _add_corrected(operator: EKFACLinearOperator, name: str, kind: str, value: Tensor) -> None:
    # curvlinops keeps one tensor for a layer whose weight and bias share the factors, else one per parameter.
    positions = operator._mapping[name]
    if kind == "weight" and "bias" in positions:
        _add(operator._corrected_eigenvalues, name, value)
    else:
        _add(operator._corrected_eigenvalues.setdefault(name, {}), positions[kind], value)


def _type2_pass(
    operator: KFACLinearOperator, add: Callable[[str, Tensor | None, Tensor, float], None], desc: str
) -> None:
    """One pass over the operator's data: a forward pass, then a backward pass for each column of the loss
    Hessian's square root (scaled as curvlinops does), then ``add(name, inputs, grads, correction)``
    per layer. ``inputs`` ``[B, S, D2]``: the layer's inputs (a convolution's patches) with a column of ones
    when its weight and bias share the factors, ``None`` when its weight is not tracked; ``grads``
    ``[C, B, D1, S]``: the gradients of its outputs, one per column; ``correction``: curvlinops' scale for
    the loss's reduction."""
    if operator._fisher_type != FisherType.TYPE2 or operator._kfac_approx != KFACType.EXPAND:
        raise NotImplementedError("Only the type-2 Fisher with K-FAC-expand is collected here.")
    if operator._separate_weight_and_bias:
        raise NotImplementedError("Only weight and bias sharing their factors is collected here.")
    modules = {name: operator._model_func.get_submodule(name) for name in operator._mapping}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, list[Tensor]] = {}

    def keep(name: str, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        inputs[name] = args[0].detach()
        outputs.setdefault(name, []).append(output)
        # Gradients are taken at `output`; the model goes on with a copy, which a later in-place activation
        # may overwrite without changing them.
        return output.clone()

    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: keep(name, m, a, o)) for name, module in modules.items()
    ]
    try:
        for X, y in operator._loop_over_data(desc=desc):
            inputs.clear()
            outputs.clear()
            output = operator._model_func(X)
            _check_layer_calls(inputs, outputs, modules, len(output))
            names = list(modules)
            columns = _hessian_sqrt_columns(operator, output, y)
            # One backward pass per column, to the layers' outputs only: 2x faster here than vmap over the
            # columns or than curvlinops' passes to the parameters (measured on the 1M-parameter CNN).
            grads: list[Tensor] = []  # per layer [C, B, ...], filled a column at a time (stacking held them twice)
            for c, column in enumerate(columns):
                result = torch.autograd.grad(
                    output,
                    [outputs[n][0] for n in names],
                    column,
                    retain_graph=c < len(columns) - 1,
                    allow_unused=True,
                    materialize_grads=True,
                )
                grads = grads or [g.new_empty(len(columns), *g.shape) for g in result]
                for buffer, g in zip(grads, result):
                    buffer[c] = g
            terms = operator._num_per_example_loss_terms
            correction = {"sum": 1.0, "mean": (len(output) * terms) ** 2 / (operator._N_data * terms)}[
                operator._loss_func.reduction
            ]
            for name, g in zip(names, grads):
                module, positions = modules[name], operator._mapping[name]
                x = _layer_inputs(module, inputs[name], "bias" in positions) if "weight" in positions else None
                add(name, x, _output_grads(module, g), correction)
    finally:
        for handle in handles:
            handle.remove()


def _check_layer_calls(
    inputs: dict[str, Tensor], outputs: dict[str, list[Tensor]], modules: dict[str, nn.Module], batch: int
) -> None:
    """Refuse a forward pass whose layer calls K-FAC would factor wrongly without a word: a layer called
    other than once, or given inputs whose first dimension is not the batch's (a sequence-first layer, or
    examples flattened with their positions): its statistics would group rows that are no examples."""
    leave_out = "Use curvature='ggn', or leave its parameters out with Influence(modules=...)."
    for name in modules:
        calls = len(outputs.get(name, []))
        if calls != 1:
            raise UnsupportedLayerError(
                f"K-FAC needs each layer called once per forward pass; {name!r} was called {calls} times. {leave_out}"
            )
        if inputs[name].shape[0] != batch:
            raise UnsupportedLayerError(
                f"K-FAC needs each layer's inputs batch first; {name!r} received {tuple(inputs[name].shape)} in a "
                f"batch of {batch} (a sequence-first layer, e.g. batch_first=False, or examples flattened with their "
                f"positions). Use batch_first=True, curvature='ggn', or leave its parameters out with "
                "Influence(modules=...)."
            )


def _hessian_sqrt_columns(operator: KFACLinearOperator, output: Tensor, y: Tensor) -> Tensor:
    """The columns of each example's loss-Hessian square root, scaled for the reduction as curvlinops'
    type-2 backward passes scale them: ``[C, B, K]`` for outputs ``[B, K]``."""
    if output.ndim != 2 or y.ndim not in (1, 2):
        raise ValueError(f"Only 2d outputs and 1d/2d targets are supported; got {output.ndim=} and {y.ndim=}.")
    root = torch.stack(
        [
            loss_hessian_matrix_sqrt(out.detach(), target, operator._loss_func)
            for out, target in zip(output.split(1), y.split(1))
        ]
    )
    scale = {"sum": 1.0, "mean": 1.0 / len(output)}[operator._loss_func.reduction]
    return root.mul_(scale).permute(2, 0, 1)


def _layer_inputs(module: nn.Module, x: Tensor, ones: bool) -> Tensor:
    """A Linear's inputs or a Conv2d's patches as ``[B, S, D2]``, with a column of ones if ``ones``."""
    if isinstance(module, nn.Conv2d):
        x = extract_patches(x, module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
    x = x.reshape(len(x), -1, x.shape[-1])
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if ones else x


def _output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``[C, B, ...]`` as ``[C, B, D1, S]`` (a Linear's a transposed view)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(start_dim=3)
    return g.reshape(*g.shape[:2], -1, g.shape[-1]).transpose(2, 3)
