"""Training checkpoints as safetensors + JSON only: resuming from a folder someone sent you runs no code.

Accelerate's ``save_state``/``load_state`` are not used: they write the optimizer and LR schedule with
``torch.save`` (pickles), each rank's RNG state as ``random_states_<rank>.pkl`` (a pickle, read back with
``torch.load(weights_only=True)`` and a small allow-list, and silently skipped when it fails), and every object
given to ``register_for_checkpointing`` as ``custom_checkpoint_<i>.pkl``, read back with ``weights_only=False``,
i.e. full unpickling, which runs whatever code the file names. ``load_state`` also refuses a folder holding more
``custom_checkpoint_*.pkl`` files than registered objects. Here every file is read with safetensors or ``json``;
any other file in the folder is never opened.

A checkpoint folder (all ranks write into the same folder, so multi-node runs need ``output_dir`` on a file
system every node sees)::

    trainable.safetensors   the trained tensors (task.trainable_state(); the frozen base is never copied)
    optimizer.safetensors   the optimiser's per-parameter tensors; param groups and scalars as JSON metadata
    ema.safetensors         the EMA shadow parameters and its scalars (with --use_ema)
    rng-<rank>.safetensors  each process's torch / CUDA / numpy / python RNG state
    state.json              step, number of processes, LR schedule, gradient scaler (fp16), the run's options, the
                            trainer's name

Resuming first checks a folder cheaply (``check``: state.json parses, every safetensors header is whole and covers
the file, as safetensors verifies on opening), so a truncated or garbled newest checkpoint is skipped for the
previous one before anything is loaded (``resolve_resume``).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from ..nodes.errors import ConfigError, ModelFileError

FORMAT = "training-checkpoint/1"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.json"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


class CheckpointError(ModelFileError):
    """A checkpoint folder that cannot be resumed from (missing or corrupt files); the message says why."""


def _write(tensors: dict[str, torch.Tensor], path: str, meta: dict) -> None:
    from ..nodes.arch.files import write_safetensors

    write_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                      {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}})


def _read(path: str, device="cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k).to(device) for k in f.keys()} if device is not None else {}
        return {k: json.loads(v) for k, v in meta.items() if k != "format"}, tensors
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own error (truncated, garbled header) or bad JSON metadata
        raise CheckpointError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc


def check(folder: str) -> dict:
    """Cheap completeness check of a checkpoint folder (no tensor is read); returns its state.json content."""
    state = read_state(folder)
    for name in sorted(os.listdir(folder)):
        if name in (TRAINABLE_FILE, OPTIMIZER_FILE, EMA_FILE) or (name.startswith("rng-") and name.endswith(".safetensors")):
            _read(os.path.join(folder, name), device=None)
    for name in (TRAINABLE_FILE, OPTIMIZER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{folder} has no {name}")
    return state


# ---- which checkpoint a run resumes from


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d[11:]))]


def resolve_resume(resume: str, output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint to resume from (None: start at step 0) and the newer ones skipped as incomplete or corrupt,
    with the reason. ``latest`` falls back to the newest checkpoint that passes ``check``; a folder named
    explicitly must pass it."""
    if not resume:
        return None, []
    if resume == "latest":
        skipped = []
        for folder in reversed(checkpoints(output_dir)):
            try:
                check(folder)
                return folder, skipped
            except CheckpointError as exc:
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
        check(resume)
    except CheckpointError as exc:
        raise ConfigError(f"--resume {resume!r} cannot be used: {exc}. Pass an older checkpoint, or 'latest' "
                          "(which skips broken ones)") from exc
    return resume, []


# ---- the main process's part: trained tensors, optimiser, EMA, step and schedule


def save_main(folder: str, task, optimizer, scheduler, ema, scaler, step: int, processes: int,
              accelerator_step: int, config: dict | None = None, trainer: str | None = None) -> None:
    """Writes the main process's part; ``config`` is the run's options and ``trainer`` the trainer's name (a resume
    by another trainer is refused naming it)."""
    _write(task.trainable_state(), os.path.join(folder, TRAINABLE_FILE), {})

    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    _write(tensors, os.path.join(folder, OPTIMIZER_FILE), {"param_groups": opt["param_groups"], "scalars": scalars})

    if ema is not None:
        state = ema.state_dict()
        shadow = state.pop("shadow_params")
        _write({f"shadow.{i}": p for i, p in enumerate(shadow)}, os.path.join(folder, EMA_FILE), {"state": state})

    state = {"format": FORMAT, "step": step, "processes": processes, "accelerator_step": accelerator_step,
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "config": config, "trainer": trainer}
    try:
        text = json.dumps(state, indent=1)
    except TypeError as exc:
        raise CheckpointError(f"the LR schedule or gradient scaler state is not plain data ({exc}); "
                              "use one of the --lr_scheduler choices") from exc
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
        f.write(text)


