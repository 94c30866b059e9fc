"""Safetensors files of this pack: written atomically, read with the checks every loader needs; the check every
model path gets before anything opens it (:func:`check_regular_file`) and the one way PyTorch files are read
(:func:`read_tensors_only`); and the fingerprints that name the model file a file's values came from.

Reading goes in two steps on one open file: the header (format, metadata, tensor shapes) first, so that a loader
can refuse a file whose shapes do not fit before anything is allocated, then the tensor data, refusing NaN and
infinities. safetensors itself checks that the header's shapes add up to the file's size, so tensors read from a
file whose header passed the loader's check can never take more memory than the file holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import stat
import zipfile
from typing import Iterator

import torch

from ..errors import ModelFileError


# what the temporary file of write_safetensors adds to the name: ".tmp-<pid>" (pids have at most 10 digits)
TEMPORARY_SUFFIX_MAX_BYTES = len(".tmp-") + 10


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str], *,
                      replace: bool = True) -> None:
    """Writes to a temporary file and renames it, so a crash never leaves a half-written file behind.

    The file gets the mode ``open()`` would give it (0o666 less the umask): safetensors' ``save_file`` makes
    owner-only files, which a ComfyUI running as another user cannot read.

    ``replace=False`` never replaces anything at ``path``: FileExistsError when something is there, checked in the
    same step that puts the file in place, so a file made meanwhile by another process is never lost.
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
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _place_new(tmp: str, path: str) -> None:
    """Gives the finished ``tmp`` the name ``path`` unless something has that name (FileExistsError)."""
    try:
        os.link(tmp, path)  # fails when path exists: unlike a rename, a link never replaces
    except FileExistsError:
        raise
    except OSError:
        # no hard links on this file system (FAT, some network shares): claim the name with an empty file, then
        # rename over that claim; a crash in between leaves that empty file, never a replaced one
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
    else:
        os.remove(tmp)


