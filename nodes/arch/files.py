"""Safetensors files of this pack: written atomically, read with the checks every loader needs."""

from __future__ import annotations

import contextlib
import os
import stat

import torch

from ..errors import ModelFileError


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Writes to a temporary file and renames it, so a crash never leaves a half-written file behind.

    The file gets the mode ``open()`` would give it (0o666 less the umask): safetensors' ``save_file`` makes
    owner-only files, which a ComfyUI running as another user cannot read.
    """
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)  # a leftover of a crashed run would keep its own mode
    # creating the file ourselves reads the umask's mode without os.umask(), which would change it for every thread
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_safetensors(path: str, expected_format: str, what: str, writer: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file whose ``__metadata__["format"]`` must be ``expected_format``.

    ``what`` names the kind of file in messages ("IDAdapter file"), ``writer`` says what makes such files.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ModelFileError(f"{what} not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}); expected a {what} written by {writer}"
        ) from exc
    if meta.get("format") != expected_format:
        raise ModelFileError(
            f"{os.path.basename(path)} has format {meta.get('format')!r}, expected {expected_format!r} "
            f"({what}, written by {writer})"
        )
    return meta, tensors
