"""Save Face Embeds and Save W+ through the function both nodes call: where a filename_prefix saves, and that no save
ever replaces a file (the refused prefixes are rows of tests/hostile/test_hostile_files.py)."""

import os
import stat
import time

import pytest
import torch

from comfyui_idadapter.nodes.arch import files, output_files
from comfyui_idadapter.nodes.arch import wplus_edits
from comfyui_idadapter.nodes.arch.face_embeds import FaceEmbeds, load_face_embeds, save_face_embeds
from comfyui_idadapter.nodes.arch.output_files import save_to_new_file


def faces(seed):
    generator = torch.Generator().manual_seed(seed)
    return FaceEmbeds(torch.nn.functional.normalize(torch.randn(2, 512, generator=generator), dim=-1))


def save_faces(output_dir, prefix, value):
    """What Save Face Embeds does with its inputs."""
    return save_to_new_file(str(output_dir), prefix, lambda path: save_face_embeds(value, path, replace=False))


def save_wplus(output_dir, prefix, value):
    """What Save W+ does with its inputs."""
    return save_to_new_file(str(output_dir), prefix, lambda path: wplus_edits.save_wplus_code(value, path,
                                                                                               replace=False))


def code(seed):
    return torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))


def test_prefix_ending_in_a_slash_saves_each_time_into_that_folder(tmp_path):
    first, second = faces(1), faces(2)
    paths = [save_faces(tmp_path, "people/anna/", first), save_faces(tmp_path, "people/anna/", second)]
    folder = tmp_path / "people" / "anna"
    assert paths == [str(folder / "face_00001_.safetensors"), str(folder / "face_00002_.safetensors")]
    torch.testing.assert_close(load_face_embeds(paths[0]).embeds, first.embeds, rtol=0, atol=0)
    torch.testing.assert_close(load_face_embeds(paths[1]).embeds, second.embeds, rtol=0, atol=0)


def test_wplus_saved_into_a_folder_of_face_embeds_leaves_them_alone(tmp_path):
    embeds = save_faces(tmp_path, "face_embeds/face", faces(3))
    w = code(4)
    wplus = save_wplus(tmp_path, "face_embeds/", w)
    assert embeds == str(tmp_path / "face_embeds" / "face_00001_.safetensors")
    assert wplus == str(tmp_path / "face_embeds" / "face_00002_.safetensors")
    torch.testing.assert_close(load_face_embeds(embeds).embeds, faces(3).embeds, rtol=0, atol=0)
    assert torch.equal(wplus_edits.load_wplus_code(wplus), w)


def test_plain_prefix_numbers_as_comfyui_does(tmp_path):
    (tmp_path / "wplus").mkdir()
    (tmp_path / "wplus" / "anna_00007_.png").write_bytes(b"an image saved with the same prefix")
    (tmp_path / "wplus" / "anna_b_00009_.safetensors").write_bytes(b"another prefix")
    paths = [save_wplus(tmp_path, "wplus/anna", code(i)) for i in range(2)]
    assert [os.path.basename(p) for p in paths] == ["anna_00008_.safetensors", "anna_00009_.safetensors"]
    assert save_faces(tmp_path, "a/../b", faces(5)) == str(tmp_path / "b_00001_.safetensors")


def test_date_fields_become_the_date(tmp_path):
    years = {time.strftime("%Y")}
    path = save_faces(tmp_path, "%year%/anna_%month%", faces(6))
    years.add(time.strftime("%Y"))
    folder, name = os.path.split(os.path.relpath(path, tmp_path))
    assert folder in years and name[len("anna_"):len("anna_") + 2].isdigit()


def test_a_file_made_after_the_folder_was_listed_is_not_replaced(tmp_path):
    """Another process saving with the same prefix between the listing and the write: both files survive."""
    theirs, tries = faces(7), []

    def another_process_first(path):
        if not tries:
            save_face_embeds(theirs, path)
        tries.append(path)
        save_face_embeds(faces(8), path, replace=False)

    path = save_to_new_file(str(tmp_path), "anna", another_process_first)
    assert os.path.basename(path) == "anna_00002_.safetensors" and len(tries) == 2
    torch.testing.assert_close(load_face_embeds(str(tmp_path / "anna_00001_.safetensors")).embeds, theirs.embeds,
                               rtol=0, atol=0)
    torch.testing.assert_close(load_face_embeds(path).embeds, faces(8).embeds, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["anna_00001_.safetensors", "anna_00002_.safetensors"]


def test_a_folder_named_like_the_next_file_is_passed_over(tmp_path):
    (tmp_path / "people" / "face_00001_.safetensors").mkdir(parents=True)
    path = save_faces(tmp_path, "people/", faces(9))
    assert os.path.basename(path) == "face_00002_.safetensors"
    assert os.path.isdir(tmp_path / "people" / "face_00001_.safetensors")


def _without_hard_links(monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # what Linux says for a link on FAT

    monkeypatch.setattr(files.os, "link", refuse)


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_writer_never_replaces_when_told_not_to(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        _without_hard_links(monkeypatch)
    path = str(tmp_path / "kept.safetensors")
    save_face_embeds(faces(10), path)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError):
        save_face_embeds(faces(11), path, replace=False)
    with pytest.raises(FileExistsError):
        wplus_edits.save_wplus_code(code(12), path, replace=False)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["kept.safetensors"]  # no temporary file left
    new = str(tmp_path / "new.safetensors")
    save_face_embeds(faces(13), new, replace=False)
    torch.testing.assert_close(load_face_embeds(new).embeds, faces(13).embeds, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["kept.safetensors", "new.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_saved_files_get_the_umask_mode(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        _without_hard_links(monkeypatch)
    previous = os.umask(0o027)
    try:
        path = save_wplus(tmp_path, "wplus/", code(14))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_the_longest_accepted_name_can_be_written(tmp_path):
    limit = output_files.NAME_MAX - len("_00001_.safetensors") - files.TEMPORARY_SUFFIX_MAX_BYTES
    path = save_faces(tmp_path, "n" * limit, faces(15))
    assert os.path.basename(path) == "n" * limit + "_00001_.safetensors"
