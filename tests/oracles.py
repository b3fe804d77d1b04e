"""Exact references computed without curvlinops or torch.func: dense Jacobians, closed forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian


def _outputs_and_jacobian(model, x):
    """Outputs [N, C] and their Jacobian [N, C, P] with respect to the flattened trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        weights = {n: c.reshape(s) for (n, _), c, s in zip(named, chunks, shapes)}
        return torch.func.functional_call(model, weights, (x,))

    return model(x).detach(), jacobian(outputs, flat)


def _loss_derivatives(out, y, loss):
    """Per-example gradient [N, C] and Hessian [N, C, C] of the loss with respect to the outputs."""
    n, c = out.shape
    if loss == "ce":
        p = out.softmax(1)
        grad = p - F.one_hot(y, c).to(p.dtype)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:  # mean squared error averaged over the C outputs
        grad = 2 * (out - y) / c
        hess = (2 / c) * torch.eye(c, dtype=out.dtype).expand(n, c, c)
    return grad, hess


def dense_ggn_effects(model, train_x, train_y, query_x, query_y, damping, loss="ce"):
    """effects[q, n] = g_q^T (G + damping I)^-1 g_n / N with the exact GGN G of the mean training loss."""
    out, J = _outputs_and_jacobian(model, train_x)
    grad, hess = _loss_derivatives(out, train_y, loss)
    n = len(train_x)
    G = torch.einsum("ncp,ncd,ndq->pq", J, hess, J) / n
    g_train = torch.einsum("ncp,nc->np", J, grad)
    q_out, q_J = _outputs_and_jacobian(model, query_x)
    q_grad, _ = _loss_derivatives(q_out, query_y, loss)
    g_query = torch.einsum("ncp,nc->np", q_J, q_grad)
    solved = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), g_query.T).T
    return solved @ g_train.T / n, G, g_train, g_query


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def spearman(a, b):
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def pearson(a, b):
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()
