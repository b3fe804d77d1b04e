"""``torch.optim`` steps as pure functions, so recorded runs can be replayed (and differentiated).

Each step follows the single-tensor code path of ``torch.optim`` operation for operation, out of
place, so replaying a run reproduces its weights and autograd can run through the replay. Parameters
may carry leading batch dimensions (many models replayed at once): every operation is elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.runs.format import OPTIMIZERS


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0``, with derivative 0 instead of infinity at ``v = 0``.

    Adam's ``exp_avg_sq`` entry is exactly 0 only where every gradient of that parameter entry has been
    exactly 0 so far: a weight on an always-zero input feature, a dead unit. Reweighting examples
    leaves such an entry at 0 (its gradient is 0 whatever the weights), so the trajectory's true
    derivative there is 0, while ``sqrt``'s is infinite and reverse mode returns ``0 * inf = NaN``.
    (For an entry at 0 whose gradient could move, ``sqrt(g^2)`` is ``|g|``, and 0 is its subgradient.)
    The inner ``where`` keeps the unused branch's gradient finite, so the outer one can discard it.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def check_optimized(trainable: Sequence[str], param_groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse ``trainable`` parameter names (those requiring gradients) that the run's optimizer, whose manifest
    ``param_groups`` list them, was not given: training held them fixed, and an estimator would attribute through
    them as if trained (a new-user trial, the head alone given to the optimizer: the replay trained the body and
    missed by 0.87; Influence answered with 1.4 relative error). Runs recorded without the names pass."""
    if not any("param_names" in g for g in param_groups):
        return
    given = {n for g in param_groups for n in g.get("param_names", [])}
    missing = [n for n in trainable if n not in given]
    if missing:
        raise UnsupportedTrainingError(
            f"The module's parameters {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} require "
            "gradients, but the run's optimizer was not given them, so training held them fixed. Call "
            "requires_grad_(False) on them where the module is built (every estimator then leaves them out), or "
            "give them to the optimizer."
        )


@dataclass(frozen=True)
class FunctionalOptimizer:
    """The recorded optimizer's per-parameter settings.

    Attributes:
        kind: ``"sgd"`` or ``"adam"``.
        groups: Per parameter group, its settings from the run's manifest.
        group_of: Per trainable parameter (in ``named_parameters`` order), its group index.
        decoupled: AdamW's decoupled weight decay.
    """

    kind: str
    groups: tuple[dict[str, Any], ...]
    group_of: tuple[int, ...]
    decoupled: bool = False

    @classmethod
    def from_manifest(
        cls, name: str, param_groups: list[dict[str, Any]], param_names: list[str]
    ) -> "FunctionalOptimizer":
        """Build from a manifest's optimizer class path and parameter groups, for the trainable
        parameters ``param_names``.

        Raises:
            ValueError: For an optimizer or setting that has no functional twin here.
        """
        optimizer = OPTIMIZERS.get(name)
        if optimizer is None:
            raise UnsupportedTrainingError(
                f"Replaying a run needs a functional twin of its optimizer; {name} has none. Supported: "
                f"{', '.join(OPTIMIZERS)}."
            )
        groups = tuple(param_groups)
        for g in groups:
            for flag in ("maximize", "amsgrad"):
                if g.get(flag):
                    raise UnsupportedTrainingError(f"Replay does not support {name} with {flag}=True.")
            if optimizer == "SGD" and g.get("dampening", 0) and g.get("nesterov"):
                raise ValueError("SGD with both dampening and nesterov is not a valid torch optimizer.")
        check_optimized(param_names, groups)
        index = {n: i for i, g in enumerate(groups) for n in g.get("param_names", [])}
        missing = [n for n in param_names if n not in index]
        if missing and len(groups) == 1:  # runs recorded before parameter names were
            index = {n: 0 for n in param_names}
        elif missing:
            raise ValueError(f"The manifest does not say which parameter group holds {missing[:3]}.")
        decoupled = optimizer == "AdamW" or any(g.get("decoupled_weight_decay") for g in groups)
        return cls("sgd" if optimizer == "SGD" else "adam", groups, tuple(index[n] for n in param_names), decoupled)

    def init(self, params: list[Tensor]) -> dict[str, Any]:
        """The optimizer state before its first step."""
        if self.kind == "sgd":
            return {"momentum_buffer": [None] * len(params)}
        return {
            "step": 0,
            "exp_avg": [p.new_zeros(p.shape) for p in params],
            "exp_avg_sq": [p.new_zeros(p.shape) for p in params],
        }

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, Any],
        lrs: tuple[float, ...],
        scheduled: Mapping[str, tuple[float, ...]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """One optimizer step with the per-group learning rates ``lrs`` and, where recorded, the per-group
        values of the other scheduled settings (``{"momentum": ...}``, ``{"beta1": ..., "beta2": ...}``,
        see ``run_format.SCHEDULED``); returns new params and state."""
        groups = [
            {**group, **{name: values[k] for name, values in (scheduled or {}).items()}}
            for k, group in enumerate(self.groups)
        ]
        if self.kind == "sgd":
            return self._sgd(params, grads, state, lrs, groups)
        return self._adam(params, grads, state, lrs, groups)

    def _sgd(self, params, grads, state, lrs, groups):
        new_params, buffers = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            group = groups[self.group_of[i]]
            lr, momentum, wd = lrs[self.group_of[i]], group.get("momentum", 0.0), group.get("weight_decay", 0.0)
            if wd != 0:
                g = g.add(p, alpha=wd)
            buf = state["momentum_buffer"][i]
            if momentum != 0:
                buf = g.clone() if buf is None else buf.mul(momentum).add(g, alpha=1 - group.get("dampening", 0.0))
                g = g.add(buf, alpha=momentum) if group.get("nesterov") else buf
            buffers.append(buf)
            new_params.append(p.add(g, alpha=-lr))
        return new_params, {"momentum_buffer": buffers}

    def _adam(self, params, grads, state, lrs, groups):
        t = state["step"] + 1
        new_params, exp_avgs, exp_avg_sqs = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            group = groups[self.group_of[i]]
            lr, wd, eps = lrs[self.group_of[i]], group.get("weight_decay", 0.0), group["eps"]
            beta1, beta2 = group.get("beta1", group["betas"][0]), group.get("beta2", group["betas"][1])
            if wd != 0:
                if self.decoupled:
                    p = p.mul(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            exp_avg = state["exp_avg"][i].lerp(g, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"][i].mul(beta2).addcmul(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**t)
            denom = (_sqrt(exp_avg_sq) / (1 - beta2**t) ** 0.5).add(eps)
            new_params.append(p.addcdiv(exp_avg, denom, value=-step_size))
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
        return new_params, {"step": t, "exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
