"""The training loop every trainer shares: Accelerate (devices, mixed precision, multi-GPU/multi-node through
``accelerate launch``), optimiser and LR schedule, optional EMA, tqdm progress, TensorBoard logs, periodic
validation, checkpoints with exact resume, and an atomic export.

A trainer supplies a *task* object:

- ``trainable``: the nn.Module handed to ``accelerator.prepare`` (it owns every trainable parameter);
- ``param_groups()``: the optimiser's parameter groups (e.g. a lower rate for fine-tuned pretrained weights);
- ``trainable_state()`` / ``load_trainable_state(dict)``: just the trained tensors (checkpoints never copy the
  frozen base model);
- ``loss(model, step) -> (loss, logs)``: one micro-batch; everything random in it derives from (seed, step), so
  a resumed run repeats the uninterrupted one exactly;
- ``validate(model, step) -> list[PIL.Image]`` and ``export(path)``;
- ``heldout_check() -> (a, b) | None``: held-out losses run before and after training to show that it learned,
  and ``heldout_line(before, after, when)`` that says what they show; ``describe_export()`` and ``comfyui_folder``
  for the closing summary;
- optionally ``after_step(step, logs) -> {parameter: grow} | None``: parameters the task grew in place (AdaFace's
  dynamic model expansion), with how a tensor of the old shape grows; their optimiser and EMA state follows and
  accelerate wraps the module anew (a DDP wrapper holds state sized for the old shapes), and
  ``fit_to_state(trainable)``, which grows a fresh module to a checkpoint's shapes before it is loaded.

Checkpoints are written to ``checkpoint-<step>.tmp`` and renamed when complete, so killing the process at
any moment loses at most the steps since the last checkpoint and never leaves a half-written one. They hold
safetensors and JSON only (``training.checkpoint``): resuming reads no pickle. ``--resume latest`` skips a
checkpoint that fails ``checkpoint.check`` (truncated or garbled files) for the previous one and says so; the
options saved in a checkpoint are compared with this run's (``config.check_resume_config``: a changed adapter
shape is refused, other changes are listed and the new values win). The output folder is held for the whole run
(``training.outdir``: one run per folder, checked writable, interrupted runs' temporary files removed).

With several processes (``accelerate launch`` / ``torchrun``: DDP, one process per GPU) every process trains on
its own examples (the task samples from (seed, step, rank)) and gradients are averaged, so the global batch is
the per-process batch x processes x accumulation steps. The main process alone builds shared files first (tiny
assets, the face cache; see ``main_process_first``), prints, shows the progress bar, writes TensorBoard logs,
validation images, the export and the checkpoint's shared files; every process writes its RNG state into the
checkpoint, which the main process renames once all have finished.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from ..nodes.errors import ConfigError, PackError
from . import checkpoint as ckpt
from . import outdir

log = logging.getLogger("training")
TRAINABLE_FILE = ckpt.TRAINABLE_FILE


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d[11:]))]


def resolve_resume(resume: str, output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint to resume from (None: start at step 0) and the newer ones skipped as incomplete or corrupt,
    with the reason. ``latest`` falls back to the newest checkpoint that passes ``checkpoint.check``; a folder named
    explicitly must pass it."""
    if not resume:
        return None, []
    if resume == "latest":
        skipped = []
        for folder in reversed(checkpoints(output_dir)):
            try:
                ckpt.check(folder)
                return folder, skipped
            except ckpt.CheckpointError as exc:
                skipped.append((folder, str(exc)))
        if skipped:
            raise ConfigError(f"--resume latest: no usable checkpoint in {output_dir}: "
                              + "; ".join(f"{os.path.basename(f)}: {why}" for f, why in skipped)
                              + ". Remove the broken folders to start from step 0, or resume from a copy you trust")
        return None, []
    if not os.path.isfile(os.path.join(resume, TRAINABLE_FILE)):
        raise ConfigError(f"--resume {resume!r} is not a checkpoint folder (no {TRAINABLE_FILE} in it); "
                          f"use 'latest' or one of {checkpoints(output_dir)[-3:]}")
    try:
        ckpt.check(resume)
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"--resume {resume!r} cannot be used: {exc}. Pass an older checkpoint, or 'latest' "
                          "(which skips broken ones)") from exc
    return resume, []


