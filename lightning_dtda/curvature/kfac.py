"""K-FAC and EK-FAC of the type-2 Fisher (the GGN's Kronecker factorisation), inverted with exact damping."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import Any

import torch
from curvlinops import (
    EKFACLinearOperator,
    KFACLinearOperator,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_dtda.curvature._curvlinops import (
    KFACInverse,
    collect_corrected_eigenvalues,
    collect_factors,
    eigendecompose_factors,
    sum_corrected_eigenvalues,
    sum_factors,
    with_eigenvalue_function,
)
from lightning_dtda.curvature.base import Curvature, SpectralCurvature, factor_eigh
from lightning_dtda.curvature.embedding import EmbeddingBlock, correct_eigenvalues, fit_blocks, lookup_kinds
from lightning_dtda.curvature.tracked import parameter_holders
from lightning_dtda.errors import UnsupportedLayerError
from lightning_dtda.model.gradients import chunk_rows
from lightning_dtda.sharding import all_reduce_sum


class KFAC(Curvature):
    """K-FAC of the type-2 (exact-GGN) Fisher, inverted with exact damping: block-diagonal over layers,
    curvlinops' blocks for the ``nn.Linear``/``nn.Conv2d`` parameters and ours for ``nn.Embedding`` weights
    (see ``embedding``).

    Args:
        operator: curvlinops' operator on the parameters that are no embedding weights (``None``: none).
        sizes: Every parameter's number of entries, in the order vectors are flattened.
        blocks: Embedding blocks by their parameter's position in that order, with their layer's name.
    """

    corrected = False  # EK-FAC's eigenvalues, or K-FAC's products of the factors' eigenvalues

    def __init__(
        self, operator: KFACLinearOperator | None, sizes: Sequence[int], blocks: dict[int, tuple[str, EmbeddingBlock]]
    ) -> None:
        self.operator, self.sizes, self.blocks = operator, list(sizes), blocks
        self._inverse: KFACInverse | None = None

    def _blockwise(
        self,
        vectors: Tensor,
        by_operator: Callable[[Tensor], Tensor],
        by_block: Callable[[EmbeddingBlock, Tensor], Tensor],
    ) -> Tensor:
        """``vectors [K, P]`` mapped block by block: the operator's parameters together, each embedding alone."""
        pieces = list(vectors.split(self.sizes, dim=1))
        rest = [i for i in range(len(pieces)) if i not in self.blocks]
        if rest:
            done = by_operator(torch.cat([pieces[i] for i in rest], dim=1)).split([self.sizes[i] for i in rest], dim=1)
            for i, piece in zip(rest, done):
                pieces[i] = piece
        for i, (_, block) in self.blocks.items():
            pieces[i] = by_block(block, pieces[i])
        return torch.cat(pieces, dim=1)

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        return self._blockwise(
            vectors,
            lambda v: self._operator_solve(v, damping),
            lambda block, v: block.apply(lambda e: 1.0 / (e + damping), v, self.corrected),
        )

    def _operator_solve(self, vectors: Tensor, damping: float) -> Tensor:
        # Exact damping inverts (K + damping * I); damping each Kronecker factor would invert another matrix.
        # It works in the factors' eigenbases, which the operator caches whatever the damping, so one
        # operator serves every damping (fit_damping tries 13): only its damping is set per call.
        if self._inverse is None:
            self._inverse = KFACInverse(self.operator, factor_eigh, damping)
        self._inverse.set_damping(damping)
        return _by_chunks(lambda chunk: (self._inverse @ chunk.T).T, vectors)

    def state(self) -> dict[str, Any]:
        # Enum settings as their string values: the cache stores non-tensor settings as JSON.
        state = (
            {}
            if self.operator is None
            else {k: v.value if isinstance(v, Enum) else v for k, v in self.operator.state_dict().items()}
        )
        if self.blocks:
            state[_EMBEDDING_BLOCKS] = {name: block.state() for name, block in self.blocks.values()}
        return state


_EMBEDDING_BLOCKS = "embedding_blocks"


class EKFAC(KFAC, SpectralCurvature):
    """EK-FAC, whose eigenbasis (Kronecker products of the factors' eigenvectors) and corrected
    eigenvalues make any spectral function cheap; the damped solve stays curvlinops' exact one."""

    corrected = True
    solve = KFAC.solve

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        return self._blockwise(
            vectors, lambda v: self._operator_apply(fn, v), lambda block, v: block.apply(fn, v, corrected=True)
        )

    def _operator_apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        with with_eigenvalue_function(self.operator, fn):
            return _by_chunks(lambda chunk: (self.operator @ chunk.T).T, vectors)


