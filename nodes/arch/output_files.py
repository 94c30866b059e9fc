"""Numbered files under ComfyUI's output folder, as the save nodes write them: ``<folder>/<name>_00001_.safetensors``.

``filename_prefix`` reads as in ComfyUI's own save nodes (``face_embeds/anna`` saves ``face_embeds/anna_00001_``;
``%year%``, ``%month%``, ``%day%``, ``%hour%``, ``%minute%`` and ``%second%`` become the date and time), with three
differences that keep files from being lost or hidden:

- a prefix ending in ``/`` names a folder, in which the file name is ``face`` (``people/anna/`` saves
  ``people/anna/face_00001_``); ComfyUI would save ``people/anna_00001_`` and overwrite it on every save;
- a prefix naming an existing folder without the ``/`` is refused, saying to add it (ComfyUI saves a file beside the
  folder, where no loader looks for it);
- no existing file is ever replaced: each save takes the next free number, atomically, so that two saves at once
  get two numbers.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable

from ..errors import ConfigError
from .files import TEMPORARY_SUFFIX_MAX_BYTES

DEFAULT_NAME = "face"  # the file name of a prefix that ends in "/"; the save nodes' defaults end in it too
NAME_MAX = 255  # bytes per file or folder name on common file systems (ext4, APFS, NTFS in UTF-16 units)
PREFIX_TOOLTIP = ("folder/name under the output folder; each save adds _00001_, _00002_, ... and never replaces a "
                  f"file; ending in / saves into that folder as {DEFAULT_NAME}_00001_; %year%, %month%, %day% "
                  "become the date")
_TIME_FIELDS = {"%year%": "%Y", "%month%": "%m", "%day%": "%d", "%hour%": "%H", "%minute%": "%M", "%second%": "%S"}
_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)


def save_to_new_file(output_dir: str, filename_prefix: str, write: Callable[[str], None],
                     extension: str = ".safetensors") -> str:
    """Saves through ``write`` to the first free ``<name>_<counter>_<extension>`` that ``filename_prefix`` names under
    ``output_dir``; returns the path written.

    ``write(path)`` must create ``path`` only if nothing is there, raising FileExistsError otherwise (the writers'
    ``replace=False``): a file that appears after the folder was listed then moves the save on to the next number.
    A prefix that cannot name a file in the output folder is a ConfigError saying what to type instead.
    """
    folder, name = resolve_prefix(output_dir, filename_prefix, extension)
    make_folder(folder, filename_prefix)
    counter = next_counter(folder, name)
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_{extension}")
        try:
            write(path)
            return path
        except FileExistsError:
            if not os.path.lexists(path):
                raise
            counter += 1
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}. Expected a writable output folder with "
                              f"free space; check its permissions and free space, or choose another "
                              f"filename_prefix") from exc


def resolve_prefix(output_dir: str, filename_prefix: str, extension: str) -> tuple[str, str]:
    """The folder (absolute, inside ``output_dir``) and the file name that ``filename_prefix`` names."""
    example = f"expected a name such as {DEFAULT_NAME!r} or a path in the output folder such as " \
              f"'people/{DEFAULT_NAME}' ('people/' alone saves people/{DEFAULT_NAME}_00001_{extension})"
    if not isinstance(filename_prefix, str) or not filename_prefix.strip():
        raise ConfigError(f"filename_prefix is empty: {example}")
    prefix = filename_prefix.strip()
    bad = next((c for c in prefix if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ConfigError(f"filename_prefix {prefix!r} contains the control character {bad!r} at position "
                          f"{prefix.index(bad)}, which no file name may hold: {example}")
    for field, code in _TIME_FIELDS.items():
        prefix = prefix.replace(field, time.strftime(code))
    if os.path.isabs(prefix) or os.path.splitdrive(prefix)[0]:
        raise ConfigError(f"filename_prefix {filename_prefix!r} is an absolute path; saves stay in the output "
                          f"folder {os.path.abspath(output_dir)}: {example}")
    names_a_folder = prefix.endswith(_SEPARATORS)
    if names_a_folder:
        subfolder, name = prefix.rstrip("".join(_SEPARATORS)), DEFAULT_NAME
    else:
        subfolder, name = os.path.split(prefix)
    if name.startswith("."):
        raise ConfigError(f"filename_prefix {filename_prefix!r}: the file name {name!r} starts with '.', which "
                          f"would make a hidden file (or name a folder): {example}")
    root = os.path.abspath(output_dir)
    folder = os.path.normpath(os.path.join(root, subfolder))
    try:
        inside = os.path.commonpath((root, folder)) == root
    except ValueError:  # another drive
        inside = False
    if not inside:
        raise ConfigError(f"filename_prefix {filename_prefix!r} leads out of the output folder {root} (to {folder}): "
                          f"{example}")
    for part in subfolder.replace(os.altsep or os.sep, os.sep).split(os.sep):
        _check_length(part, NAME_MAX, "the folder name", filename_prefix)
    suffix_bytes = len(f"_00001_{extension}") + TEMPORARY_SUFFIX_MAX_BYTES
    _check_length(name, NAME_MAX - suffix_bytes, "the file name", filename_prefix)
    if not names_a_folder and os.path.isdir(os.path.join(folder, name)):
        raise ConfigError(f"filename_prefix {filename_prefix!r} names the folder {os.path.join(folder, name)}: end "
                          f"it with '/' to save into that folder ({prefix}/{DEFAULT_NAME}_00001_{extension}), or "
                          f"add a file name ({prefix}/anna)")
    return folder, name


def _check_length(part: str, limit: int, what: str, filename_prefix: str) -> None:
    try:
        size = len(os.fsencode(part))
    except UnicodeEncodeError as exc:
        raise ConfigError(f"filename_prefix {filename_prefix!r}: {what} {part!r} cannot be written on this file "
                          f"system ({exc.reason}); use other characters") from exc
    if size > limit:
        shown = part if len(part) <= 40 else f"{part[:30]}...{part[-6:]}"
        raise ConfigError(f"filename_prefix: {what} {shown!r} is {size} bytes long; at most {limit} bytes fit "
                          f"(file systems allow {NAME_MAX} per name, and the save adds its number and extension): "
                          f"shorten it, or split it into folders with '/'")


def make_folder(folder: str, filename_prefix: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"filename_prefix {filename_prefix!r} needs the folder {folder}, but a file of that name "
                          f"(or of a folder above it) is in the way: choose another filename_prefix, or move the "
                          f"file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create the folder {folder} for filename_prefix {filename_prefix!r}: "
                          f"{exc.strerror or exc}. Expected a folder that ComfyUI can write; check the permissions "
                          f"of the output folder, or choose another filename_prefix") from exc


def next_counter(folder: str, name: str) -> int:
    """One more than the highest number of the entries named ``<name>_<number>_...`` in ``folder`` (files of any
    extension and folders count, as in ComfyUI's save nodes), or 1."""
    numbered = re.compile(re.escape(name) + r"_(\d+)_")
    try:
        entries = os.listdir(folder)
    except OSError as exc:
        raise ConfigError(f"cannot list the folder {folder}: {exc.strerror or exc}. Expected a folder that ComfyUI "
                          f"can read and write; check its permissions, or choose another filename_prefix") from exc
    numbers = [int(match.group(1)) for entry in entries if (match := numbered.match(entry))]
    return max(numbers, default=0) + 1
