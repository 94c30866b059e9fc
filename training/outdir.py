"""The output folder of a training run: one run at a time, checked writable up front, left-overs cleaned.

``hold(output_dir, accelerator)`` is entered by the CLI before anything heavy is built or loaded (and again, as a
no-op, by ``training.loop.run``):

- the main process creates the folder and checks that it can write into it; a folder it cannot create or write
  is a ConfigError that names it (nothing has been written yet, so nothing is lost);
- it takes an exclusive ``fcntl.flock`` on ``<output_dir>/train.lock`` for the whole run and writes its pid, host,
  start time and command line into that file. A second run into the same folder finds the lock taken and refuses
  with a ConfigError naming the first. The OS drops a flock when its process ends, however it ends (crash,
  ``kill -9``), so a stale lock file never blocks anyone; the file itself stays (deleting a lock file races with
  a run that has just opened it) and tells who ran last. Other processes of the same run (``torchrun`` ranks)
  take no lock: the main process broadcasts its outcome, so every rank of a refused run stops with the same
  message and every rank of an accepted run goes on;
- with the lock held, it removes what interrupted runs left behind: ``checkpoint-<n>.tmp`` folders (a checkpoint
  that was being written) and ``<file>.tmp-<pid>`` files (``nodes.arch.files.write_safetensors``: an export, the
  face cache, a checkpoint file). Every writer of these files in this folder is a trainer, every trainer holds
  this lock while it writes, and this run has not started writing: so while we hold the lock every such file is
  a left-over, whatever its pid (checking the pid would not do: it may be another machine's, or reused). A
  ``--cache_dir`` outside the output folder may be shared by runs that do not share this lock, so it is not
  cleaned.

fcntl exists on Linux and macOS; elsewhere (Windows) or on a file system without lock support the run goes on
unlocked and says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time

from ..nodes.errors import ConfigError

LOCK_FILE = "train.lock"
_TMP_FILE = re.compile(r".+\.tmp-\d+$")
_TMP_CHECKPOINT = re.compile(r"checkpoint-\d+\.tmp$")
_held: dict[str, list] = {}  # realpath -> [depth, open lock file or None] for this process
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def unwritable(folder: str, exc: OSError, doing: str, lost: str) -> ConfigError:
    """The error for a folder the run cannot write to: which folder, why, what is (not) lost, what to do."""
    return ConfigError(f"cannot write to the output folder {folder!r} ({doing}: {type(exc).__name__}: "
                       f"{exc.strerror or exc}); {lost}. Fix its permissions or free space, or pass another "
                       "--output_dir")


@contextlib.contextmanager
def writing(folder: str, doing: str, lost: str):
    """Turns a permission / read-only / disk-full error while writing into ``folder`` into a ConfigError."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        raise unwritable(folder, exc, doing, lost) from exc


def _prepare(output_dir: str) -> None:
    lost = "nothing was written and nothing was lost"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir!r} is a file, not a folder: pass a folder (it is created "
                          "when missing)")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise unwritable(output_dir, exc, "creating it", lost) from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):  # as root this is always true: the lock file write decides
        raise unwritable(output_dir, PermissionError(errno.EACCES, "no write permission"), "checking it", lost)


def _describe_holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}, "
                f"command: {info.get('command')}")
    except (OSError, ValueError):
        return "a process that has not written its details yet"


def _lock(output_dir: str):
    """The open, exclusively locked lock file, or None where this platform / file system cannot lock."""
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        import fcntl
    except ImportError:
        print(f"note: {output_dir} is not locked (no fcntl on this platform): make sure no other run writes into it")
        return None
    try:
        handle = open(path, "a+", encoding="utf-8")  # not "w": that would erase the holder's details before we know
    except OSError as exc:
        if exc.errno in UNWRITABLE:
            raise unwritable(output_dir, exc, f"creating {LOCK_FILE}", "nothing was written and nothing was lost") from exc
        raise
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ConfigError(f"--output_dir {output_dir!r} is in use by another training run ({_describe_holder(path)}). "
                              "Two runs in one folder would overwrite each other's checkpoints and export: wait for it "
                              "to finish (or stop it), or pass another --output_dir") from None
        print(f"note: {output_dir} is not locked ({exc.strerror or exc}; the file system may not support locks): "
              "make sure no other run writes into it")
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([sys.executable, *sys.argv])}
    with writing(output_dir, f"writing {LOCK_FILE}", "nothing was lost"):
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
    return handle


def clean_leftovers(output_dir: str) -> list[str]:
    """Removes interrupted runs' temporary files and checkpoint folders (call only while holding the lock)."""
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _TMP_CHECKPOINT.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for folder, dirs, files in os.walk(output_dir):
        for name in files:
            if _TMP_FILE.match(name):
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                removed.append(path)
    return removed


def _claim(output_dir: str, log) -> tuple[object, str | None]:
    try:
        _prepare(output_dir)
        handle = _lock(output_dir)
    except ConfigError as exc:
        return None, str(exc)
    try:
        with writing(output_dir, "removing left-over temporary files", "nothing was lost"):
            removed = clean_leftovers(output_dir)
    except ConfigError as exc:
        handle and handle.close()
        return None, str(exc)
    if removed:
        shown = ", ".join(os.path.relpath(p, output_dir) for p in removed[:5])
        log(f"removed {len(removed)} temporary file(s)/folder(s) of an interrupted run in {output_dir}: {shown}"
            + (" ..." if len(removed) > 5 else ""))
    return handle, None


@contextlib.contextmanager
def hold(output_dir: str, accelerator=None, log=print):
    """Holds ``output_dir`` for this run (see the module docstring). Re-entrant within a process."""
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][0] += 1
        try:
            yield
        finally:
            _held[key][0] -= 1
        return
    main = accelerator is None or accelerator.is_main_process
    handle, problem = _claim(output_dir, log) if main else (None, None)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem], from_process=0)[0]  # every rank stops, or none
    if problem:
        raise ConfigError(problem)
    _held[key] = [1, handle]
    try:
        yield
    finally:
        del _held[key]
        if handle is not None:
            handle.close()  # closing the file releases the flock
