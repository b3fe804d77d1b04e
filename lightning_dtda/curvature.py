"""Curvature backends: fit at one set of weights, then solve ``(C + damping * I) x = v``.

``C`` approximates the Hessian of the mean training loss ``(1/N) sum_n l_n`` by its generalised
Gauss-Newton matrix (positive semi-definite), exactly (``ggn``) or Kronecker-factored
(``kfac``, ``ekfac``, through curvlinops), or not at all (``identity``: ``C = 0``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import Any

import torch
from curvlinops import (
    EKFACLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops._torch_base import PyTorchLinearOperator
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves, tree_map

from lightning_dtda.attention import factorable_attention
from lightning_dtda.distributed import all_reduce_sum
from lightning_dtda.embedding import EmbeddingBlock, correct_eigenvalues, fit_blocks, lookup_kinds
from lightning_dtda.hooks import Hooks, call_model
from lightning_dtda.krylov import conjugate_gradients, lanczos_functions, nystrom, nystrom_preconditioner

CURVATURES = ("ekfac", "kfac", "ggn", "identity")
SOLVERS = ("auto", "dense", "krylov")

# solver="auto": below this many parameters the GGN is built and eigendecomposed (seconds on a CPU);
# above, Krylov methods use matrix products only.
DENSE_GGN_MAX_PARAMS = 4096
# solver="dense" is refused above this: the matrix alone would take 4 GB in float32.
DENSE_GGN_LIMIT = 32768
# Columns per GGN matrix product when building the dense matrix: bounds the memory of the vmap.
_DENSE_COLUMNS = 256


@contextlib.contextmanager
def forward_differentiable_kernels() -> Iterator[None]:
    """GGN products differentiate forwards (``jvp``): torch's fused transformer-layer fast path, which
    eval mode takes, has no forward-mode derivative, and among the attention kernels the math one is
    differentiable in every mode. Both are switched for the products."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class Curvature:
    """Base class: ``solve(vectors [K, P], damping)`` returns ``(C + damping * I)^-1 vectors``, ``[K, P]``."""

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        """What :func:`fit_curvature` needs to rebuild this curvature without the data (``None``: nothing
        worth keeping)."""
        return None


class IdentityCurvature(Curvature):
    """``C = 0``: the solve is ``vectors / damping``, so effects are scaled gradient dot products."""

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        return vectors / damping


class SpectralCurvature(Curvature):
    """A curvature with a known eigenbasis, so any function of it can be applied to vectors.

    ``apply(fn, vectors [K, P])`` returns ``Q fn(eigenvalues) Q^T vectors`` (``fn`` acts elementwise
    on the non-negative eigenvalues); the damped solve is ``fn = 1 / (eigenvalue + damping)``.
    """

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_functions(self, fns: Sequence[Callable[[Tensor], Tensor]], vectors: Tensor) -> list[Tensor]:
        """``[apply(fn, vectors) for fn in fns]``, which a Krylov backend computes in one pass."""
        return [self.apply(fn, vectors) for fn in fns]

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        return self.apply(lambda e: 1.0 / (e + damping), vectors)


class DenseGGN(SpectralCurvature):
    """The exact GGN as a dense matrix, eigendecomposed once; any damping then costs one product."""

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor) -> None:
        self.eigenvalues, self.eigenvectors = eigenvalues, eigenvectors

    @classmethod
    def from_operator(cls, operator: GGNLinearOperator) -> "DenseGGN":
        num_params = operator.shape[0]
        eye = torch.eye(num_params, dtype=operator.dtype, device=operator.device)
        with forward_differentiable_kernels():
            ggn = torch.cat([operator @ eye[:, i : i + _DENSE_COLUMNS] for i in range(0, num_params, _DENSE_COLUMNS)], dim=1)
        all_reduce_sum(ggn)  # each rank summed its shard of the data
        # In float64 whatever the model's precision: a float32 eigenbasis is orthogonal to about 1e-7,
        # which leaks the largest curvatures into the damped solve of the smallest (a user trial: 1e-2
        # relative error at damping 1e-5 on a float32 MLP, 1e-4 at 1e-3, where block CG was 1e-4 and 1e-5).
        eigenvalues, eigenvectors = factor_eigh((ggn + ggn.T) / 2)
        # A PSD matrix's rounding error can give tiny negative eigenvalues; they are zeros.
        return cls(eigenvalues.clamp(min=0.0), eigenvectors)

    def state(self) -> dict[str, Any]:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        q = self.eigenvectors
        return (((vectors.to(q.dtype) @ q) * fn(self.eigenvalues)) @ q.T).to(vectors.dtype)