def make_accelerator(config):
    """The Accelerator a run uses (DDP over the processes ``accelerate launch`` or ``torchrun`` started)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # without a GPU, accelerate treats processes started by torchrun as independent single-process runs (each
    # training alone on the same data and writing the same files) unless told to use the CPU: gloo DDP
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=processes > 1 and not has_device,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
        # a process whose micro-batch dropped every text (or image) condition leaves P_textual (or the adapter)
        # without a gradient on that step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.num_processes != processes:
        raise RuntimeError(f"{processes} processes were started (WORLD_SIZE) but accelerate set up "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value})")
    return accelerator


def train_from_command_line(config_cls, make_task, argv, description: str) -> str:
    """A trainer's ``main``: every option checked (before any heavy import), the output folder held, the task built
    (the main process first: it builds what the others then read) and trained; returns the export's path."""
    from .config import parse_args

    config = parse_args(config_cls, argv, description=description)
    accelerator = make_accelerator(config)
    say = main_print(accelerator)
    # one run per output folder, and a writable one: checked before anything heavy is built or loaded
    with outdir.hold(config.output_dir, accelerator, log=say):
        with accelerator.main_process_first():
            task = make_task(config, say)
        return run(task, config, accelerator)


def trainer_command_line(config_cls, task_module: str, task_class: str, description: str):
    """A trainer script's ``main(argv) -> export path`` and ``cli(argv) -> exit code``. The task's module (under
    ``training``) is imported once the options have been checked: a bad option is reported before the heavy
    imports."""

    def make_task(config, log):
        module = importlib.import_module(f".{task_module}", __package__)
        return getattr(module, task_class)(config, log=log)

    def main(argv=None) -> str:
        return train_from_command_line(config_cls, make_task, argv, description)

    def cli(argv=None) -> int:
        return exit_code(main, argv)

    return main, cli


def step_generator(seed: int, step: int, salt: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one micro-step's draws (``salt`` tells a step's independent streams apart): a function
    of (seed, step, salt, rank) alone, so a resumed run draws what the uninterrupted one drew, and every process
    draws its own examples."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + salt) * 131 + rank)


def exit_code(main, argv=None) -> int:
    """Runs a trainer's ``main``; a PackError (bad option, dataset or model file) is one line saying what to fix."""
    try:
        main(argv)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_print(accelerator):
    """``print`` on the main process only (``accelerator.print`` prints once per node)."""
    return print if accelerator.is_main_process else (lambda *args, **kwargs: None)


def run(task, config, accelerator=None) -> str:
    """Trains ``task`` for ``config.max_steps`` optimiser steps; returns the path of the exported weights.

    The output folder is held (``training.outdir.hold``) for the run; the CLI takes it before building the task,
    so a second run into one folder is refused before it loads anything."""
    accelerator = accelerator or make_accelerator(config)
    with outdir.hold(config.output_dir, accelerator, log=main_print(accelerator)):
        return _run(task, config, accelerator)


