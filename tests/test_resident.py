"""The Load nodes' file cache: one file per kind, loaded once while it is unchanged."""

import os

from comfyui_idadapter.nodes.resident import ResidentFile


def test_a_file_is_loaded_once_until_it_changes_and_another_replaces_it(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"1")
    second.write_bytes(b"22")
    resident, loads = ResidentFile(), []

    def load(name):
        def run():
            loads.append((name, resident._value))  # what was still held while loading
            return name
        return run

    assert resident.get((str(first),), load("a")) == "a"
    assert resident.get((str(first),), load("a")) == "a" and len(loads) == 1
    assert resident.get((str(second),), load("b")) == "b"
    assert loads[-1] == ("b", None)  # the previous file was let go before the next one was read
    os.utime(first, (1, 1))
    assert resident.get((str(first),), load("a")) == "a" and len(loads) == 3
    os.utime(first, (2, 2))  # changed on disk: read again
    assert resident.get((str(first),), load("a2")) == "a2"