# Block CG is preconditioned by a Nystrom sketch whose rank is the block's width clamped to
# NYSTROM_RANKS, by default for blocks of at most NYSTROM_MAX_COLUMNS columns (see KrylovGGN).
NYSTROM_RANKS = (16, 64)
NYSTROM_MAX_COLUMNS = 8


class KrylovGGN(SpectralCurvature):
    """The exact GGN through matrix products only, for models of any size.

    ``solve`` runs block conjugate gradients on all vectors at once; ``apply_functions`` (segmented
    unrolling's ``exp(-T C)`` and ``(1 - exp(-T C)) / C``) runs Lanczos. Each iteration is one product
    of the GGN with a ``[P, K]`` block: one pass over the (sub)set of training data. ``reports``
    collects, for every solve, its products, final relative residual and seconds (CG) or its products and
    seconds (Lanczos).

    Preconditioning: a block of at most 8 columns (a few queries, or ``reduce="mean"``) is solved with
    a randomized Nystrom sketch of ``G`` as CG's preconditioner (:func:`~lightning_dtda.krylov.nystrom`;
    rank 16: one product of 16 columns, made once and reused by later solves). It inverts the top of the
    spectrum, which a narrow block's Krylov space takes many products to find: one query on the
    1M-parameter CNN of benchmarks/speed.py (GGN on 200 images, auto damping) took 90 products in 29 s
    plain and 49 + the sketch in 20 s. A wide block spans the top of the spectrum itself within a product
    or two: 50 queries there took 10 products (206 s) plain and 9 after a rank-50 sketch (215 s), so
    wider blocks are solved plain. Memory: the sketch's ``[P, rank]`` float64 basis. K-FAC and EK-FAC,
    the obvious preconditioners, made CG slower on every model measured (1.4-2x the products; they drop
    the cross-layer blocks; benchmarks/krylov.py).

    Args:
        operator: curvlinops' GGN of the mean training loss.
        tolerance: Relative residual at which CG stops, and relative change at which Lanczos stops.
        max_iterations: Products after which either stops; a solve that has not converged by then warns.
        preconditioned: ``None``: as above; ``True``/``False``: always/never, the sketch's rank then the
            first block's width clamped to 16-64.
    """

    def __init__(
        self, operator: PyTorchLinearOperator, tolerance: float = 1e-5, max_iterations: int = 500, progress: bool = False,
        preconditioned: bool | None = None,
    ) -> None:
        self.operator = _SummedOverRanks(operator)
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.progress = progress
        self.preconditioned = preconditioned
        self._sketch: tuple[Tensor, Tensor] | None = None
        self.reports: list[dict[str, Any]] = []

    def matmat(self, columns: Tensor) -> Tensor:
        """The GGN times ``columns [P, K]``, summed over ranks, in ``columns``' dtype.

        The Krylov recurrences pass float64 whatever the model's precision: in float32, block CG loses
        conjugacy and needed 3-18x more products (measured on the digits MLP)."""
        with forward_differentiable_kernels():
            return (self.operator @ columns.to(self.operator.dtype)).to(columns.dtype)

    def solve(self, vectors: Tensor, damping: float) -> Tensor:
        report: dict[str, Any] = {}
        precondition = None
        if self.preconditioned or (self.preconditioned is None and len(vectors) <= NYSTROM_MAX_COLUMNS):
            if self._sketch is None:  # one product, about one CG iteration's cost, reused by later solves
                start = time.perf_counter()
                low, high = NYSTROM_RANKS
                self._sketch = nystrom(self.matmat, self.operator.shape[0], min(max(len(vectors), low), high), device=vectors.device)
                report["nystrom_seconds"] = round(time.perf_counter() - start, 3)
            report["nystrom_rank"] = self._sketch[0].shape[1]
            precondition = nystrom_preconditioner(*self._sketch, damping)
        start = time.perf_counter()
        x, iterations, residual = conjugate_gradients(
            lambda v: self.matmat(v) + damping * v,
            vectors.T.double(),
            precondition,
            tolerance=self.tolerance,
            max_iterations=self.max_iterations,
            progress=self.progress,
            desc="GGN block conjugate gradients",
        )
        self.reports.append(
            {"cg_products": iterations, "cg_residual": residual.max().item(), "cg_seconds": round(time.perf_counter() - start, 3), **report}
        )
        x = x.to(vectors.dtype)
        if residual.max() > 10 * self.tolerance:
            rank_zero_warn(
                f"GGN block conjugate gradients stopped after {iterations} products at relative residual "
                f"{residual.max():.1e} (tolerance {self.tolerance:.0e}); the effects are that inaccurate. Raise the "
                "damping (a small one leaves the system ill-conditioned), or use solver='dense' (up to 32,768 parameters)."
            )
        return x.T

    def apply_functions(self, fns: Sequence[Callable[[Tensor], Tensor]], vectors: Tensor) -> list[Tensor]:
        start = time.perf_counter()
        results, products = lanczos_functions(
            self.matmat, vectors.T.double(), fns, self.tolerance, self.max_iterations, self.progress, "GGN Lanczos"
        )
        self.reports.append({"lanczos_products": products, "lanczos_seconds": round(time.perf_counter() - start, 3)})
        if products >= 2 * self.max_iterations - 1:
            rank_zero_warn(f"GGN Lanczos stopped after {self.max_iterations} iterations before converging; raise max_iterations.")
        return [r.T.to(vectors.dtype) for r in results]

    def apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        return self.apply_functions([fn], vectors)[0]


