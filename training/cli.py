"""The trainers' and the evaluation's command line: options parsed and checked from a config class's fields (before
anything heavy is imported), a trainer script's ``main`` and ``cli``, and PackErrors reported as one line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import TypeVar

from ..nodes.errors import PackError
from . import outdir
from .loop import main_print, make_accelerator, run
from .options import CommandOptions, TrainConfig
from .resume import resume_problems
from .task import TrainingTask

Options = TypeVar("Options", bound=CommandOptions)


def parse_args(config_cls: type[Options], argv=None, description: str = "") -> Options:
    """The command line's options, every one checked (--resume's checkpoint too): a ConfigError lists the problems.
    Nothing heavy is imported or loaded."""
    # each option's help states its default itself (the parser's defaults are None: "not given", so that a preset's
    # value applies); the description, the script's docstring, keeps its example commands' lines
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        flag = f"--{f.name}"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="true|false",
                                help=f"(default: {default})")
        elif isinstance(default, list):
            item = int if str(f.type) == "list[int]" else str
            parser.add_argument(flag, nargs="+", type=item, default=None, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"(default: {default!r})")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    values = config_cls.preset_values(given)
    values.update(given)
    config = config_cls(**values)
    config.validate()
    if isinstance(config, TrainConfig) and config.resume:  # once the options are good: it reads the output folder
        config.refuse(resume_problems(config))
    return config


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def exit_code(main, argv=None) -> int:
    """Runs a trainer's ``main``; a PackError (bad option, dataset or model file) is one line saying what to fix."""
    try:
        main(argv)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def train_from_command_line(config_cls: type[TrainConfig], make_task: Callable[..., TrainingTask], argv,
                            description: str) -> str:
    """A trainer's ``main``: every option checked (before any heavy import), the output folder held, the task built
    (``make_task(config, log)``, the main process first: it builds what the others then read) and trained; returns
    the export's path."""
    config = parse_args(config_cls, argv, description=description)
    accelerator = make_accelerator(config)
    say = main_print(accelerator)
    # one run per output folder, and a writable one: checked before anything heavy is built or loaded
    with outdir.hold(config.output_dir, accelerator, log=say):
        with accelerator.main_process_first():
            task = make_task(config, say)
        return run(task, config, accelerator)


def trainer_command_line(config_cls: type[TrainConfig], task_class: Callable[[], type[TrainingTask]],
                         description: str):
    """A trainer script's ``main(argv) -> export path`` and ``cli(argv) -> exit code``. ``task_class()`` imports and
    returns the task's class; it is called once the options have been checked, so that a bad option (or --help) is
    answered before the seconds diffusers and the models' code take to import."""

    def make_task(config, log):
        return task_class()(config, log=log)

    def main(argv=None) -> str:
        return train_from_command_line(config_cls, make_task, argv, description)

    def cli(argv=None) -> int:
        return exit_code(main, argv)

    return main, cli