class SafetensorsReader:
    """An open safetensors file whose format has been checked: ``metadata``, ``shapes`` (from the header, nothing
    read yet) and :meth:`tensors` to read the data."""

    def __init__(self, path: str, handle, metadata: dict[str, str], what: str, writer: str):
        self.path, self._handle, self.metadata, self._what, self._writer = path, handle, metadata, what, writer
        self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file; NaN or infinite values are refused, naming the tensor."""
        tensors = {}
        for name in self._handle.keys():
            tensor = self._handle.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ModelFileError(
                    f"{self.path}: tensor {name!r} holds NaN or infinite values, expected finite numbers; the "
                    f"{self._what} is damaged or came from a diverged run: write it again with {self._writer}"
                )
            tensors[name] = tensor
        return tensors


@contextlib.contextmanager
def open_safetensors(path: str, expected_format: str, what: str, writer: str) -> Iterator[SafetensorsReader]:
    """The file at ``path``, open, once its ``__metadata__["format"]`` is known to be ``expected_format``.

    ``what`` names the kind of file in messages ("IDAdapter file"), ``writer`` says what makes such files.
    """
    from safetensors import safe_open

    # safe_open reports every failure to open a file as FileNotFoundError: a permission problem is told apart first
    check_readable_file(path, what)
    try:
        handle_context = safe_open(path, framework="pt")
    except Exception as exc:
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}); expected a {what} written by {writer}"
        ) from exc
    with handle_context as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != expected_format:
            raise ModelFileError(
                f"{os.path.basename(path)} has format {meta.get('format')!r}, expected {expected_format!r} "
                f"({what}, written by {writer})"
            )
        yield SafetensorsReader(path, handle, meta, what, writer)


_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str, what: str, fix: str = "") -> None:
    """Refuses ``path`` unless it is a regular file or a symbolic link to one, from its metadata alone: a FIFO would
    block the reader and a device such as /dev/zero would feed it without end, so neither is ever opened. ``what``
    names the file in messages ("face model"), ``fix`` says how to get a good one."""
    fix = f" {fix}" if fix else ""
    link = os.readlink(path) if os.path.islink(path) else None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if link is not None:
            raise ModelFileError(f"{what} {path} is a dangling symbolic link: it points to {link!r}, which does not "
                                 f"exist; link it to the model file itself, or put the file there.{fix}") from None
        raise ModelFileError(f"{what} not found: {path}.{fix}") from None
    except (OSError, ValueError) as exc:  # a loop of links, a name too long, a folder on the way without access
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ModelFileError(f"cannot look at {what} {path}: {reason}.{fix}") from None
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
    through = f"a symbolic link to {link!r}, which is " if link is not None else ""
    never_opened = "" if stat.S_ISDIR(mode) else " (never opened here: reading it would block or never end)"
    raise ModelFileError(f"{what} {path} is not a regular file: it is {through}{kind}{never_opened}; put the model "
                         f"file itself at this path.{fix}")


def check_readable_file(path: str, what: str, fix: str = "") -> None:
    """:func:`check_regular_file`, then a permission problem told apart from what a reader would report."""
    check_regular_file(path, what, fix)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ModelFileError(f"cannot read {path}: permission denied; expected a {what} readable by the user running "
                             f"ComfyUI (give it read access, e.g. chmod a+r)") from None


_LEGACY_RESAVE = "torch.save(torch.load(old, weights_only=True), new)"


def read_tensors_only(path: str, what: str, fix: str, mmap: bool = True):
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a ModelFileError in the pack's own words.

    Nothing the pickle names runs (``weights_only``). With ``mmap`` the tensors stay in the file until read, which
    only the zip format allows (the legacy format of PyTorch < 1.6 would allocate every storage the pickle
    declares before anything is checked), so other files are refused. torch's refusal text advises loading the
    file again with ``weights_only=False``, which would run whatever code the file carries: only the name of what
    was refused is passed on, never that text. ``what`` names the file ("W+ adapter file"), ``fix`` says what a
    good file is."""
    check_readable_file(path, what, fix)
    if mmap and not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a PyTorch zip checkpoint: a truncated or damaged download, not a PyTorch file at all, or "
            f"a file in the legacy format of PyTorch < 1.6, which cannot be read memory-mapped. {fix}; a "
            f"legacy-format copy can be re-saved once with a current PyTorch: {_LEGACY_RESAVE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors and plain data
        refused = _refused_by_weights_only(str(exc))
    except Exception as exc:  # a truncated or corrupt archive, a record that does not add up
        raise ModelFileError(f"{path} cannot be read as a tensors-only PyTorch file ({_first_line(exc)}): a "
                             f"truncated or damaged download? {fix}") from exc
    # raised outside the except block, so that torch's text (and its advice) is not chained onto ours
    raise ModelFileError(
        f"{path} was refused unread: {refused}. Only tensors-only PyTorch files are read (tensors, numbers, strings, "
        f"lists, dicts): a file that needs code of its own to load is refused on purpose, since loading it would "
        f"run that code. {fix}")


def _refused_by_weights_only(text: str) -> str:
    """What weights_only refused, in a few words: the global the pickle names, or else torch's reason, never a part
    of its text that advises allowing more."""
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"the pickle names {named.group(1)}, which is neither a tensor nor plain data"
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    sentence = reason.group(1).split(". ")[0].strip().rstrip(".") if reason else ""
    if sentence and not re.search(r"weights_only|safe_globals|trust", sentence):
        return f"the pickle holds something other than tensors and plain data ({sentence[:200]})"
    return "the pickle holds something other than tensors and plain data"


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(exc).__name__}: {lines[0].strip()[:300]}" if lines else type(exc).__name__