def _run(task, config, accelerator) -> str:
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise ConfigError(f"{accelerator.distributed_type.value} is not supported (checkpoints and the export read the "
                         "whole trainable state on each process): run `accelerate config` with multi-GPU (DDP)")
    say = main_print(accelerator)
    processes, rank = accelerator.num_processes, accelerator.process_index
    set_seed(config.seed)
    task.setup(accelerator)
    params = [p for p in task.trainable.parameters() if p.requires_grad]
    optimizer = make_optimizer(task, config, accelerator.device)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=config.max_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(task.trainable, optimizer, scheduler)

    def prepare_grown():
        """Accelerate's wrappers made anew around the same module, optimiser and schedule, after the task grew some
        parameters in place (their optimiser state already grown). A DDP wrapper's reducer holds the parameters'
        gradient accumulators, which recorded the old shapes (the next backward would fail: "invalid gradient ...
        expected shape compatible with" the old one), and buckets sized for them: every reference to the old wrappers
        is dropped and collected before the module is wrapped again."""
        nonlocal model, optimizer, scheduler
        # the module as it was before the first prepare (its forward without the mixed-precision wrapper, and not
        # marked as prepared, which would make prepare hand it back as it is): prepare then wraps it as it did then
        module = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        module.__dict__.pop("_is_accelerate_prepared", None)
        inner_optimizer, inner_scheduler = optimizer.optimizer, scheduler.scheduler
        accumulated = accelerator.step
        model = optimizer = scheduler = None
        accelerator.free_memory()  # accelerate's own references, then a garbage collection; it zeroes the step count
        accelerator.step = accumulated
        model, optimizer, scheduler = accelerator.prepare(module, inner_optimizer, inner_scheduler)

    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
    step = 0
    batch = getattr(config, "batch_size", None)
    if batch is not None:
        say(f"global batch {batch * processes * config.gradient_accumulation_steps} = batch {batch} x {processes} "
            f"process(es) x {config.gradient_accumulation_steps} accumulation step(s)")

    resume_from, skipped = resolve_resume(config.resume, config.output_dir)
    for folder, why in skipped:
        say(f"skipped {folder} (not resumable: {why}); falling back to the previous checkpoint")
    if config.resume and not resume_from:
        say(f"no checkpoint in {config.output_dir}: starting from step 0")
    if resume_from:
        from .config import check_resume_config

        changed = check_resume_config(config, resume_from)
        if changed:
            say(f"resuming with changed options; the new values apply from step {ckpt.read_state(resume_from)['step']} "
                f"on (learning rates and weight decay included, the optimiser's moments are kept): {', '.join(changed)}")
        shapes = [p.shape for p in params]
        saved = ckpt.load_main(resume_from, task, optimizer, scheduler, ema, accelerator.scaler, accelerator.device)
        if [p.shape for p in params] != shapes:  # the checkpoint was written after the task grew (fit_to_state)
            prepare_grown()
        step = saved["step"]
        accelerator.step = saved.get("accelerator_step", step * config.gradient_accumulation_steps)
        has_rng = ckpt.load_rng(resume_from, rank)
        ignored = sorted(f for f in os.listdir(resume_from) if f.endswith((".pkl", ".bin", ".pt", ".pth")))
        if ignored:
            say(f"ignored in {resume_from} (pickles are never loaded): {', '.join(ignored)}")
        if saved.get("processes") != processes:
            say(f"note: {resume_from} was written by {saved.get('processes')} process(es), this run has {processes}: "
                "the steps from here draw other examples, and the LR schedule (stepped once per process) shifts; "
                "resume with the same number of processes to continue exactly")
        if not has_rng:
            print(f"process {rank}: no RNG state for it in {resume_from}; continuing with its seeded RNG")
        say(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:
        with outdir.writing(config.output_dir, "writing config.json", "nothing was lost"):
            os.makedirs(config.output_dir, exist_ok=True)
            with open(os.path.join(config.output_dir, "config.json"), "w") as f:
                f.write(config.to_json())
        if config.report_to != "none":
            accelerator.init_trackers(config.trainer, config={k: v for k, v in vars(config).items()  # logs/<trainer>/
                                                              if isinstance(v, (int, float, str, bool))})

    options = json.loads(config.to_json())

    def checkpoint():
        final = os.path.join(config.output_dir, f"checkpoint-{step}")
        try:
            with outdir.writing(config.output_dir, f"writing checkpoint-{step}", f"the checkpoints already there are "
                                f"intact ({_names(checkpoints(config.output_dir)) or 'none yet'}): resume with "
                                "--resume latest once the folder is writable"):
                write_checkpoint(final)
        except ConfigError:
            shutil.rmtree(final + ".tmp", ignore_errors=True)
            raise

    def write_checkpoint(final):
        tmp = final + ".tmp"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()  # the folder exists before any process writes into it
        ckpt.save_rng(tmp, rank)
        if accelerator.is_main_process:
            ckpt.save_main(tmp, task, optimizer, scheduler, ema, accelerator.scaler, step, processes, accelerator.step,
                           options, config.trainer)
        accelerator.wait_for_everyone()  # every process has finished writing: rename once
        if accelerator.is_main_process:
            missing = [ckpt.rng_file(r) for r in range(processes) if not os.path.isfile(os.path.join(tmp, ckpt.rng_file(r)))]
            if missing:
                raise RuntimeError(f"{tmp} lacks {missing}: with several nodes --output_dir must be on a file system "
                                   "every node sees")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if config.checkpoints_total_limit:  # 0 keeps every checkpoint
                for old in checkpoints(config.output_dir)[:-config.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    started, first_step = time.monotonic(), step
    before = task.heldout_check() if accelerator.is_main_process else None
    bar = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_main_process, desc="steps")
    while step < config.max_steps:
        logs = {}
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss, logs = task.loss(model, step * config.gradient_accumulation_steps + micro)
                accelerator.backward(loss)
                # the graph's nodes hold the parameters' gradient accumulators, which record their shapes: none may
                # outlive the step, since a task may grow parameters in place between steps (after_step)
                del loss
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        logs_now = step % config.log_every == 0
        saves = step % config.checkpoint_every == 0 or step == config.max_steps
        validates = bool(config.validation_every and step % config.validation_every == 0)
        # the logs are read back to the host (a wait for the accelerator) only on steps that log, save or validate
        reads_back = logs_now or saves or validates
        # the mean over processes: every process sees the same value, so all stop (and a task's after_step, which
        # reads the loss every step, decides) together
        if (reads_back or hasattr(task, "after_step")) and processes > 1:
            logs["loss"] = accelerator.reduce(logs["loss"].detach().float().reshape(1).to(accelerator.device), "mean")[0]
        if reads_back and not all(math.isfinite(float(v)) for v in logs.values()):
            raise FloatingPointError(f"step {step}: non-finite loss {logs} (read every --log_every steps and before "
                                     "each checkpoint, which is not written); lower --learning_rate or use bf16")
        if ema is not None:
            ema.step(params)
        grown = task.after_step(step, logs) if hasattr(task, "after_step") else None
        if grown:  # the task grew some parameters in place: their optimiser and EMA state grows the same way
            expand_optimizer_state(getattr(optimizer, "optimizer", optimizer), grown)
            if ema is not None:
                ema.shadow_params = [grown[p](s) if p in grown else s for p, s in zip(params, ema.shadow_params)]
            prepare_grown()
        bar.update(1)
        if reads_back:  # grouped keys ("group/name") are TensorBoard detail, kept off the progress bar
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items() if "/" not in k})
        if logs_now and config.report_to != "none":
            accelerator.log({**{k: float(v) for k, v in logs.items()}, "lr": scheduler.get_last_lr()[0]}, step=step)
        if saves:
            checkpoint()
        if validates and accelerator.is_main_process:
            _validate(task, model, step, config, accelerator, ema, params)
    bar.close()

    export_path = os.path.join(config.output_dir, config.export_name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        with outdir.writing(config.output_dir, f"writing the export {config.export_name}",
                            f"the trained weights are in {_names(checkpoints(config.output_dir)[-1:]) or 'no checkpoint'}"):
            task.export(export_path)
        after = task.heldout_check() if before is not None else None
        if ema is not None:
            ema.restore(params)
        say(summary(task, config, export_path, (first_step, step), time.monotonic() - started, before, after))
    accelerator.end_training()
    return export_path


def make_optimizer(task, config, device):
    """AdamW at --learning_rate, or with ``config.optimizer == "prodigy"`` Prodigy (the AdaFace paper's choice: a
    step size it finds itself, scaled by --prodigy_d_coef)."""
    groups = task.param_groups()
    if getattr(config, "optimizer", "adamw") == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=1.0, d_coef=config.prodigy_d_coef, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.adam_weight_decay,
                             fused=device.type == "cuda")  # one kernel launch set, not one per tensor


