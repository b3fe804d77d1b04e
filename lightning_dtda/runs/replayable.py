"""What in a module's training no replay reproduces: read before training (the recorder warns,
``AttributionCallback`` refuses a replaying estimator) and by every replay (``replay.engine``)."""

from __future__ import annotations

from torch import nn


def unreplayable_layers(model: nn.Module) -> list[str]:
    """The layers of ``model`` whose training no replay reproduces, each with why (empty if none): read by
    ``check_replayable``, and before training by the recorder (a warning) and ``AttributionCallback``."""
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
            problems.append(f"batch norm {name!r} averages its statistics cumulatively (momentum=None)")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append(f"instance norm {name!r} tracks running statistics")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            problems.append(
                f"attention {name!r} has dropout={m.dropout} inside torch's fused attention kernel, whose random draws "
                "the replay's differentiable kernel cannot reproduce (build the model with it at 0, through a "
                "constructor argument: the Attributor rebuilds a class from its hyperparameters)"
            )
    return problems


def replay_advice(optimizer: str | None) -> str:
    """What attributes a run that cannot be replayed, trained with ``optimizer`` (``Manifest.optimizer``)."""
    if optimizer == "SGD":
        return "Use Influence() or Segmented() for it."
    return "Use Influence() for it" + (
        f"; Segmented() refuses it too, since it replays {optimizer} runs." if optimizer else "."
    )
