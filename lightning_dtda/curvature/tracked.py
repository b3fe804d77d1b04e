"""Which parameters a curvature attributes through, and the line that tells the user."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_dtda.curvature.attention import factorable_attention
from lightning_dtda.curvature.base import forward_differentiable_kernels
from lightning_dtda.curvature.embedding import lookup_kinds
from lightning_dtda.errors import UnsupportedLayerError
from lightning_dtda.hooks import Hooks, call_model

# The layers curvlinops 3.0.1 has Kronecker factors for.
KFAC_LAYERS = (nn.Linear, nn.Conv2d)


def check_modules(modules: Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate an estimator's ``modules`` setting; a list becomes a tuple (the dataclasses are frozen)."""
    if modules is None:
        return None
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules) or not modules:
        raise ValueError(
            f"modules must be None or a non-empty list of submodule names (as in model.named_modules()), got {modules!r}."
        )
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
            handles = [
                layer.register_forward_hook(lambda layer, *_: called.append(layer))
                for layer in model.modules()
                if isinstance(layer, KFAC_LAYERS)
            ]
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
            id(p)
            for layer in called
            for p in layer.parameters(recurse=False)
            if all(isinstance(holder, (*KFAC_LAYERS, nn.MultiheadAttention)) for holder in holders[id(p)])
        }
        factored |= {
            id(layer.weight) for layer in tables if layer.weight.requires_grad and holders[id(layer.weight)] == [layer]
        }
        named = dict(model.named_parameters())
        inside = {root: [n for n in names if id(named[n]) in factored] for root, names in inside.items()}
    empty = [root for root, names in inside.items() if not names]
    if modules is not None and empty:
        layers = (
            "nn.Linear, nn.Conv2d, nn.Embedding or self-attention layers the forward calls"
            if kind in ("kfac", "ekfac")
            else "trainable parameters"
        )
        hint = "name others, or use curvature='ggn' (any layer)" if kind in ("kfac", "ekfac") else "name others"
        raise UnsupportedLayerError(
            f"curvature={kind!r}: modules {empty} hold no {layers}; {hint}. (A weight two modules share, such as a head tied to "
            "an embedding, is named after its first holder in named_parameters(), and K-FAC leaves it out: no one block sees both uses.)"
        )
    chosen = {n for names in inside.values() for n in names}
    if not chosen:
        raise UnsupportedLayerError(
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
                shared = sorted(
                    {h for n in of if n.rpartition(".")[0] == owner for h in holders[id(params[n])]} - {owner}
                )
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