class _SummedOverRanks(PyTorchLinearOperator):
    """A curvature operator on this rank's shard of the data, summed over ranks at every product."""

    def __init__(self, operator: PyTorchLinearOperator) -> None:
        super().__init__(operator._in_shape, operator._out_shape)
        self.operator = operator

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        return [all_reduce_sum(t) for t in self.operator._matmat(M)]

    def _adjoint(self) -> "_SummedOverRanks":
        return self

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype


def factor_eigh(factor: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric Kronecker factor, in float64.

    LAPACK's divide-and-conquer ``eigh`` can fail to converge even in float64 on a factor with many
    (numerically) repeated eigenvalues: it did on the 4,097-square input factor of the 1M-parameter
    CNN of benchmarks/speed.py (rank-deficient after ReLU and pooling), whose eigenvalues alone it
    computes. A diagonal jitter of 1e-14 times the largest diagonal entry splits the repeated
    eigenvalues, and the decomposition then holds for the factor itself to about that relative error.
    """
    matrix = factor.double()
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        scale = 1e-14 * matrix.diagonal().abs().max()
        jitter = torch.rand(len(matrix), generator=torch.Generator().manual_seed(0), dtype=matrix.dtype).to(matrix.device)
        return torch.linalg.eigh(matrix + torch.diag(scale * jitter))


class _KFACInverse(KFACInverseLinearOperator):
    """curvlinops' damped K-FAC inverse with the factors eigendecomposed in float64: float32 ``eigh``
    fails to converge on the rank-deficient factors of ReLU/pooling CNNs (measured on the 1M-parameter
    CNN of benchmarks/speed.py), as in EK-FAC (see ``_eigendecompose_factors``)."""

    def _compute_factors_eigendecomposition(self, aaT: Tensor | None, ggT: Tensor | None) -> tuple[Any, Any]:
        def eigh(factor: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if factor is None:
                return None, None
            values, vectors = factor_eigh(factor)
            return values.to(factor.dtype), vectors.to(factor.dtype)

        return eigh(aaT), eigh(ggT)


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

    def __init__(self, operator: KFACLinearOperator | None, sizes: Sequence[int], blocks: dict[int, tuple[str, EmbeddingBlock]]) -> None:
        self.operator, self.sizes, self.blocks = operator, list(sizes), blocks
        self._inverse: _KFACInverse | None = None

    def _blockwise(self, vectors: Tensor, by_operator: Callable[[Tensor], Tensor], by_block: Callable[[EmbeddingBlock, Tensor], Tensor]) -> Tensor:
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
            vectors, lambda v: self._operator_solve(v, damping), lambda block, v: block.apply(lambda e: 1.0 / (e + damping), v, self.corrected)
        )

    def _operator_solve(self, vectors: Tensor, damping: float) -> Tensor:
        # Exact damping inverts (K + damping * I); damping each Kronecker factor would invert another matrix.
        # It works in the factors' eigenbases, which the operator caches whatever the damping, so one
        # operator serves every damping (fit_damping tries 13): only its damping is set per call.
        if self._inverse is None:
            self._inverse = _KFACInverse(self.operator, damping=damping, use_exact_damping=True)
        self._inverse._damping = damping
        return (self._inverse @ vectors.T).T

    def state(self) -> dict[str, Any]:
        # Enum settings as their string values: the cache stores non-tensor settings as JSON.
        state = {} if self.operator is None else {k: v.value if isinstance(v, Enum) else v for k, v in self.operator.state_dict().items()}
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
        return self._blockwise(vectors, lambda v: self._operator_apply(fn, v), lambda block, v: block.apply(fn, v, corrected=True))

    def _operator_apply(self, fn: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        op = self.operator
        op._maybe_compute_ekfac()
        # curvlinops 3.0 multiplies by Q diag(corrected eigenvalues) Q^T; substituting fn(eigenvalues)
        # for the eigenvalues multiplies by fn(EK-FAC) (internal attributes; the 3.0 series is pinned).
        original = op._corrected_eigenvalues
        op._corrected_eigenvalues = tree_map(lambda e: fn(e.clamp(min=0.0)), original)
        try:
            return (op @ vectors.T).T
        finally:
            op._corrected_eigenvalues = original


# Candidate dampings of fit_damping, as multiples of the exact GGN's damping (half decades).
DAMPING_GRID = tuple(10 ** (k / 2) for k in range(-4, 9))


def fit_damping(approximate: Curvature, ggn: KrylovGGN, vectors: Tensor, damping: float) -> tuple[float, list[float]]:
    """The damping under which ``approximate``'s damped solves point most nearly the way of the exact ones.

    With the exact damped GGN ``A = G + damping I``, each vector ``g`` (a query gradient) and its
    approximate solve ``x(lam) = (K + lam I)^-1 g``, the criterion is

        E(lam) = - sum_g (g^T x)^2 / (2 x^T A x) = - sum_g |x*|_A^2 cos_A(x, x*)^2 / 2,

    ``x* = A^-1 g`` (since ``g^T x = x*^T A x``): the energy error of ``x`` at its best scale, so it
    needs one GGN product and no exact solve. Scale is left out because rankings do not depend on it,
    and with it in, the criterion prefers large dampings that shrink every wrong direction (measured:
    on the digits benchmark that chose 10x the GGN damping and scored 0.16 Spearman against 0.39).

    Args:
        approximate: K-FAC or EK-FAC.
        ggn: The exact GGN at the same weights, for its products.
        vectors: ``[K, P]`` probe vectors.
        damping: The exact GGN's damping (the ``"auto"`` rule).

    Returns:
        The candidate ``damping * DAMPING_GRID`` with the smallest ``E``, and every candidate's ``E``.
    """
    candidates = [damping * factor for factor in DAMPING_GRID]
    g = vectors.double()
    totals = []
    for lam in candidates:  # one product per candidate bounds the memory of the GGN's vmap
        x = approximate.solve(vectors, lam).double()
        ax = ggn.matmat(x.T).T + damping * x
        totals.append((-0.5 * (g * x).sum(1) ** 2 / (x * ax).sum(1)).sum().item())
    return candidates[min(range(len(candidates)), key=totals.__getitem__)], totals


# The layers curvlinops 3.0.1 has Kronecker factors for.
KFAC_LAYERS = (nn.Linear, nn.Conv2d)


def check_modules(modules: Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate an estimator's ``modules`` setting; a list becomes a tuple (the dataclasses are frozen)."""
    if modules is None:
        return None
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules) or not modules:
        raise ValueError(f"modules must be None or a non-empty list of submodule names (as in model.named_modules()), got {modules!r}.")
    return tuple(modules)


