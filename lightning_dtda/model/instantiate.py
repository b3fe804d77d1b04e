"""Building the module of a recorded run at one of its snapshots."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from lightning_dtda.runs.format import comparable, jsonable, module_fingerprint, same_class
from lightning_dtda.runs.trajectory import Trajectory


def _init_arguments(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The recorded hyperparameters ``cls`` is built from: without the keys Lightning adds to them itself
    (LightningCLI's ``_instantiator``, a ``_class_path``), which start with an underscore and are no
    argument of ``__init__``."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hparams.items() if not k.startswith("_") or k in accepted}


def instantiate(
    module: type[nn.Module] | nn.Module,
    run: Trajectory,
    snapshot: int = -1,
    device: torch.device | str = "cpu",
    warn: bool = True,
) -> nn.Module:
    """The module of ``run`` at ``snapshot`` (default: the final one), in eval mode on ``device``.

    Args:
        module: The LightningModule class, built from the run's recorded hyperparameters, or an
            instance, deep-copied so the caller's module is left untouched.
        warn: Whether to warn (below); off where the same module was already built for this run.

    Raises:
        ValueError: If the run trained another class, or ``module`` is an instance whose parameters do not
            fit the run's weights (the message names the hyperparameters that differ from the run's).
        TypeError: If the class cannot be built from the recorded hyperparameters.

    Warns: when a class of the same qualified name in another module is taken for the recorded one (a
    class defined in the training script is recorded as ``__main__.Net`` and imported elsewhere as
    ``train.Net``; see ``same_class``), and when an instance has other hyperparameters than the
    run's but fits its weights.
    """
    if isinstance(module, nn.Module):
        cls: type = type(module)
        model = copy.deepcopy(module)
    else:
        cls, model = module, None
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not same_class(cls, run.module_class):
        raise ValueError(
            f"Run {run.name} trained {run.module_class}, not {path}. Pass the class the run trained (a class defined in "
            "the training script can be imported from it; one of the same name in another module is taken for it), or an "
            "instance of it."
        )
    if warn and path != run.module_class:
        # No run name: the message is the same for every seed, so Python shows it once.
        warnings.warn(
            f"The runs recorded their module class as {run.module_class}; taking {path}, of the same name, for it.",
            stacklevel=2,
        )
    if model is None:
        try:
            model = cls(**_init_arguments(cls, run.manifest.hparams))
        except TypeError as err:
            raise TypeError(
                f"Could not build {path} from the recorded hyperparameters ({err}). Call "
                "`self.save_hyperparameters()` in its __init__, or pass an instance instead of the class."
            ) from err
    # Only plain values compare: others were recorded as their repr, which may hold an address.
    given = {
        k: v
        for k, v in dict(getattr(model, "hparams", {})).items()
        if v is None or isinstance(v, (bool, int, float, str))
    }
    differ = [
        k for k, v in run.manifest.hparams.items() if k in given and comparable(jsonable(given[k])) != comparable(v)
    ]
    differences = (
        f"run {run.name} was trained with {', '.join(f'{k}={run.manifest.hparams[k]!r}' for k in differ)}; the module given "
        f"has {', '.join(f'{k}={given[k]!r}' for k in differ)}"
    )
    state = run.state_dict(snapshot)
    # Lightning's "64-true" (or "bf16-true") converts the module after construction; match it.
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype=dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"The module given does not match run {run.name}'s weights ({str(err).splitlines()[-1].strip().rstrip('.')})"
            f"{': ' + differences if differ else ''}. Pass the class (it is built from the recorded hyperparameters) or an "
            "instance built with the run's."
        ) from None
    if warn and differ:
        warnings.warn(
            f"The module given is not the one trained: {differences}. Effects are the given module's.", stacklevel=2
        )
    recorded, now = run.manifest.module_fingerprint or {}, module_fingerprint(model)
    # Other hyperparameters (warned about above) change the structure's repr by themselves.
    changed = [
        w
        for w in ("source",) + (() if differ else ("structure",))
        if w in recorded and w in now and recorded[w] != now[w]
    ]
    if warn and changed:
        what = {"structure": "its layers (repr)", "source": "its class's source code"}
        warnings.warn(
            f"{path} is not the code that trained run {run.name}: {' and '.join(what[c] for c in changed)} differ from what "
            "was recorded, though its name and weights fit. Effects are those of the code given; attribute with the "
            "code that trained the run (an edited docstring or comment also changes the source).",
            stacklevel=2,
        )
    return model.to(device).eval()
