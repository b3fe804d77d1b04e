"""The attribution hooks a LightningModule may define, and their defaults.

Like ``training_step``, these are methods on the user's LightningModule. All are optional while
batches are ``(inputs, targets)`` pairs and the loss is cross-entropy (integer targets) or mean
squared error (floating targets)::

    def attribution_inputs_targets(self, batch) -> tuple[Any, Tensor]:
        # The model's input and the loss's target. Default: the batch, if it is an (inputs, targets) pair of tensors. Inputs that are a
        # dict are passed as keyword arguments, ``model(**inputs)``; anything else as one, ``model(inputs)``.
    def attribution_loss_function(self) -> nn.Module:
        # nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss with reduction="mean", applied to
        # ``self(inputs)`` and ``targets``. Default: inferred from the targets' dtype.
    def attribution_train_loss(self, batch) -> Tensor:
        # Per-example training loss, shape [B]; its mean is the loss ``training_step`` minimises.
        # Default: the loss function with reduction="none", averaged over non-batch dimensions.
    def attribution_measurement(self, batch) -> Tensor:
        # Per-example measurement of a query batch, shape [B]. Default: the training loss.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dtda.errors import MissingHookError

# Examples the checks before attribution look at: as many as the recorder's check sees in a batch of 32, so a
# regression whose first two targets happen to lie in [0, 1] is not taken for 0/1 labels.
CHECKED_EXAMPLES = 32


def first_batch(data: Any, device: torch.device | str) -> Any:
    """The first ``CHECKED_EXAMPLES`` examples of ``data``, collated as a ``DataLoader`` does, on ``device``."""
    return move_data_to_device(next(iter(DataLoader(data, batch_size=CHECKED_EXAMPLES))), device)


LOSS_FUNCTIONS = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)

_SIGNATURES = {
    "attribution_inputs_targets": "def attribution_inputs_targets(self, batch) -> tuple[Any, torch.Tensor]",
    "attribution_loss_function": "def attribution_loss_function(self) -> torch.nn.Module",
    "attribution_train_loss": "def attribution_train_loss(self, batch) -> torch.Tensor  # shape [B]",
    "attribution_measurement": "def attribution_measurement(self, batch) -> torch.Tensor  # shape [B]",
}


def call_model(model: nn.Module, inputs: Any) -> Tensor:
    """``model(**inputs)`` for inputs that are a mapping (keyword arguments, as Hugging Face models take
    them), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _missing(module: nn.Module, hook: str, why: str) -> MissingHookError:
    return MissingHookError(
        f"{type(module).__name__} needs the attribution hook `{hook}`: {why}. Define it on the "
        f"LightningModule:\n\n    {_SIGNATURES[hook]}:\n        ...\n"
    )


