"""The training loop every trainer shares: Accelerate (devices, mixed precision, multi-GPU/multi-node through
``accelerate launch``), optimiser and LR schedule, optional EMA, tqdm progress, TensorBoard logs, periodic
validation, checkpoints with exact resume, and an atomic export. A trainer supplies a *task*: what the loop needs of
it is ``training.task.TrainingTask``.

Checkpoints are written to ``checkpoint-<step>.tmp`` and renamed when complete, so killing the process at
any moment loses at most the steps since the last checkpoint and never leaves a half-written one. They hold
safetensors and JSON only (``training.checkpoint``): resuming reads no pickle. ``--resume latest`` skips a
checkpoint that fails ``checkpoint.check`` (truncated or garbled files) for the previous one and says so; the
options saved in a checkpoint are compared with this run's (``resume.check_resume_config``: a changed adapter
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

import contextlib
import json
import math
import os
import shutil
import time

import torch
from torch import nn

from ..nodes.errors import ConfigError
from . import checkpoint as ckpt
from . import outdir
from .options import TrainConfig
from .report import folder_names, save_validation, summary
from .resume import check_resume_config
from .task import Grow, TrainingTask


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


def main_print(accelerator):
    """``print`` on the main process only (``accelerator.print`` prints once per node)."""
    return print if accelerator.is_main_process else (lambda *args, **kwargs: None)


def run(task: TrainingTask, config: TrainConfig, accelerator=None) -> str:
    """Trains ``task`` for ``config.max_steps`` optimiser steps; returns the path of the exported weights.

    The output folder is held (``training.outdir.hold``) for the run; the CLI takes it before building the task,
    so a second run into one folder is refused before it loads anything."""
    accelerator = accelerator or make_accelerator(config)
    with outdir.hold(config.output_dir, accelerator, log=main_print(accelerator)):
        return _run(task, config, accelerator)


def _run(task: TrainingTask, config: TrainConfig, accelerator) -> str:
    from accelerate.utils import DistributedType, set_seed

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise ConfigError(f"{accelerator.distributed_type.value} is not supported (checkpoints and the export read the "
                         "whole trainable state on each process): run `accelerate config` with multi-GPU (DDP)")
    set_seed(config.seed)
    task.setup(accelerator)
    training = Training(task, config, accelerator)
    training.resume()
    training.record_options()
    return training.train()


class Training:
    """One run once its task is set up: the prepared model, optimiser and LR schedule, the EMA, the step reached;
    ``resume``, ``record_options`` and ``train`` run it."""

    def __init__(self, task: TrainingTask, config: TrainConfig, accelerator):
        from diffusers.optimization import get_scheduler

        self.task, self.config, self.accelerator = task, config, accelerator
        self.say = main_print(accelerator)
        self.processes, self.rank = accelerator.num_processes, accelerator.process_index
        self.params = [p for p in task.trainable.parameters() if p.requires_grad]
        self.task_after_step = getattr(task, "after_step", None)  # a GrowingTask's (read every step)
        optimizer = make_optimizer(task, config, accelerator.device)
        scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                  num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                  num_training_steps=config.max_steps * accelerator.num_processes)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(task.trainable, optimizer, scheduler)
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay)
        self.step = 0
        self.options = json.loads(config.to_json())  # saved in every checkpoint
        batch = getattr(config, "batch_size", None)
        if batch is not None:
            self.say(f"global batch {batch * self.processes * config.gradient_accumulation_steps} = batch {batch} x "
                     f"{self.processes} process(es) x {config.gradient_accumulation_steps} accumulation step(s)")

    def prepare_grown(self) -> None:
        """Accelerate's wrappers made anew around the same module, optimiser and schedule, after the task grew some
        parameters in place (their optimiser state already grown). A DDP wrapper's reducer holds the parameters'
        gradient accumulators, which recorded the old shapes (the next backward would fail: "invalid gradient ...
        expected shape compatible with" the old one), and buckets sized for them: every reference to the old wrappers
        is dropped and collected before the module is wrapped again."""
        accelerator = self.accelerator
        # the module as it was before the first prepare (its forward without the mixed-precision wrapper, and not
        # marked as prepared, which would make prepare hand it back as it is): prepare then wraps it as it did then
        module = accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        module.__dict__.pop("_is_accelerate_prepared", None)
        inner_optimizer, inner_scheduler = self.optimizer.optimizer, self.scheduler.scheduler
        accumulated = accelerator.step
        self.model = self.optimizer = self.scheduler = None
        accelerator.free_memory()  # accelerate's own references, then a garbage collection; it zeroes the step count
        accelerator.step = accumulated
        self.model, self.optimizer, self.scheduler = accelerator.prepare(module, inner_optimizer, inner_scheduler)

    # ---- resume

    def resume(self) -> None:
        """Continues from the checkpoint --resume names or finds, if any, saying what it skipped and changed."""
        config, say = self.config, self.say
        resume_from, skipped = ckpt.resolve_resume(config.resume, config.output_dir)
        for folder, why in skipped:
            say(f"skipped {folder} (not resumable: {why}); falling back to the previous checkpoint")
        if config.resume and not resume_from:
            say(f"no checkpoint in {config.output_dir}: starting from step 0")
        if not resume_from:
            return
        changed = check_resume_config(config, resume_from)  # before loading: another adapter shape is refused
        saved, has_rng = self.load(resume_from)
        if changed:
            say(f"resuming with changed options; the new values apply from step {self.step} on (learning rates and "
                f"weight decay included, the optimiser's moments are kept): {', '.join(changed)}")
        ignored = sorted(f for f in os.listdir(resume_from) if f.endswith((".pkl", ".bin", ".pt", ".pth")))
        if ignored:
            say(f"ignored in {resume_from} (pickles are never loaded): {', '.join(ignored)}")
        if saved.get("processes") != self.processes:
            say(f"note: {resume_from} was written by {saved.get('processes')} process(es), this run has "
                f"{self.processes}: the steps from here draw other examples, and the LR schedule (stepped once per "
                "process) shifts; resume with the same number of processes to continue exactly")
        if not has_rng:
            print(f"process {self.rank}: no RNG state for it in {resume_from}; continuing with its seeded RNG")
        say(f"resumed from {resume_from} at step {self.step}")

    def load(self, folder: str) -> tuple[dict, bool]:
        """Loads a checkpoint's trained tensors, optimiser, schedule, EMA, step and this process's RNG state; returns
        its state.json content and whether it held this process's RNG state."""
        accelerator = self.accelerator
        shapes = [p.shape for p in self.params]
        saved = ckpt.load_main(folder, self.task, self.optimizer, self.scheduler, self.ema, accelerator.scaler,
                               accelerator.device)
        if [p.shape for p in self.params] != shapes:  # the checkpoint was written after the task grew (fit_to_state)
            self.prepare_grown()
        self.step = saved["step"]
        accelerator.step = saved.get("accelerator_step", self.step * self.config.gradient_accumulation_steps)
        return saved, ckpt.load_rng(folder, self.rank)

    def record_options(self) -> None:
        """config.json in the output folder, and the options as TensorBoard's hyperparameters (logs/<trainer>/)."""
        config, accelerator = self.config, self.accelerator
        if not accelerator.is_main_process:
            return
        with outdir.writing(config.output_dir, "writing config.json", "nothing was lost"):
            os.makedirs(config.output_dir, exist_ok=True)
            with open(os.path.join(config.output_dir, "config.json"), "w") as f:
                f.write(config.to_json())
        if config.report_to != "none":
            accelerator.init_trackers(config.trainer, config={k: v for k, v in vars(config).items()
                                                              if isinstance(v, (int, float, str, bool))})

    # ---- training

    def train(self) -> str:
        """Steps until --max_steps, then exports; returns the export's path."""
        from tqdm.auto import tqdm

        config, main = self.config, self.accelerator.is_main_process
        started, first_step = time.monotonic(), self.step
        before = self.task.heldout_check() if main else None
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not main, desc="steps")
        while self.step < config.max_steps:
            logs = self.optimiser_step()
            self.step += 1
            self.after_step(logs, bar)
        bar.close()
        return self.finish(before, first_step, started)

    def optimiser_step(self) -> dict:
        """One optimiser step over --gradient_accumulation_steps micro-batches; returns the last one's logs."""
        config, accelerator = self.config, self.accelerator
        logs = {}
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(self.model):
                loss, logs = self.task.loss(self.model, self.step * config.gradient_accumulation_steps + micro)
                accelerator.backward(loss)
                # the graph's nodes hold the parameters' gradient accumulators, which record their shapes: none may
                # outlive the step, since a task may grow parameters in place between steps (after_step)
                del loss
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return logs

    def after_step(self, logs: dict, bar) -> None:
        """What follows an optimiser step: the loss checked, the EMA, the task's growth, progress and logs, and the
        periodic checkpoint and validation."""
        config, accelerator, step = self.config, self.accelerator, self.step
        logs_now = step % config.log_every == 0
        saves = step % config.checkpoint_every == 0 or step == config.max_steps
        validates = bool(config.validation_every and step % config.validation_every == 0)
        # the logs are read back to the host (a wait for the accelerator) only on steps that log, save or validate
        reads_back = logs_now or saves or validates
        # the mean over processes: every process sees the same value, so all stop (and a task's after_step, which
        # reads the loss every step, decides) together
        if (reads_back or self.task_after_step) and self.processes > 1:
            logs["loss"] = accelerator.reduce(logs["loss"].detach().float().reshape(1).to(accelerator.device), "mean")[0]
        if reads_back and not all(math.isfinite(float(v)) for v in logs.values()):
            raise FloatingPointError(f"step {step}: non-finite loss {logs} (read every --log_every steps and before "
                                     "each checkpoint, which is not written); lower --learning_rate or use bf16")
        if self.ema is not None:
            self.ema.step(self.params)
        grown = self.task_after_step(step, logs) if self.task_after_step else None
        if grown:
            self.grow(grown)
        bar.update(1)
        if reads_back:  # grouped keys ("group/name") are TensorBoard detail, kept off the progress bar
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items() if "/" not in k})
        if logs_now and config.report_to != "none":
            accelerator.log({**{k: float(v) for k, v in logs.items()}, "lr": self.scheduler.get_last_lr()[0]}, step=step)
        if saves:
            self.checkpoint()
        if validates and accelerator.is_main_process:
            self.validate()

    def grow(self, grown: dict[nn.Parameter, Grow]) -> None:
        """The task grew some parameters in place: their optimiser and EMA state grows the same way."""
        expand_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer), grown)
        if self.ema is not None:
            shadow = self.ema.shadow_params
            self.ema.shadow_params = [grown[p](s) if p in grown else s for p, s in zip(self.params, shadow)]
        self.prepare_grown()

    @contextlib.contextmanager
    def ema_weights(self):
        """The trained parameters hold the EMA weights inside the block (when there is an EMA), their own after it."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def validate(self) -> None:
        """The task's validation images, made with the EMA weights when there are some."""
        with self.ema_weights():
            images = self.task.validate(self.model, self.step)
        if images:
            save_validation(images, self.step, self.config, self.accelerator)

    # ---- checkpoints and the export

    def checkpoint(self) -> None:
        """checkpoint-<step>, written whole or not at all (an unwritable folder is a clear error, nothing lost)."""
        output_dir = self.config.output_dir
        final = os.path.join(output_dir, f"checkpoint-{self.step}")
        try:
            with outdir.writing(output_dir, f"writing checkpoint-{self.step}", f"the checkpoints already there are "
                                f"intact ({folder_names(ckpt.checkpoints(output_dir)) or 'none yet'}): resume with "
                                "--resume latest once the folder is writable"):
                self.write_checkpoint(final)
        except ConfigError:
            shutil.rmtree(final + ".tmp", ignore_errors=True)
            raise

    def write_checkpoint(self, final: str) -> None:
        accelerator, config, main = self.accelerator, self.config, self.accelerator.is_main_process
        tmp = final + ".tmp"
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()  # the folder exists before any process writes into it
        ckpt.save_rng(tmp, self.rank)
        if main:
            ckpt.save_main(tmp, self.task, self.optimizer, self.scheduler, self.ema, accelerator.scaler, self.step,
                           self.processes, accelerator.step, self.options, config.trainer)
        accelerator.wait_for_everyone()  # every process has finished writing: rename once
        if main:
            missing = [ckpt.rng_file(r) for r in range(self.processes)
                       if not os.path.isfile(os.path.join(tmp, ckpt.rng_file(r)))]
            if missing:
                raise RuntimeError(f"{tmp} lacks {missing}: with several nodes --output_dir must be on a file system "
                                   "every node sees")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if config.checkpoints_total_limit:  # 0 keeps every checkpoint
                for old in ckpt.checkpoints(config.output_dir)[:-config.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def finish(self, before, first_step: int, started: float) -> str:
        """The export (EMA weights when there are some), the held-out check after training and the summary."""
        config, accelerator, task = self.config, self.accelerator, self.task
        export_path = os.path.join(config.output_dir, config.export_name)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            last = folder_names(ckpt.checkpoints(config.output_dir)[-1:]) or "no checkpoint"
            with self.ema_weights():
                with outdir.writing(config.output_dir, f"writing the export {config.export_name}",
                                    f"the trained weights are in {last}"):
                    task.export(export_path)
                after = task.heldout_check() if before is not None else None
            self.say(summary(task, config, export_path, (first_step, self.step), time.monotonic() - started, before,
                             after))
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


def expand_optimizer_state(optimizer: torch.optim.Optimizer, mapping: dict[nn.Parameter, Grow]) -> None:
    """Makes ``optimizer``'s state follow parameters a task grew in place (``mapping``: what ``after_step`` returned,
    e.g. ``adaface_expansion.expand_kv``'s): for every grown parameter the optimizer holds state for, each state tensor
    with dimensions (exp_avg, exp_avg_sq, p0, s, ...) goes through its map; scalars (``step``) and non-tensors stay as
    they are. Call it right after the expansion. A state tensor of another shape than the
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