def expand_optimizer_state(optimizer: torch.optim.Optimizer,
                           mapping: dict[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Makes ``optimizer``'s state follow parameters a task grew in place (``mapping``: what ``after_step`` returned,
    e.g. ``adaface_expansion.expand_kv``'s, each grown parameter with how a tensor of its old shape grows): for every
    grown parameter the optimizer holds state for, each state tensor with dimensions (exp_avg, exp_avg_sq, p0, s, ...) goes through its map; scalars (``step``)
    and non-tensors stay as they are. Call it right after the expansion. A state tensor of another shape than the
    parameter's old one (a factored second moment, or state already expanded) is refused before anything changes."""
    updates = []
    for param, expand in mapping.items():
        state = optimizer.state.get(param)
        if not state:
            continue  # not held by this optimizer, or no step yet: its state will be created at the new shape
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                updates.append((state, key, expand(value)))
    for state, key, value in updates:
        state[key] = value


def _names(folders: list[str]) -> str:
    return ", ".join(os.path.basename(f) for f in folders)


def summary(task, config, export_path: str, steps: tuple[int, int], seconds: float, before, after) -> str:
    """What a finished run made, the evidence that it learned, and where everything is."""
    first, last = steps
    lines = [f"done: steps {first} to {last} in {seconds / 60:.1f} min",
             f"  export      {export_path}", f"              {task.describe_export()}"]
    if after is not None:
        when = "before training" if first == 0 else f"at step {first}"
        lines.append(f"  held-out    {task.heldout_line(before, after, when)}")
    else:
        lines.append("  held-out    not checked: pass --heldout_dataset (identities kept out of training, same layout)")
    folder = os.path.join(config.output_dir, "validation")
    if os.path.isdir(folder):
        count = len(os.listdir(folder))
        lines.append(f"  validation  {folder}{os.sep} ({count} image{'' if count == 1 else 's'})")
    if config.report_to == "tensorboard":
        lines.append(f"  logs        tensorboard --logdir {os.path.join(config.output_dir, 'logs')}")
    lines.append(f"  in ComfyUI  cp {export_path} ComfyUI/models/{task.comfyui_folder}/")
    return "\n".join(lines)


def _validate(task, model, step, config, accelerator, ema, params):
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        images = task.validate(model, step)
    finally:
        if ema is not None:
            ema.restore(params)
    if not images:
        return
    folder = os.path.join(config.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"step{step:07d}_{i}.png"))
    if config.report_to == "tensorboard":
        import numpy as np

        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