class Hooks:
    """Calls a module's attribution hooks, falling back to the defaults for ``(x, y)`` batches.

    Args:
        module: The LightningModule (any ``nn.Module`` whose ``forward`` maps inputs to outputs).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._loss_function: nn.Module | None = None

    def _user_hook(self, name: str) -> Any:
        return getattr(self.module, name, None)

    def inputs_targets(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The ``(inputs, targets)`` of a batch."""
        hook = self._user_hook("attribution_inputs_targets")
        if hook is not None:
            return hook(batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, Tensor) for b in batch):
            return batch[0], batch[1]
        # Said now, not after the next run: the loss function's hook is checked only on the targets this one returns.
        loss = (
            ""
            if self._user_hook("attribution_loss_function") is not None
            else "; if the targets it returns are floats all between 0 and 1, `attribution_loss_function` is needed "
            "too (binary cross-entropy, cross-entropy on probabilities or squared error: they cannot tell which)"
        )
        raise _missing(
            self.module,
            "attribution_inputs_targets",
            f"the default expects a batch that is an (inputs, targets) pair of tensors, got {type(batch).__name__}"
            + loss,
        )

    def loss_function(self, batch: Any) -> nn.Module:
        """The loss function with ``reduction='mean'``; ``batch`` serves to infer the default."""
        if self._loss_function is None:
            hook = self._user_hook("attribution_loss_function")
            if hook is not None:
                loss = hook()
            else:
                _, targets = self.inputs_targets(batch)
                if targets.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
                    # Cross-entropy (and gather, in per-example gradients) takes class indices as int64 only.
                    raise _missing(
                        self.module,
                        "attribution_inputs_targets",
                        f"the targets are {targets.dtype} class indices, and cross-entropy takes them as torch.long; "
                        "return targets.long() there, as training_step casts them",
                    )
                if not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool:
                    loss = nn.CrossEntropyLoss()
                elif targets.is_floating_point():
                    loss = nn.MSELoss()
                else:
                    raise _missing(
                        self.module,
                        "attribution_loss_function",
                        f"no default loss for targets of dtype {targets.dtype} (integers mean cross-entropy, "
                        "floats mean squared error)",
                    )
            if not isinstance(loss, LOSS_FUNCTIONS) or loss.reduction != "mean":
                raise ValueError(
                    "attribution_loss_function must return nn.CrossEntropyLoss, nn.MSELoss or "
                    f"nn.BCEWithLogitsLoss with reduction='mean', got {loss!r}."
                )
            self._loss_function = loss
        return self._loss_function

    def check_targets(self, batch: Any) -> None:
        """What ``check_loss`` checks without running the model: that ``batch`` gives inputs and targets,
        that a loss function follows from them, and that float targets all in [0, 1] come with a loss hook."""
        _, targets = self.inputs_targets(batch)
        self.loss_function(batch)
        if (
            self._user_hook("attribution_loss_function") is None
            and targets.is_floating_point()
            and bool(((targets >= 0) & (targets <= 1)).all())
        ):
            raise _missing(
                self.module,
                "attribution_loss_function",
                f"the float targets checked (the first {len(targets)} examples') all lie between 0 and 1, which could be targets "
                "of binary cross-entropy, of cross-entropy "
                "on probabilities (label smoothing) or of mean squared error; return nn.BCEWithLogitsLoss(), "
                "nn.CrossEntropyLoss() or nn.MSELoss() to say which",
            )

    def check_loss(self, batch: Any) -> None:
        """Refuse what the loss function (the default per-example loss, and the curvatures') would get silently
        wrong on ``batch`` (call it outside ``vmap``/``grad``: one forward, no grad): what ``check_targets``
        refuses, and outputs and targets the loss would broadcast into another value."""
        self.check_targets(batch)
        inputs, targets = self.inputs_targets(batch)
        loss = self.loss_function(batch)
        try:
            with torch.no_grad():
                outputs = call_model(self.module, inputs)
        except TypeError as err:
            raise _missing(
                self.module,
                "attribution_inputs_targets",
                f"the model cannot be called as model(inputs) with the inputs it returns ({err}). Return the inputs as a "
                "dict of keyword arguments (the model is then called as model(**inputs)), or as the one argument forward takes",
            ) from None
        # Cross-entropy takes class indices without the class dimension, or probabilities shaped like the outputs.
        if isinstance(loss, nn.CrossEntropyLoss) and not targets.is_floating_point():
            expected = (*outputs.shape[:1], *outputs.shape[2:])
        else:
            expected = tuple(outputs.shape)
        if tuple(targets.shape) != expected:
            raise _missing(
                self.module,
                "attribution_inputs_targets",
                f"the model's outputs have shape {tuple(outputs.shape)} and the targets {tuple(targets.shape)}, which "
                f"{type(loss).__name__} needs to be {expected}; it would broadcast them into another loss. Reshape them "
                "there as training_step does",
            )

    def check_defaults(self, train_data: Any, query_data: Any, device: torch.device | str) -> None:
        """``check_loss`` on the first examples of ``train_data`` and of ``query_data`` (``None``: none), wherever
        the default loss serves: for the training loss, and for the measurement of the queries."""
        if self.default_train_loss:
            self.check_loss(first_batch(train_data, device))
            if self.default_measurement and query_data is not None:  # the queries' targets could broadcast too
                self.check_loss(first_batch(query_data, device))

    @property
    def default_measurement(self) -> bool:
        """Whether the measurement is the training loss (no ``attribution_measurement`` hook)."""
        return self._user_hook("attribution_measurement") is None

    @property
    def default_loss_function(self) -> bool:
        """Whether the loss function is the library's choice (no ``attribution_loss_function`` hook)."""
        return self._user_hook("attribution_loss_function") is None

    @property
    def default_train_loss(self) -> bool:
        """Whether the training loss comes from the loss function (no ``attribution_train_loss`` hook)."""
        return self._user_hook("attribution_train_loss") is None

    def _per_example_loss(self, batch: Any) -> Tensor:
        inputs, targets = self.inputs_targets(batch)
        loss = copy.copy(self.loss_function(batch))
        loss.reduction = "none"
        values = loss(call_model(self.module, inputs), targets)
        # Mean over the remaining dimensions, so the batch mean equals the loss with reduction="mean".
        return values.reshape(values.shape[0], -1).mean(1)

    @staticmethod
    def _checked(name: str, values: Tensor) -> Tensor:
        if values.ndim != 1:
            raise ValueError(f"{name} must return one value per example, shape [B]; got shape {tuple(values.shape)}.")
        return values

    def train_loss(self, batch: Any) -> Tensor:
        """Per-example training loss, shape ``[B]``."""
        hook = self._user_hook("attribution_train_loss")
        values = hook(batch) if hook is not None else self._per_example_loss(batch)
        return self._checked("attribution_train_loss", values)

    def measurement(self, batch: Any) -> Tensor:
        """Per-example measurement, shape ``[B]``."""
        hook = self._user_hook("attribution_measurement")
        values = hook(batch) if hook is not None else self.train_loss(batch)
        return self._checked("attribution_measurement", values)
