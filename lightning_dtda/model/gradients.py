"""Per-example gradients with ``torch.func``, streamed in chunks so ``[N, P]`` is never held."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@contextlib.contextmanager
def quiet_batching_rules() -> Iterator[None]:
    """Silence torch's "performance drop because we have not yet implemented the batching rule" warnings
    (attention, transformer layers under ``vmap``): they ask torch's users to file an issue, and say nothing
    about the results, which vmap's fallback loop computes exactly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        yield


class HookCall(nn.Module):
    """Calls ``fn(batch)`` as a module whose child is ``module``, so ``functional_call`` can swap its weights."""

    # functional_call substitutes parameters for a module's forward; wrapping the hook in a module
    # whose child is the user's module lets it substitute them for any hook of that module.
    def __init__(self, module: nn.Module, fn: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(batch)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters attribution differentiates, in ``named_parameters`` order."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def flatten(tensors: dict[str, Tensor] | list[Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate tensors (with ``batch_dims`` leading dimensions kept) into ``[..., P]``."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in values], dim=-1)


def _differentiated(module: nn.Module, wrt: Sequence[str] | None) -> dict[str, Tensor]:
    """The tensors per-example gradients are taken with respect to: the trainable parameters, or the
    parameters and buffers named ``wrt``, in that order."""
    if wrt is None:
        return dict(trainable_parameters(module))
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {k: named[k] for k in wrt}


def per_example_gradients(
    module: nn.Module, fn: Callable[[Any], Tensor], batch: Any, wrt: Sequence[str] | None = None
) -> Tensor:
    """Gradients of ``fn(batch)[b]`` with respect to the trainable parameters (or the parameters and
    buffers named ``wrt``), shape ``[B, P]``.

    ``fn`` maps a batch to one value per example (shape ``[B]``) and is evaluated one example at a
    time under ``vmap``, so the module must not mix examples (use ``eval()`` for BatchNorm).
    """
    wrapper = HookCall(module, fn)
    differentiated = _differentiated(module, wrt)
    names = list(differentiated)
    params = {f"module.{k}": t.detach() for k, t in differentiated.items()}
    # The parameters not differentiated enter as constants: left as they are, the trainable ones would
    # carry an autograd graph into the gradients.
    fixed = {f"module.{k}": v.detach() for k, v in module.named_parameters() if k not in names}

    def value(p: dict[str, Tensor], example: Any) -> Tensor:
        return functional_call(wrapper, {**p, **fixed}, (tree_map(lambda t: t.unsqueeze(0), example),))[0]

    grads = vmap(grad(value), in_dims=(None, 0))(params, batch)
    return flatten(grads, batch_dims=1)


# Rows of [rows, P] vectors handled at once (per-example gradients, vectors through a curvature): each
# step takes several times their size, so a 1M-parameter model's 128 per-example gradients raised the
# peak by 1.6 GB; chunks of 32 cost 10% more time.
CHUNK_BYTES = 2**27


def chunk_rows(row_bytes: int, most: int) -> int:
    """How many rows of ``row_bytes`` each fit in ``CHUNK_BYTES``: at least one, at most ``most``."""
    return max(1, min(most, CHUNK_BYTES // max(1, row_bytes)))


def stream_gradients(
    module: nn.Module,
    fn: Callable[[Any], Tensor],
    data: Dataset,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
    first_index: int = 0,
    wrt: Sequence[str] | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice of positions in data, gradients [chunk, P])`` in order.

    A chunk holds ``batch_size`` examples, or fewer where their gradients would take more than
    ``CHUNK_BYTES``. ``first_index`` is the dataset index of ``data[0]`` (a shard's offset), for
    error messages; ``wrt`` is as for ``per_example_gradients``.

    Raises:
        FloatingPointError: If an example's gradient is not finite; the message names its index.
    """
    row_bytes = sum(t.numel() * t.element_size() for t in _differentiated(module, wrt).values())
    loader = DataLoader(data, batch_size=chunk_rows(row_bytes, batch_size), shuffle=False)
    start = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        g = per_example_gradients(module, fn, move_data_to_device(batch, device), wrt)
        # A row's sum is finite only if every entry is: the full isfinite over [chunk, P] cost more than the
        # gradients themselves on a 1M-parameter CNN, so it only runs to name the examples (a sum that
        # overflows from finite entries is let through there).
        if not torch.isfinite(g.sum(dim=1)).all():
            bad = (~torch.isfinite(g).all(dim=1)).nonzero().flatten()
            if len(bad):
                raise FloatingPointError(
                    f"{desc}: non-finite gradients for examples {(bad + start + first_index).tolist()[:20]}; check "
                    "those examples and the loss at the snapshot's weights."
                )
        yield slice(start, start + len(g)), g
        start += len(g)