def parameter_holders(model: nn.Module) -> dict[int, dict[str, nn.Module]]:
    """For each parameter (by ``id``), the modules that hold it directly, by name: more than one for a
    weight two modules share (a head tied to an embedding)."""
    holders: dict[int, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), {})[name] = module
    return holders


def tracked_parameters(model: nn.Module, kind: str, modules: Sequence[str] | None, batch: Any) -> list[str]:
    """Names of the trainable parameters curvature ``kind`` attributes through, in ``named_parameters`` order.

    ``modules`` names submodules (as ``model.named_modules()`` does; ``None``: the whole model), whose
    trainable parameters are tracked. ``"kfac"`` and ``"ekfac"`` keep only those of the ``nn.Linear``,
    ``nn.Conv2d`` and ``nn.Embedding`` layers among them that the forward on ``batch``'s inputs calls as
    modules: curvlinops has factors for the first two only, and collects a layer's factors from its forward
    call; embeddings have blocks of ours (see ``embedding``, which says which lookups qualify).
    Self-attention in ``nn.MultiheadAttention`` is called through layers for this (see ``attention``).

    Raises:
        ValueError: For a name that is no submodule, a named module without a tracked parameter, or no
            parameter tracked at all.
    """
    submodules = dict(model.named_modules())
    unknown = [name for name in modules or () if name not in submodules]
    if unknown:
        raise ValueError(
            f"modules names {unknown}, which {type(model).__name__} does not have; names are those of model.named_modules(), "
            f"e.g. {[name for name in submodules if name][:8]}."
        )
    roots = [""] if modules is None else list(modules)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    inside = {root: [n for n in trainable if not root or n.startswith(root + ".")] for root in roots}
    if kind in ("kfac", "ekfac"):
        called: list[nn.Module] = []
        inputs = Hooks(model).inputs_targets(batch)[0]
        with factorable_attention(model):
            handles = [layer.register_forward_hook(lambda layer, *_: called.append(layer)) for layer in model.modules() if isinstance(layer, KFAC_LAYERS)]
            try:
                with torch.no_grad(), forward_differentiable_kernels():  # the fused fast path calls no submodule
                    call_model(model, inputs)
                    tables = lookup_kinds(model, inputs)
            finally:
                for handle in handles:
                    handle.remove()
        # A parameter is factored if a called layer holds it and no other kind of layer does (a tied
        # embedding's block would leave out its use as an output layer, and the other way round);
        # attention holds the projection that factorable_attention calls. An embedding's weight is
        # factored if that embedding alone holds it.
        holders = {key: list(found.values()) for key, found in parameter_holders(model).items()}
        factored = {
            id(p) for layer in called for p in layer.parameters(recurse=False)
            if all(isinstance(holder, (*KFAC_LAYERS, nn.MultiheadAttention)) for holder in holders[id(p)])
        }
        factored |= {id(layer.weight) for layer in tables if layer.weight.requires_grad and holders[id(layer.weight)] == [layer]}
        named = dict(model.named_parameters())
        inside = {root: [n for n in names if id(named[n]) in factored] for root, names in inside.items()}
    empty = [root for root, names in inside.items() if not names]
    if modules is not None and empty:
        layers = "nn.Linear, nn.Conv2d, nn.Embedding or self-attention layers the forward calls" if kind in ("kfac", "ekfac") else "trainable parameters"
        hint = "name others, or use curvature='ggn' (any layer)" if kind in ("kfac", "ekfac") else "name others"
        raise ValueError(
            f"curvature={kind!r}: modules {empty} hold no {layers}; {hint}. (A weight two modules share, such as a head tied to "
            "an embedding, is named after its first holder in named_parameters(), and K-FAC leaves it out: no one block sees both uses.)"
        )
    chosen = {n for names in inside.values() for n in names}
    if not chosen:
        raise ValueError(
            f"curvature={kind!r} found no trainable nn.Linear, nn.Conv2d, nn.Embedding or self-attention layer that the forward calls in "
            f"{type(model).__name__}; use curvature='ggn' (exact, any layer)."
        )
    return [n for n in trainable if n in chosen]