def looks_like_safetensors(path: str) -> bool:
    """Whether a file starts as safetensors does (an 8-byte header length, then the JSON header's "{"), whatever its
    name says: a renamed file still goes to the reader of what it holds (torch's files start "PK" or with a pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return path.lower().endswith(".safetensors")  # the reader then says what is wrong with it
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def first_few(names: list) -> str:
    """Up to four items of a sorted list, with how many more there are."""
    return f"{names[:4]}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_shapes(path: str, shapes: dict[str, tuple], expected: dict[str, tuple], against: str, fix: str) -> None:
    """Refuses a file whose header ``shapes`` are not exactly ``expected`` (names and shapes), before any tensor is
    read. ``against`` says where ``expected`` comes from ("its own config"), ``fix`` how to get a good file."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} has shape {shapes[k]}, expected {expected[k]}"
             for k in sorted(set(expected) & set(shapes)) if tuple(shapes[k]) != tuple(expected[k])]
    problems = ([f"missing {first_few(missing)}"] if missing else []) + \
               ([f"unexpected tensors {first_few(unexpected)}"] if unexpected else []) + wrong[:4] + \
               ([f"{len(wrong) - 4} more shapes differ"] if len(wrong) > 4 else [])
    if problems:
        raise ModelFileError(f"{path} does not match {against}: {'; '.join(problems)}. {fix}")


# (absolute path, size, mtime) -> fingerprint: a file is hashed once per version of it
_fingerprints: dict[tuple, str] = {}
MAX_FINGERPRINT = 256


def file_fingerprint(path: str) -> str:
    """``"<file name>:<first 16 hex digits of the sha256 of its bytes>"``: which weights a file holds, wherever it is.

    The name is for people reading messages; the digest decides (:func:`same_weights`), so a renamed copy of a
    file is the same file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        with open(path, "rb") as f:  # in chunks: a recognizer is 170-250 MB (hashlib.file_digest needs Python 3.11)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _fingerprints[key] = f"{os.path.basename(path)}:{digest.hexdigest()[:16]}"
    return _fingerprints[key]


def same_weights(fingerprint_a: str, fingerprint_b: str) -> bool:
    """Whether two fingerprints name the same bytes (their digests are equal, whatever the file names)."""
    return fingerprint_a.rpartition(":")[2] == fingerprint_b.rpartition(":")[2]


def check_fingerprint(value, where: str, fix: str) -> str:
    """``value`` when it can be a fingerprint ("" = unknown): a string of at most MAX_FINGERPRINT printable
    characters (it goes into messages). ``where`` names its source, ``fix`` how to get a good one."""
    if not isinstance(value, str) or len(value) > MAX_FINGERPRINT or not value.isprintable():
        if not isinstance(value, str):
            shown = type(value).__name__
        else:
            shown = repr(value) if len(value) <= 60 else f"{value[:40]!r}... ({len(value)} characters)"
        raise ModelFileError(f"{where}: the recognizer must be a file fingerprint such as "
                             f"'glintr100.onnx:0123456789abcdef' (at most {MAX_FINGERPRINT} printable characters), "
                             f"got {shown}. {fix}")
    return value


def materialized(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``module`` (built on the ``meta`` device) on the CPU in float32, holding ``state``, ready for inference.

    The values are copied into fresh, aligned storage: tensors read from a file sit at arbitrary offsets (or in a
    memory map), where CPU kernels take other paths and give results that differ in the last bit.
    """
    module.to_empty(device="cpu").load_state_dict(state)
    return module.eval().requires_grad_(False)


def metadata_json(meta: dict[str, str], path: str, name: str, what: str, fix: str):
    """The metadata field ``name`` of a safetensors file, parsed as JSON (its values not yet checked); a missing
    field or one that is not JSON is refused, naming ``what`` the field should hold and ending in ``fix``."""
    if meta.get(name) is None:
        raise ModelFileError(f"{path}: the metadata has no {name!r} field ({what}). {fix}")
    try:
        return json.loads(meta[name])
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise ModelFileError(f"{path}: the metadata field {name!r} is not JSON ({type(exc).__name__}). {fix}") from exc
