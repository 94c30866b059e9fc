"""The file a kind of Load node loaded last, kept while the file is unchanged (ComfyUI re-runs Load nodes when a
graph changes; reloading a large file each time would be slow). One file per kind stays in memory: loading
another drops the previous one first."""

from __future__ import annotations

import os
import threading


class ResidentFile:
    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._value = None

    def get(self, paths: tuple[str, ...], load):
        """``load()``'s result for ``paths`` as they are now on disk (path, modification time, size), loaded once."""
        key = tuple((path, os.path.getmtime(path), os.path.getsize(path)) for path in paths)
        with self._lock:
            if key != self._key:
                self._key, self._value = None, None  # let go of the previous file before reading the next
                self._value = load()
                self._key = key
            return self._value