def read_state(folder: str) -> dict:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no {STATE_FILE}: not a checkpoint of this trainer (checkpoints written "
                              "before the pickle-free format cannot be resumed)")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the checkpoint is corrupt or truncated") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} is not a {FORMAT} state file")
    return state


def load_main(folder: str, task, optimizer, scheduler, ema, scaler, device) -> dict:
    """Restores what ``save_main`` wrote (every process calls this); returns the state.json content."""
    state = read_state(folder)
    trainable = _read(os.path.join(folder, TRAINABLE_FILE))[1]
    if hasattr(task, "fit_to_state"):  # parameters that grew during the run (AdaFace's model expansion)
        task.fit_to_state(trainable)
    check_trainable_shapes(folder, task.trainable_state(), trainable)
    task.load_trainable_state(trainable)

    meta, tensors = _read(os.path.join(folder, OPTIMIZER_FILE))
    current = optimizer.state_dict()["param_groups"]
    groups = meta["param_groups"]
    if len(groups) != len(current):
        raise CheckpointError(f"{folder}: the optimiser has {len(groups)} parameter groups, this run {len(current)}")
    for saved, now in zip(groups, current):
        for key, value in now.items():  # JSON turned tuples (Adam's betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    # this run's hyperparameters (from its options) win over the checkpoint's: see keep_hyperparameters
    wanted = [{k: g[k] for k in ("initial_lr", "weight_decay") if k in g} for g in current]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})

    scheduler.load_state_dict(state["scheduler"])
    keep_hyperparameters(optimizer, scheduler, wanted)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])

    if ema is not None:
        path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} holds no EMA ({EMA_FILE}) but this run uses --use_ema")
        meta, tensors = _read(path, device)
        ema_state = dict(meta["state"], shadow_params=[tensors[f"shadow.{i}"] for i in range(len(tensors))])
        if len(ema_state["shadow_params"]) != len(ema.shadow_params):
            raise CheckpointError(f"{path} holds {len(tensors)} EMA tensors; this run has {len(ema.shadow_params)}")
        ema.load_state_dict(ema_state)
    return state


ARCHITECTURE_HINT = ("--num_tokens, --mff_width, --mff_heads, --embed_dim, --textual_hidden, --num_images or the "
                     "base model")


def check_trainable_shapes(folder: str, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """A checkpoint of another adapter shape is a ConfigError (not a state-dict traceback)."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(expected) & set(saved) if tuple(expected[k].shape) != tuple(saved[k].shape))
    if not (missing or extra or shapes):
        return
    details = [f"{k}: checkpoint {tuple(saved[k].shape)}, this run {tuple(expected[k].shape)}" for k in shapes[:3]]
    details += [f"{len(missing)} tensor(s) missing (e.g. {missing[0]})"] if missing else []
    details += [f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]})"] if extra else []
    raise ConfigError(f"{folder} holds an adapter of another shape than this run builds ({'; '.join(details)}): "
                      f"{ARCHITECTURE_HINT} differ from the run that wrote it. Resume with that run's values (its "
                      "config.json), or start a new --output_dir")


def keep_hyperparameters(optimizer, scheduler, wanted: list[dict]) -> None:
    """After loading a checkpoint, puts this run's base learning rates and weight decay back into the optimiser and
    the LR schedule (which both saved the old ones), so that a changed --learning_rate, --kv_learning_rate or
    --adam_weight_decay really applies from the resumed step on. Unchanged values are left untouched (an unchanged
    resume stays bit-exact)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    for i, (group, new) in enumerate(zip(optimizer.param_groups, wanted)):
        if "weight_decay" in new and group.get("weight_decay") != new["weight_decay"]:
            group["weight_decay"] = new["weight_decay"]
        base = new.get("initial_lr")
        if base is None or group.get("initial_lr") == base:
            continue
        group["initial_lr"] = base
        if hasattr(inner, "base_lrs"):
            inner.base_lrs[i] = base
        lambdas = getattr(inner, "lr_lambdas", None)
        group["lr"] = base * lambdas[i](inner.last_epoch) if lambdas else base
    if hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in optimizer.param_groups]


# ---- every process's part: its RNG state


def save_rng(folder: str, rank: int) -> None:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    _write(tensors, os.path.join(folder, rng_file(rank)),
           {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]})


def load_rng(folder: str, rank: int) -> bool:
    """Restores this process's RNG state; False when the checkpoint has none for ``rank`` (fewer processes)."""
    path = os.path.join(folder, rng_file(rank))
    if not os.path.isfile(path):
        return False
    meta, tensors = _read(path)
    torch.set_rng_state(tensors["torch"])
    (version, gauss), (kind, pos, has_gauss, cached) = meta["python"], meta["numpy"]
    random.setstate((version, tuple(int(w) for w in tensors["python"].tolist()), gauss))
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    return True
