"""``nn.MultiheadAttention`` with its projections called as ``nn.Linear`` layers, so K-FAC can factor them.

``nn.MultiheadAttention`` multiplies by ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward`` without calling a layer, and curvlinops collects a layer's
Kronecker factors from hooks on its forward call: attention, which carries much of a transformer's
influence (README, "Tracked parameters"), would be left out. Inside ``factorable_attention``, each
self-attention computes the same function through an ``nn.Linear`` that holds the very
``in_proj_weight``/``in_proj_bias`` parameters (the fused query/key/value projection: one Kronecker
block) and through a call of ``out_proj``. Calls it does not reproduce (cross-attention, separate key and
value sizes, ``bias_k``, ``add_zero_attn``, dropout in training, unbatched inputs) go to torch's own
forward, so their projections are not called and stay untracked.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_IN_PROJ = "_dtda_in_proj"


def _reproducible(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> bool:
    return (
        query is key
        and key is value
        and query.ndim == 3
        and self._qkv_same_embed_dim
        and self.bias_k is None
        and not self.add_zero_attn
        and not (self.training and self.dropout > 0)
    )


def _forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    if not _reproducible(self, query, key, value):
        return type(self).forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    x = query if self.batch_first else query.transpose(0, 1)  # [N, L, E]
    n, length, embed = x.shape
    heads = self.num_heads
    q, k, v = (
        t.reshape(n, length, heads, embed // heads).transpose(1, 2) for t in getattr(self, _IN_PROJ)(x).chunk(3, dim=-1)
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(embed // heads)  # [N, H, L, L]
    if (
        attn_mask is None and is_causal
    ):  # torch's is_causal is a hint that attn_mask is causal; alone it means that mask
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    for mask, shape in (
        (attn_mask, (-1, heads, length, length) if attn_mask is not None and attn_mask.ndim == 3 else None),
        (key_padding_mask, (n, 1, 1, length)),
    ):
        if mask is None:
            continue
        mask = mask.reshape(shape) if shape is not None else mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    weights = scores.softmax(-1)
    out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, length, embed))
    out = out if self.batch_first else out.transpose(0, 1)
    return out, ((weights.mean(1) if average_attn_weights else weights) if need_weights else None)


@contextlib.contextmanager
def factorable_attention(model: nn.Module) -> Iterator[None]:
    """Within: every ``nn.MultiheadAttention`` of ``model`` computes self-attention through layer calls
    (see the module docstring); the parameters and their names are unchanged."""
    patched = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            layer = nn.Linear(
                module.embed_dim, 3 * module.embed_dim, bias=module.in_proj_bias is not None, device="meta"
            )
            layer.weight = module.in_proj_weight  # the same Parameter: curvlinops finds it by identity
            if module.in_proj_bias is not None:
                layer.bias = module.in_proj_bias
            module.add_module(_IN_PROJ, layer)
            module.forward = types.MethodType(_forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module._modules[_IN_PROJ]
            del module.forward