def describe_tracked(model: nn.Module, names: Sequence[str]) -> str:
    """One line: how many parameters are tracked, in which layers, and which layers are left out."""
    params = dict(model.named_parameters())
    left = [n for n, p in params.items() if p.requires_grad and n not in names]

    holders = parameter_holders(model)

    def layers(of: Sequence[str]) -> str:
        parts = []
        for owner in dict.fromkeys(n.rpartition(".")[0] for n in of):
            if owner:
                # A weight other modules hold too (a head tied to an embedding) is named after its first holder.
                shared = sorted({h for n in of if n.rpartition(".")[0] == owner for h in holders[id(params[n])]} - {owner})
                tied = f", its weight shared with {', '.join(shared)}" if shared else ""
                parts.append(f"{owner} ({type(model.get_submodule(owner)).__name__}{tied})")
            else:  # parameters of the model itself (a learned positional table, say): named one by one
                parts += [f"{n} (a parameter of {type(model).__name__})" for n in of if "." not in n]
        return ", ".join(parts)

    size = sum(params[n].numel() for n in names)
    total = size + sum(params[n].numel() for n in left)
    return (
        f"{size:,} of {total:,} trainable weights ({len(names)} of {len(names) + len(left)} tensors), in {layers(names)}; "
        f"left out: {layers(left)}. Effects are those through the tracked weights only, as if the others were frozen."
    )


