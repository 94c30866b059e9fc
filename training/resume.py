"""What a resumed run checks of its checkpoint before anything heavy loads: written by this trainer (every trainer's
options are known here, to name the one that wrote it) and with this run's architecture options; the other changed
options are listed, the new values winning. Which checkpoint ``--resume`` means: ``checkpoint.resolve_resume``."""

from __future__ import annotations

import dataclasses

from ..nodes.errors import ConfigError, PackError
from .adaface_config import AdaFaceTrainConfig
from .checkpoint import read_state, resolve_resume
from .idadapter_config import IDAdapterTrainConfig
from .options import TrainConfig
from .wplus_config import WPlusTrainConfig

# options that are expected to differ on a resume and are not reported
RESUME_QUIET = ("resume",)

# every trainer's options by the trainer's name
TRAINER_CONFIGS = {c.trainer: c for c in (IDAdapterTrainConfig, WPlusTrainConfig, AdaFaceTrainConfig)}


def resume_changes(config: TrainConfig, saved: dict) -> tuple[list[str], list[str]]:
    """(architecture options that differ from the checkpoint's run, other options that differ), as
    "--name old -> new" lines."""
    arch, other = [], []
    for f in dataclasses.fields(config):
        if f.name in RESUME_QUIET or f.name not in saved:
            continue
        old, new = saved[f.name], getattr(config, f.name)
        if old != new:
            (arch if f.name in config.architecture_options else other).append(f"--{f.name} {old!r} -> {new!r}")
    return arch, other


def check_resume_config(config: TrainConfig, folder: str) -> list[str]:
    """Compares this run's options with those saved in a checkpoint: a checkpoint of another trainer or a changed
    architecture option is a ConfigError naming it; the other changes are returned (this run's values win, the
    trainer prints them)."""
    state = read_state(folder)
    written_by = checkpoint_trainer(state)
    if written_by is not None and written_by != config.trainer:
        other = TRAINER_CONFIGS[written_by].title if written_by in TRAINER_CONFIGS else repr(written_by)
        raise ConfigError(f"--resume {folder}: a checkpoint of the {other} trainer (training/train_{written_by}.py), "
                          f"not of this {config.title} trainer: resume it with training/train_{written_by}.py, or "
                          f"pass a checkpoint of the {config.title} trainer (or a new --output_dir to start from "
                          "step 0)")
    saved = state.get("config")
    if not isinstance(saved, dict):  # a checkpoint written before options were saved in it: shapes are checked later
        return []
    arch, other = resume_changes(config, saved)
    if arch:
        raise ConfigError(f"--resume {folder}: the checkpoint was trained with other adapter options ({'; '.join(arch)}); "
                          "its weights have another shape. Resume with the checkpoint's values, or start a new "
                          "--output_dir")
    return other


def checkpoint_trainer(state: dict) -> str | None:
    """The name of the trainer that wrote a checkpoint (``state``: its state.json): recorded there, or, in a
    checkpoint written before it was, the trainer whose inputs its saved options name (None: no options saved)."""
    if isinstance(state.get("trainer"), str):
        return state["trainer"]
    saved = state.get("config")
    if isinstance(saved, dict):
        for name, config_cls in TRAINER_CONFIGS.items():
            if set(config_cls.required_inputs) <= set(saved):
                return name
    return None


def resume_problems(config: TrainConfig) -> list[str]:
    """--resume's problems, as messages: the checkpoint it names (or ``latest`` finds) is unusable, of another trainer
    or of another architecture. Checked once every option is good (it reads the output folder)."""
    try:
        folder, _ = resolve_resume(config.resume, config.output_dir)
        if folder:
            check_resume_config(config, folder)
    except PackError as exc:  # ConfigError, or a corrupt checkpoint named by --resume
        return [str(exc)]
    return []
