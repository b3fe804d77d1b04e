"""K-FAC and EK-FAC blocks for ``nn.Embedding`` weights, which curvlinops 3.0.1 has no factors for.

An embedding looks up row ``x`` of its weight ``E [V, D]``: it is the linear layer ``W = E^T`` applied to
the one-hot vector of ``x``. That layer's K-FAC-expand block (curvlinops' for a ``nn.Linear`` whose
weight is shared over the ``S`` lookups of an example, type-2 Fisher) is ``A ⊗ G`` with

    A = diag(counts) / (N S)        (counts [V]: how often each row is looked up in the data)
    G = c sum_{n, columns k of the loss Hessian's square root, lookups s} g g^T      [D, D]

(``g`` the gradient of ``output_n . sqrt_k`` with respect to the lookup's output, ``c = 1/N`` for a
mean-reduced loss as in curvlinops). ``A`` is diagonal, so it is kept as a ``[V]`` vector (vocabularies
of 50k rows would make a dense one 10 GB), and on ``E``'s layout the block is ``E -> A E G``. Its
eigenbasis is the standard basis of the rows times ``G``'s eigenvectors ``Q``; EK-FAC's corrected
eigenvalues ``[V, D]`` are the squared per-example gradients in that basis, ``(P_n Q)^2`` summed
(``P_n[v] = sum of g over example n's lookups of row v``), scaled like ``G``. Tested equal to curvlinops'
K-FAC and EK-FAC of the one-hot linear layer.

Lookups are of two kinds: per example (indices ``[B, ...]``, e.g. tokens) and shared (the same
indices for every example, e.g. a position table looked up with ``arange(T)`` and broadcast over the
batch). A shared lookup's output is expanded over the batch while factors are collected, so each
example has its own gradient; the model computes the same function (checked on a batch before an
embedding is tracked). The padding row (``padding_idx``) gets no gradient in torch, so its lookups count
as zero inputs: no count and no part in the correction, as for the one-hot layer with those inputs zeroed.
The blocks come from data passes of their own (one for K-FAC, one more for EK-FAC's correction) beside
curvlinops' passes for the other layers: curvlinops differentiates with respect to its own parameters
only, so its passes never reach an embedding that only feeds other layers.

Embeddings with ``max_norm`` (the forward rewrites the weight), ``scale_grad_by_freq`` (the gradient
is not the derivative) or ``sparse`` gradients are not tracked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_dtda.curvature._curvlinops import loss_hessian_matrix_sqrt
from lightning_dtda.errors import UnsupportedLayerError
from lightning_dtda.hooks import call_model

PER_EXAMPLE, SHARED = "per example", "shared"


def _batch_size(inputs: Any) -> int:
    return next(t for t in tree_leaves(inputs) if isinstance(t, Tensor)).shape[0]


@contextmanager
def _recording(
    layers: Iterable[nn.Embedding], expand: dict[nn.Embedding, int] | None = None
) -> Iterator[dict[nn.Embedding, list[tuple[Tensor, Tensor]]]]:
    """Record every lookup's ``(indices, output)``; with ``expand``, a layer's outputs (and indices) gain a
    leading batch dimension of that size, and that is what the forward goes on with."""
    calls: dict[nn.Embedding, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in layers}

    def hook(layer: nn.Embedding, args: tuple[Any, ...], output: Tensor) -> Tensor:
        indices = args[0]
        if expand is not None and layer in expand:
            indices, output = indices.expand(expand[layer], *indices.shape), output.expand(expand[layer], *output.shape)
        calls[layer].append((indices, output))
        return output

    handles = [layer.register_forward_hook(hook) for layer in calls]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def lookup_kinds(
    model: nn.Module, inputs: Any, call: Callable[[nn.Module, Any], Tensor] = call_model
) -> dict[nn.Embedding, str]:
    """The ``nn.Embedding`` layers of ``model`` whose weights can have a block, and how the forward on
    ``inputs`` looks them up: ``PER_EXAMPLE`` or ``SHARED`` (see the module docstring).

    The forward runs on ``inputs`` and on them with the first example repeated: a lookup whose leading
    size follows the batch's is per example, one whose indices keep their shape is shared. A layer with
    lookups of neither kind or of both, not called, or with ``max_norm``, ``scale_grad_by_freq`` or
    ``sparse`` is left out; shared ones are all left out if expanding them changes the model's outputs.
    ``call(model, inputs)`` runs the forward (curvlinops' form of the model takes ``model(inputs)``).
    """
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Embedding and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    ]
    more = tree_map(lambda t: torch.cat([t, t[:1]]) if isinstance(t, Tensor) else t, inputs)
    size = _batch_size(inputs)
    with torch.no_grad():
        shapes, outputs = [], []
        for x in (inputs, more):
            with _recording(layers) as calls:
                outputs.append(call(model, x))
            shapes.append({layer: [tuple(i.shape) for i, _ in found] for layer, found in calls.items()})
    kinds = {}
    for layer in layers:
        pairs = list(zip(*(s[layer] for s in shapes)))
        if not pairs or len(shapes[0][layer]) != len(shapes[1][layer]):
            continue
        if all(a[:1] == (size,) and b[:1] == (size + 1,) and a[1:] == b[1:] for a, b in pairs):
            kinds[layer] = PER_EXAMPLE
        elif all(a == b for a, b in pairs):
            kinds[layer] = SHARED
    shared = {layer: size for layer, kind in kinds.items() if kind == SHARED}
    if shared:
        try:
            with torch.no_grad(), _recording(shared, expand=shared):
                same = torch.equal(call(model, inputs), outputs[0])
        except RuntimeError:  # shapes that no longer broadcast
            same = False
        if not same:
            kinds = {layer: kind for layer, kind in kinds.items() if kind == PER_EXAMPLE}
    return kinds


class EmbeddingBlock:
    """One embedding's (E)K-FAC block (module docstring): ``counts`` ``[V]`` (already ``/ (N S)``), ``G``
    ``[D, D]``, and once fitted for EK-FAC ``corrected`` ``[V, D]``; ``basis`` sets ``G``'s eigenvalues and
    eigenvectors."""

    def __init__(self, counts: Tensor, gradient_covariance: Tensor, corrected: Tensor | None = None) -> None:
        self.counts, self.gradient_covariance, self.corrected = counts, gradient_covariance, corrected
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None

    def basis(self, eigh: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
        values, vectors = eigh(self.gradient_covariance)
        dtype = self.gradient_covariance.dtype
        self.eigenvalues, self.eigenvectors = values.to(dtype), vectors.to(dtype)

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor, corrected: bool) -> Tensor:
        """``Q fn(eigenvalues) Q^T vectors`` for ``vectors [K, V * D]`` (the weight's flattened layout): the
        eigenvalues are K-FAC's ``counts_v * eig_j(G)`` or, with ``corrected``, EK-FAC's."""
        q = self.eigenvectors
        values = self.corrected.clamp(min=0.0) if corrected else torch.outer(self.counts, self.eigenvalues)
        rotated = vectors.reshape(len(vectors), *values.shape).to(q.dtype) @ q
        return ((rotated * fn(values)) @ q.T).reshape(vectors.shape).to(vectors.dtype)

    def state(self) -> dict[str, Tensor]:
        state = {"counts": self.counts, "gradient_covariance": self.gradient_covariance}
        return state if self.corrected is None else {**state, "corrected": self.corrected}


def _lookups(
    model: nn.Module, loss_function: nn.Module, kinds: dict[nn.Embedding, str], data: Iterable[tuple[Any, Tensor]]
) -> Iterator[tuple[int, nn.Embedding, Tensor, Tensor]]:
    """For every batch, every column of the loss Hessian's square root and every layer: the column, its lookups'
    indices ``[B, S]`` and the gradients ``[B, S, D]`` of ``sum_n output_n . sqrt_n[:, column]`` with
    respect to their outputs (curvlinops' type-2 backward passes, without its ``1/B`` scaling, which its
    factors undo)."""
    if not kinds:
        return
    checked = False
    for inputs, targets in data:
        size = _batch_size(inputs)
        shared = {layer: size for layer, kind in kinds.items() if kind == SHARED}
        with torch.enable_grad(), _recording(kinds, expand=shared) as calls:
            outputs = model(inputs)
        root = torch.stack(
            [loss_hessian_matrix_sqrt(o.detach(), t, loss_function) for o, t in zip(outputs.split(1), targets.split(1))]
        )
        found = [(layer, i, o) for layer, pairs in calls.items() for i, o in pairs]
        for column in range(root.shape[-1]):
            # Once, the weights' own gradients too, to check that the lookups are their only use.
            weights = [] if checked else [layer.weight for layer in kinds]
            grads = torch.autograd.grad(
                (outputs * root[:, :, column]).sum(),
                [o for *_, o in found] + weights,
                retain_graph=column < root.shape[-1] - 1,
                allow_unused=True,
            )
            if weights:
                _check_only_lookups(kinds, found, grads[: len(found)], grads[len(found) :])
                checked, grads = True, grads[: len(found)]
            for layer in kinds:
                # A lookup the outputs do not depend on has gradient zero (autograd says None).
                mine = [
                    (i, torch.zeros_like(o) if g is None else g)
                    for (owner, i, o), g in zip(found, grads)
                    if owner is layer
                ]
                if mine:
                    yield (
                        column,
                        layer,
                        torch.cat([i.reshape(size, -1) for i, _ in mine], 1),
                        torch.cat([g.reshape(size, -1, g.shape[-1]) for _, g in mine], 1),
                    )


def _check_only_lookups(
    kinds: Iterable[nn.Embedding], found: list[tuple[nn.Embedding, Tensor, Tensor]], lookup_grads, weight_grads
) -> None:
    """Refuse a weight whose gradient is not the sum of its lookups' output gradients: the forward uses
    it elsewhere too (a head written as ``h @ emb.weight.T``), which its block would not see (a review
    measured 39% off on such a model)."""
    for layer, weight_grad in zip(kinds, weight_grads):
        expected = torch.zeros_like(layer.weight)
        for (owner, indices, _), g in zip(found, lookup_grads):
            if owner is layer and g is not None:
                rows, g = indices.reshape(-1), g.reshape(-1, g.shape[-1])
                kept = rows != layer.padding_idx if layer.padding_idx is not None else slice(None)
                expected.index_add_(0, rows[kept], g[kept])
        actual = torch.zeros_like(expected) if weight_grad is None else weight_grad
        if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max().clamp(min=1e-30))):
            raise UnsupportedLayerError(
                f"{layer} is used by the forward outside its lookups (a head written as `h @ embedding.weight.T`, say), which "
                "its K-FAC block cannot see. Use curvature='ggn', or modules= naming the other submodules."
            )


def _scale(loss_function: nn.Module, num_data: int) -> float:
    # curvlinops' normalisation of G and of the corrected eigenvalues (num_loss_terms = B for [B, C] outputs).
    return 1.0 / num_data if loss_function.reduction == "mean" else 1.0


def fit_blocks(
    model: nn.Module,
    loss_function: nn.Module,
    kinds: dict[nn.Embedding, str],
    data: Iterable[tuple[Any, Tensor]],
    num_data: int,
) -> dict[nn.Embedding, EmbeddingBlock]:
    """K-FAC blocks of the layers ``kinds`` (from ``lookup_kinds``), from one pass over ``data`` (a
    rank's shard: the sums are over this shard, divided by the full ``num_data``)."""
    counts: dict[nn.Embedding, Tensor] = {}
    grams: dict[nn.Embedding, Tensor] = {}
    for column, layer, indices, g in _lookups(model, loss_function, kinds, data):
        flat = g.reshape(-1, g.shape[-1])
        grams[layer] = grams.get(layer, 0) + flat.T @ flat
        if column == 0:
            # Each batch's counts over its own lookups per example S, as curvlinops normalises each batch
            # (sequence lengths may differ between batches); in float64, where float16 would overflow.
            lookups = indices.shape[1]
            if layer.padding_idx is not None:
                indices = indices[indices != layer.padding_idx]
            found = torch.bincount(indices.flatten(), minlength=layer.num_embeddings).double() / lookups
            counts[layer] = counts.get(layer, 0) + found
    scale = _scale(loss_function, num_data)
    return {
        layer: EmbeddingBlock((counts[layer] / num_data).to(layer.weight.dtype), grams[layer] * scale)
        for layer in kinds
    }


def correct_eigenvalues(
    model: nn.Module,
    loss_function: nn.Module,
    kinds: dict[nn.Embedding, str],
    blocks: dict[nn.Embedding, EmbeddingBlock],
    data: Iterable[tuple[Any, Tensor]],
    num_data: int,
) -> None:
    """EK-FAC's corrected eigenvalues of ``blocks`` (their ``basis`` set), from one pass over ``data``."""
    for block in blocks.values():
        block.corrected = torch.zeros(
            len(block.counts), len(block.eigenvectors), dtype=block.counts.dtype, device=block.counts.device
        )
    for _, layer, indices, g in _lookups(model, loss_function, kinds, data):
        block = blocks[layer]
        rotated = g @ block.eigenvectors
        rows = layer.num_embeddings
        # Example n's gradient row v sums its lookups of v: summed per (example, row) key, never as [B, V, D].
        keys = (torch.arange(len(indices), device=indices.device)[:, None] * rows + indices).flatten()
        rotated = rotated.reshape(-1, rotated.shape[-1])
        if layer.padding_idx is not None:
            kept = indices.flatten() != layer.padding_idx
            keys, rotated = keys[kept], rotated[kept]
        unique, position = keys.unique(return_inverse=True)
        summed = torch.zeros(len(unique), rotated.shape[-1], dtype=rotated.dtype, device=rotated.device).index_add_(
            0, position, rotated
        )
        block.corrected.index_add_(0, unique % rows, summed.square())
    scale = _scale(loss_function, num_data)
    for block in blocks.values():
        block.corrected.mul_(scale)


def check_embeddings(model: nn.Module, tracked: Iterable[str], first_derivatives_only: bool) -> None:
    """Refuse, before any work, the embedding options under which attribution would fail with a raw
    torch error or give a wrong number without one.

    ``tracked`` names the parameters the effects go through; ``first_derivatives_only``: the estimator
    needs per-example gradients alone (identity influence), not the second derivatives of the others.

    Raises:
        ValueError: ``max_norm`` anywhere (the forward renormalises the weight in place, which no
            per-example or functional derivative can go through); on a tracked weight, ``scale_grad_by_freq``
            (the backward rescales the gradient, which is then not the loss's derivative: the GGN
            built from it is not symmetric and the effects were 25% off in a user trial), ``sparse``
            (sparse gradients), and ``nn.EmbeddingBag`` unless only first derivatives are needed (torch
            has no forward-mode or double-backward derivative for it).
    """
    tracked = set(tracked)
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
            continue
        kind = type(layer).__name__
        if layer.max_norm is not None:
            raise UnsupportedLayerError(
                f"{name} ({kind}) has max_norm={layer.max_norm}: its forward renormalises the weight in place, which attribution "
                "cannot differentiate. Attribute a module built with max_norm=None (the same function for rows within the norm)."
            )
        if f"{name}.weight" not in tracked:
            continue
        why = (
            "scale_grad_by_freq=True: its backward rescales the gradient, which is then not the loss's derivative"
            if layer.scale_grad_by_freq
            else "sparse=True: its gradient is a sparse tensor"
            if layer.sparse
            else "torch has no forward-mode or double-backward derivative for it"
            if kind == "EmbeddingBag" and not first_derivatives_only
            else None
        )
        if why:
            raise UnsupportedLayerError(
                f"{name} ({kind}) cannot be attributed through: {why}. Influence and Segmented can leave it out (modules= naming "
                "the other submodules, or curvature='ekfac' or 'kfac', which leave it out); Unrolled cannot."
            )
