"""What ``training.loop.run`` needs of a trainer's *task* (``TrainingTask``; a task whose parameters grow during a
run is also a ``GrowingTask``), and the seeded generator every task draws its randomness from.

The tasks: ``idadapter_task.IDAdapterTask``, ``wplus_task.WPlusTask``, ``adaface_task.AdaFaceTask``; each trainer
script hands ``cli.trainer_command_line`` a function that imports and returns its task's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class TrainingTask(Protocol):
    """One method's training: the frozen models, the data, the loss, the export. The loop owns everything else
    (devices, optimiser and schedule, EMA, checkpoints, logs, validation images' files, the closing summary)."""

    # the nn.Module handed to ``accelerator.prepare``: it owns every trainable parameter
    trainable: nn.Module
    # ComfyUI/models/<comfyui_folder>/: where the closing summary tells the user to copy the export
    comfyui_folder: str

    def setup(self, accelerator) -> None:
        """Moves the models to the accelerator's device and precision, before the optimiser is made."""

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups (e.g. a lower rate for fine-tuned pretrained weights)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Just the trained tensors: checkpoints never copy the frozen base model."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads what ``trainable_state`` returned (a checkpoint's)."""

    def loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch's loss and its logs (``"loss"`` among them). Everything random in it derives from
        (seed, step) through ``step_generator``, so a resumed run repeats the uninterrupted one exactly."""

    def validate(self, model: nn.Module, step: int) -> list:
        """Validation images (PIL), with every --validation_every steps."""

    def export(self, path: str) -> None:
        """Writes the file the ComfyUI nodes load."""

    def heldout_check(self) -> tuple | None:
        """Held-out losses, run before and after training to show that it learned (None: no held-out data)."""

    def heldout_line(self, before: tuple, after: tuple, when: str) -> str:
        """What ``heldout_check``'s results before (at ``when``) and after training show, in one line."""

    def describe_export(self) -> str:
        """The export in a few words, for the closing summary."""


# how a tensor shaped like a parameter before it grew grows with it (its optimiser state, its EMA shadow)
Grow = Callable[[torch.Tensor], torch.Tensor]


class GrowingTask(TrainingTask, Protocol):
    """A task that grows some parameters in place during a run (AdaFace's dynamic model expansion)."""

    def after_step(self, step: int, logs: dict[str, Any]) -> dict[nn.Parameter, Grow] | None:
        """Called after every optimiser step: the parameters grown now, each with how a tensor of its old shape grows
        (their optimiser and EMA state follows, and accelerate wraps the module anew), or None."""

    def fit_to_state(self, state: dict[str, torch.Tensor]) -> None:
        """Grows a fresh ``trainable`` to a checkpoint's shapes before it is loaded."""


def step_generator(seed: int, step: int, salt: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one micro-step's draws (``salt`` tells a step's independent streams apart): a function
    of (seed, step, salt, rank) alone, so a resumed run draws what the uninterrupted one drew, and every process
    draws its own examples."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + salt) * 131 + rank)