def fit_curvature(
    kind: str,
    model: nn.Module,
    loss_function: nn.Module,
    params: list[nn.Parameter],
    data: Iterable[tuple[Tensor, Tensor]],
    num_data: int,
    progress: bool = False,
    state: dict[str, Any] | None = None,
    solver: str = "auto",
) -> Curvature:
    """Fit curvature ``kind`` for ``loss_function(model(X), y)`` averaged over ``data`` at the current weights.

    Under torch.distributed, ``data`` is this rank's shard and ``num_data`` the full training set's
    size; the statistics are summed over ranks (see ``distributed``).

    Args:
        kind: One of ``"ekfac"``, ``"kfac"``, ``"ggn"``, ``"identity"``.
        model: Maps inputs ``X`` to outputs; in eval mode (the data pass must be deterministic).
        loss_function: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``, reduction ``"mean"``.
        params: The trainable parameters, in the order vectors are flattened.
        data: Re-iterable ``(X, y)`` batches covering the whole training set once.
        num_data: Number of training examples ``N``.
        progress: Show curvlinops' progress bars for the K-FAC factor passes.
        state: A fitted curvature's :meth:`Curvature.state` (cached on disk): rebuild from it, with no
            pass over the data.
        solver: For ``"ggn"``: ``"dense"`` (build and eigendecompose), ``"krylov"`` (matrix products
            only: :class:`KrylovGGN`) or ``"auto"`` (dense up to ``DENSE_GGN_MAX_PARAMS`` parameters).
    """
    if kind == "identity":
        return IdentityCurvature()
    model, data = _as_curvlinops_takes_them(model, loss_function, data)
    # Determinism is checked by eval mode instead of curvlinops' probe, which costs two extra data passes.
    common = dict(check_deterministic=False, num_data=num_data, batch_size_fn=_batch_size)
    if kind == "ggn":
        # No progress bar here: curvlinops would draw one per matrix product, hundreds under CG.
        if state is not None:
            return DenseGGN(state["eigenvalues"], state["eigenvectors"])
        operator = GGNLinearOperator(model, loss_function, params, data, progressbar=False, **common)
        if dense_ggn(solver, operator.shape[0]):
            return DenseGGN.from_operator(operator)
        return KrylovGGN(operator, progress=progress)
    if kind in ("kfac", "ekfac"):
        # The operator finds its layers when it is built and collects factors in the data passes.
        with factorable_attention(model), forward_differentiable_kernels():
            return _fit_kfac(kind, model, loss_function, params, data, progress, state, common)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}.")


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
    tables = {i: holders[id(p)] for i, p in enumerate(params) if any(type(h) is nn.Embedding for h in holders.get(id(p), ()))}
    kinds = lookup_kinds(model, next(iter(data))[0], lambda m, x: m(x)) if tables else {}
    wrong = [layers for layers in tables.values() if len(layers) > 1 or layers[0] not in kinds]
    if wrong:
        raise ValueError(
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
            model, loss_function, others, data, fisher_type="type-2", separate_weight_and_bias=False, progressbar=progress,
            num_per_example_loss_terms=_loss_terms_per_example(loss_function, data), **common,
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
            operator.compute_kronecker_factors()
            for factors in (operator._input_covariances, operator._gradient_covariances):
                tree_map(all_reduce_sum, factors)
        blocks = fit_blocks(model, loss_function, embedding_kinds, data, common["num_data"])
        for block in blocks.values():
            for factor in (block.counts, block.gradient_covariance):
                all_reduce_sum(factor)
    for block in blocks.values():
        block.basis(factor_eigh)
    if kind == "ekfac" and state is None:
        if operator is not None:
            _eigendecompose_factors(operator)
            operator.compute_eigenvalue_correction()
            tree_map(all_reduce_sum, operator._corrected_eigenvalues)
        if blocks:
            correct_eigenvalues(model, loss_function, embedding_kinds, blocks, data, common["num_data"])
            for block in blocks.values():
                all_reduce_sum(block.corrected)
    return wrap(operator, [p.numel() for p in params], {i: (names[layer], blocks[layer]) for i, layer in layers.items()})


class _Called(nn.Module):
    """The model called as the hooks call it (``model(**inputs)`` for a dict), its ``[B]`` outputs made
    ``[B, 1]``: curvlinops calls ``model(X)``, and its K-FAC needs a class dimension."""

    def __init__(self, model: nn.Module, column: bool) -> None:
        super().__init__()
        self.model, self.column = model, column

    def forward(self, inputs: Any) -> Tensor:
        outputs = call_model(self.model, inputs)
        return outputs.unsqueeze(-1) if self.column else outputs


class _ColumnTargets:
    """Re-iterable ``(X, y)`` batches with ``y`` made ``[B, 1]``, to go with :class:`_Called`'s outputs."""

    def __init__(self, data: Iterable[tuple[Any, Tensor]]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for inputs, targets in self.data:
            yield inputs, targets.unsqueeze(-1)


def _as_curvlinops_takes_them(
    model: nn.Module, loss_function: nn.Module, data: Iterable[tuple[Any, Tensor]]
) -> tuple[nn.Module, Iterable[tuple[Any, Tensor]]]:
    # [B] outputs against [B] targets: the same mean squared error or binary cross-entropy as [B, 1]
    # against [B, 1] (the hooks refuse shapes that would broadcast).
    inputs, _ = next(iter(data))
    with torch.no_grad(), forward_differentiable_kernels():
        column = _Called(model, False)(inputs).ndim == 1 and not isinstance(loss_function, nn.CrossEntropyLoss)
    if isinstance(inputs, Tensor) and not column:
        return model, data  # as it is: cached K-FAC states name the model's own layers
    return _Called(model, column), _ColumnTargets(data) if column else data


def _batch_size(inputs: Any) -> int:
    # curvlinops reads X.shape[0]; inputs may be a dict or a tuple of tensors.
    return next(t for t in tree_leaves(inputs) if isinstance(t, Tensor)).shape[0]


def _check_kfac_loss(model: nn.Module, loss_function: nn.Module, data: Iterable[tuple[Tensor, Tensor]], kind: str) -> None:
    """Refuse what curvlinops' K-FAC would get wrong without a word: it builds the loss's Hessian from the
    softmax or sigmoid alone (class weights, pos_weight and label smoothing are left out), and its
    factors need outputs ``[B, C]``."""
    options = {name: getattr(loss_function, name, None) for name in ("weight", "pos_weight")}
    options["label_smoothing"] = getattr(loss_function, "label_smoothing", 0.0) or None
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(
            f"curvature={kind!r}: curvlinops' K-FAC leaves out the loss's {', '.join(given)}, so its curvature would be "
            f"another loss's. Use curvature='ggn' (exact), which takes {type(loss_function).__name__} as it is."
        )
    inputs, _ = next(iter(data))
    with torch.no_grad():
        ndim = model(inputs).ndim
    if ndim != 2:
        raise ValueError(
            f"curvature={kind!r} needs model outputs of shape [B, C]; this model returns {ndim}-d outputs. Use "
            "curvature='ggn' (any shape)."
        )


def _eigendecompose_factors(operator: EKFACLinearOperator) -> None:
    # What curvlinops' EKFAC does before its eigenvalue correction, but in float64: float32 eigh fails
    # to converge on the rank-deficient input factors of ReLU/pooling layers (measured on a 1M-parameter
    # CNN of benchmarks/speed.py).
    for name in operator._mapping:
        for source, destination in (
            (operator._input_covariances, operator._input_covariances_eigenvectors),
            (operator._gradient_covariances, operator._gradient_covariances_eigenvectors),
        ):
            factor = source.pop(name, None)
            if factor is not None:
                destination[name] = factor_eigh(factor)[1].to(factor.dtype)


def _loss_terms_per_example(loss_function: nn.Module, data: Iterable[tuple[Tensor, Tensor]]) -> int:
    # Given, curvlinops would count loss terms with an extra pass and divide by num_data, which fails
    # when this rank holds only a shard; one batch tells the terms per example.
    inputs, targets = next(iter(data))
    terms = targets.numel() if isinstance(loss_function, nn.CrossEntropyLoss) else targets.shape[:-1].numel()
    return max(1, terms // len(targets))


def check_solver(kind: str, solver: str, subset: int | None) -> None:
    """Validate an estimator's ``solver`` and ``curvature_subset`` for curvature ``kind``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if solver != "auto" and kind != "ggn":
        raise ValueError(f"solver={solver!r} chooses how curvature='ggn' is solved; curvature={kind!r} has one way. Leave solver='auto'.")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"curvature_subset must be None or a positive integer, got {subset!r}.")


def dense_ggn(solver: str, num_params: int) -> bool:
    """Whether ``solver`` builds the GGN of ``num_params`` parameters densely.

    Raises:
        ValueError: For an unknown solver, or ``"dense"`` above ``DENSE_GGN_LIMIT`` parameters.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if solver == "dense" and num_params > DENSE_GGN_LIMIT:
        raise ValueError(
            f"solver='dense' builds a {num_params} x {num_params} GGN; above {DENSE_GGN_LIMIT} parameters that is "
            "refused. Use solver='krylov'."
        )
    return solver == "dense" or (solver == "auto" and num_params <= DENSE_GGN_MAX_PARAMS)


def check_spectral(kind: str) -> None:
    """Refuse a backend without an eigenbasis or Krylov functions: :func:`fit_curvature` gives a
    :class:`SpectralCurvature` for ``"ekfac"`` and ``"ggn"``.

    Raises:
        ValueError: For another backend.
    """
    if kind not in ("ekfac", "ggn"):
        raise ValueError(f"This estimator needs functions of the curvature: use curvature='ekfac' or 'ggn', not {kind!r}.")