def _by_chunks(fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
    """``fn(vectors [K, P])`` a chunk of rows at a time: curvlinops holds several copies of what it multiplies
    (1.5 GB for 50 vectors of a 1M-parameter CNN)."""
    rows = chunk_rows(vectors.shape[1] * vectors.element_size(), len(vectors))
    return torch.cat([fn(chunk) for chunk in vectors.split(rows)]) if len(vectors) else fn(vectors)


class _DataPasses:
    """Re-iterable ``data`` whose every pass shows one progress bar of ours."""

    def __init__(self, data: Iterable[tuple[Any, Tensor]], desc: str, progress: bool) -> None:
        self.data, self.desc, self.progress = data, desc, progress

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        total = len(self.data) if hasattr(self.data, "__len__") else None  # type: ignore[arg-type]
        return iter(tqdm(self.data, desc=self.desc, total=total, disable=not self.progress, leave=False))


def _fit_kfac(
    kind: str,
    model: nn.Module,
    loss_function: nn.Module,
    params: list[nn.Parameter],
    data: Iterable[tuple[Any, Tensor]],
    progress: bool,
    state: dict[str, Any] | None,
    common: dict[str, Any],
) -> KFAC:
    _check_kfac_loss(model, loss_function, data, kind)
    holders = {key: list(found.values()) for key, found in parameter_holders(model).items()}
    tables = {
        i: holders[id(p)] for i, p in enumerate(params) if any(type(h) is nn.Embedding for h in holders.get(id(p), ()))
    }
    kinds = lookup_kinds(model, next(iter(data))[0], lambda m, x: m(x)) if tables else {}
    wrong = [layers for layers in tables.values() if len(layers) > 1 or layers[0] not in kinds]
    if wrong:
        raise UnsupportedLayerError(
            f"curvature={kind!r} has no block for the weight of {wrong[0]}: it is held by another layer too (tied), or looked up "
            "neither per example nor the same for every example, or with max_norm, scale_grad_by_freq or sparse. Leave it out "
            "(tracked_parameters does) or use curvature='ggn'."
        )
    layers = {i: found[0] for i, found in tables.items()}
    names = {layer: name for name, layer in model.named_modules()}
    others = [p for i, p in enumerate(params) if i not in layers]
    operator = None
    if others:
        cls = EKFACLinearOperator if kind == "ekfac" else KFACLinearOperator
        # type-2 is the exact GGN's factorisation (curvlinops defaults to a one-sample Monte Carlo
        # Fisher); weight and bias share one factor, which makes K-FAC exact for a single linear layer.
        operator = cls(
            model,
            loss_function,
            others,
            _DataPasses(data, f"{kind} data pass", progress),
            fisher_type="type-2",
            separate_weight_and_bias=False,
            # curvlinops' own bars would nest inside ours, one per internal stage: ours counts the passes.
            progressbar=False,
            num_per_example_loss_terms=_loss_terms_per_example(loss_function, data),
            **common,
        )
    embedding_kinds = {layer: kinds[layer] for layer in layers.values()}
    wrap = EKFAC if kind == "ekfac" else KFAC
    if state is not None:
        state = dict(state)
        saved = state.pop(_EMBEDDING_BLOCKS, {})
        if operator is not None:
            operator.load_state_dict(state)
        blocks = {layer: EmbeddingBlock(**saved[names[layer]]) for layer in embedding_kinds}
    else:
        # Factors are sums over the data divided by num_data, so summing each rank's shard gives the
        # full factors; EK-FAC's eigenvalue correction is such a sum too, in the summed factors' basis.
        if operator is not None:
            collect_factors(operator)
            sum_factors(operator)
        blocks = fit_blocks(model, loss_function, embedding_kinds, data, common["num_data"])
        for block in blocks.values():
            for factor in (block.counts, block.gradient_covariance):
                all_reduce_sum(factor)
    for block in blocks.values():
        block.basis(factor_eigh)
    if kind == "ekfac" and state is None:
        if operator is not None:
            eigendecompose_factors(operator, factor_eigh)
            collect_corrected_eigenvalues(operator)
            sum_corrected_eigenvalues(operator)
        if blocks:
            correct_eigenvalues(model, loss_function, embedding_kinds, blocks, data, common["num_data"])
            for block in blocks.values():
                all_reduce_sum(block.corrected)
    return wrap(
        operator, [p.numel() for p in params], {i: (names[layer], blocks[layer]) for i, layer in layers.items()}
    )


def _check_kfac_loss(
    model: nn.Module, loss_function: nn.Module, data: Iterable[tuple[Tensor, Tensor]], kind: str
) -> None:
    """Refuse what curvlinops' K-FAC would get wrong without a word: it builds the loss's Hessian from the
    softmax or sigmoid alone (class weights, pos_weight and label smoothing are left out), and its
    factors need outputs ``[B, C]``."""
    options = {name: getattr(loss_function, name, None) for name in ("weight", "pos_weight")}
    options["label_smoothing"] = getattr(loss_function, "label_smoothing", 0.0) or None
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise UnsupportedLayerError(
            f"curvature={kind!r}: curvlinops' K-FAC leaves out the loss's {', '.join(given)}, so its curvature would be "
            f"another loss's. Use curvature='ggn' (exact), which takes {type(loss_function).__name__} as it is."
        )
    inputs, _ = next(iter(data))
    with torch.no_grad():
        ndim = model(inputs).ndim
    if ndim != 2:
        raise UnsupportedLayerError(
            f"curvature={kind!r} needs model outputs of shape [B, C]; this model returns {ndim}-d outputs. Use "
            "curvature='ggn' (any shape)."
        )


def _loss_terms_per_example(loss_function: nn.Module, data: Iterable[tuple[Tensor, Tensor]]) -> int:
    # Given, curvlinops would count loss terms with an extra pass and divide by num_data, which fails
    # when this rank holds only a shard; one batch tells the terms per example.
    inputs, targets = next(iter(data))
    terms = targets.numel() if isinstance(loss_function, nn.CrossEntropyLoss) else targets.shape[:-1].numel()
    return max(1, terms // len(targets))
