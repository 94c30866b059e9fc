"""Hostile and careless files (issue 10): every one is a clear ModelFileError naming the file and the field or
tensor, found from the header before any tensor data is read where the header tells, and without allocating what
a config merely claims. Files the pack writes get the umask's mode; a save node's filename_prefix that cannot name a
new file in the output folder is a clear ConfigError, and nothing is written. PyTorch files that need code to load
are refused in the pack's words (issue 25)."""

import importlib.util
import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_idadapter.nodes.arch import arc2face, e4e, files, iresnet, wplus, wplus_edits
from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.arch.face_embeds import FaceEmbeds, load_face_embeds, save_face_embeds
from comfyui_idadapter.nodes.arch.output_files import save_to_new_file
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError
from idadapter_helpers import tiny_adapter

TESTS = pathlib.Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes, the umask and address-space limits are POSIX")


def _rewrite(path, edit_tensors=None, edit_config=None, edit_metadata=None):
    """The safetensors file at ``path`` written again with its tensors, JSON config or metadata changed in place."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        config = json.loads(meta["config"])
        edit_config(config)
        meta["config"] = json.dumps(config)
    if edit_metadata:
        edit_metadata(meta)
    save_file(tensors, str(path), metadata=meta)


def idadapter_file(edit_tensors=None, edit_config=None, edit_metadata=None, with_kv=True):
    """A builder: the tiny IDAdapter (blocks input_1_0, middle_0_0, output_3_0 of 32/64/32 channels, 2 heads; MFF
    width 32) saved, then edited."""

    def build(tmp_path):
        path = tmp_path / "ida.safetensors"
        ida.save_idadapter(tiny_adapter(with_kv=with_kv), str(path))
        _rewrite(path, edit_tensors, edit_config, edit_metadata)
        return ida.load_idadapter, str(path)

    return build


def face_embeds_file(edit_tensors=None, edit_metadata=None):
    """A builder: two faces with geometry, both of one 100x120 px image, saved by the pack, then edited."""

    def build(tmp_path):
        path = tmp_path / "faces.safetensors"
        embeds = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
        save_face_embeds(FaceEmbeds(embeds, torch.rand(2, 4) * 100, torch.rand(2, 5, 2) * 100, torch.rand(2),
                                    torch.zeros(2, dtype=torch.long), image_sizes=((120, 100),)), str(path))
        _rewrite(path, edit_tensors, edit_metadata=edit_metadata)
        return load_face_embeds, str(path)

    return build


def set_image_sizes(text):
    return face_embeds_file(edit_metadata=lambda meta: meta.update(image_sizes=text))


def set_field(**values):
    return idadapter_file(edit_config=lambda config: config.update(values))


def set_metadata(**values):
    return idadapter_file(edit_metadata=lambda meta: meta.update(values))


def set_block(name, **values):
    return idadapter_file(edit_config=lambda config: config["blocks"][name].update(values))


def replace_block(name, spec):
    return idadapter_file(edit_config=lambda config: config["blocks"].update({name: spec}))


def poison(builder, tensor, value, index=0):
    """``builder``'s file with one element of ``tensor`` set to ``value`` (NaN, inf)."""
    def edit(tensors):
        tensors[tensor].view(-1)[index] = value

    return builder(edit_tensors=edit)


def add_tensor(name, shape=(32, 768)):
    return idadapter_file(edit_tensors=lambda tensors: tensors.update({name: torch.zeros(shape)}))


def drop_tensors(*names):
    return idadapter_file(edit_tensors=lambda tensors: [tensors.pop(n) for n in names])


NAN, INF = float("nan"), float("inf")
HEADER, DATA = "header", "data"  # where the loader must find the problem: header only, or after reading tensors

CASES = [
    # (id, builder, error class, message fragment, found from)
    # ---- config integers: bounded, of the right sign and type, heads dividing widths
    ("width-ten-million", set_field(width=10_000_000), ModelFileError,
     "IDAdapter config field 'width' must be an integer from 1 to 8192, got 10000000", HEADER),
    ("width-in-bounds-but-not-in-file", set_field(width=8192, mff_heads=8), ModelFileError,
     "does not match its own config: mff.blocks.0.attn.to_k.weight has shape (32, 32), expected (8192, 8192)",
     HEADER),
    ("negative-width", set_field(width=-32), ModelFileError, "'width' must be an integer from 1 to 8192, got -32",
     HEADER),
    ("zero-mff-heads", set_field(mff_heads=0), ModelFileError, "'mff_heads' must be an integer from 1 to 256, got 0",
     HEADER),
    ("mff-heads-not-dividing", set_field(mff_heads=3), ModelFileError,
     "'mff_heads' must be a divisor of width (32), got 3", HEADER),
    ("float-width", set_field(width=32.0), ModelFileError, "'width' must be an integer from 1 to 8192, got 32.0",
     HEADER),
    ("string-width", set_field(width="32"), ModelFileError, "'width' must be an integer from 1 to 8192, got '32'",
     HEADER),
    ("bool-num-images", set_field(num_images=True), ModelFileError, "'num_images' must be an integer", HEADER),
    ("huge-num-images", set_field(num_images=10**9), ModelFileError, "'num_images' must be an integer from 1 to 256",
     HEADER),
    ("huge-mff-depth", set_field(mff_depth=10**9), ModelFileError, "'mff_depth' must be an integer from 1 to 64",
     HEADER),
    ("zero-num-tokens", set_field(num_tokens=0), ModelFileError, "'num_tokens' must be an integer", HEADER),
    ("negative-face-crop-margin", set_field(face_crop_margin=-0.5), ModelFileError,
     "'face_crop_margin' must be null or a number from 0 to 4.0, got -0.5", HEADER),
    ("string-face-crop-margin", set_field(face_crop_margin="0.5"), ModelFileError,
     "'face_crop_margin' must be null or a number from 0 to 4.0, got '0.5'", HEADER),
    ("huge-embed-dim", set_field(embed_dim=2**40), ModelFileError, "'embed_dim' must be an integer", HEADER),
    ("zero-block-heads", set_block("input_1_0", heads=0), ModelFileError,
     "'blocks.input_1_0.heads' must be an integer from 1 to 256, got 0", HEADER),
    ("block-heads-not-dividing", set_block("input_1_0", heads=3), ModelFileError,
     "'blocks.input_1_0.heads' must be a divisor of blocks.input_1_0.channels (32), got 3", HEADER),
    ("negative-block-channels", set_block("middle_0_0", channels=-64), ModelFileError,
     "'blocks.middle_0_0.channels' must be an integer from 1 to 8192, got -64", HEADER),
    ("huge-block-channels", set_block("middle_0_0", channels=10**7), ModelFileError,
     "'blocks.middle_0_0.channels' must be an integer from 1 to 8192", HEADER),
    ("block-context-of-another-family", set_block("input_1_0", context_dim=1024), ModelFileError,
     "'blocks.input_1_0.context_dim' must be sd15's cross-attention width 768, got 1024", HEADER),
    # ---- config structure and JSON types
    ("blocks-not-a-mapping", set_field(blocks=["input_1_0"]), ModelFileError,
     "'blocks' must be a mapping of at most 1024 block names", HEADER),
    ("blocks-missing", idadapter_file(edit_config=lambda config: config.pop("blocks")), ModelFileError,
     "'blocks' must be a mapping", HEADER),
    ("block-spec-not-a-mapping", replace_block("input_1_0", 32), ModelFileError,
     "'blocks.input_1_0' must be a mapping with exactly ['channels', 'context_dim', 'heads'], got 32", HEADER),
    ("block-spec-unknown-key", set_block("input_1_0", dropout=0.1), ModelFileError,
     "'blocks.input_1_0' must be a mapping with exactly", HEADER),
    ("block-name-with-dots", replace_block("input.1.0", {"channels": 32, "heads": 2, "context_dim": 768}),
     ModelFileError, "'blocks.input.1.0' must be named like 'input_4_0'", HEADER),
    ("unknown-config-field", set_field(dropout=0.1), ModelFileError, "unknown IDAdapter config fields ['dropout']",
     HEADER),
    ("family-not-a-string", set_field(family=7), ModelFileError,
     "'family' must be one of ['sd15', 'sd21', 'sdxl'], got 7", HEADER),
    ("unknown-family", set_field(family="sd3"), ModelFileError, "'family' must be one of", HEADER),
    ("text-dims-of-another-family", set_field(text_dims={"h": 1024}), ModelFileError,
     "'text_dims' must be sd15's text encoder widths {'l': 768}", HEADER),
    ("config-a-list", set_metadata(config="[1, 2]"), ModelFileError,
     "'config' must be a JSON object, got 'list'", HEADER),
    ("config-not-json", set_metadata(config="{width: 32"), ModelFileError,
     "the metadata field 'config' is not JSON", HEADER),
    ("config-nested-too-deep", set_metadata(config="[" * 100_000), ModelFileError,
     "the metadata field 'config' is not JSON (RecursionError", HEADER),
    ("config-missing", idadapter_file(edit_metadata=lambda meta: meta.pop("config")), ModelFileError,
     "the metadata has no 'config' field", HEADER),
    # ---- K/V deltas: both projections of every configured block, or none
    ("kv-key-too-short", add_tensor("kv_delta.x"), ModelFileError, "malformed K/V delta tensor 'kv_delta.x'", HEADER),
    ("kv-key-too-long", add_tensor("kv_delta.a.b.c"), ModelFileError, "malformed K/V delta tensor 'kv_delta.a.b.c'",
     HEADER),
    ("kv-unknown-projection", add_tensor("kv_delta.input_1_0.to_q"), ModelFileError,
     "malformed K/V delta tensor 'kv_delta.input_1_0.to_q'", HEADER),
    ("kv-unknown-block", add_tensor("kv_delta.output_9_0.to_k"), ModelFileError,
     "malformed K/V delta tensor 'kv_delta.output_9_0.to_k'; expected 'kv_delta.<block>.to_k' or '.to_v' with "
     "<block> one of the config's blocks ['input_1_0', 'middle_0_0', 'output_3_0']", HEADER),
    ("kv-only-to-k", drop_tensors("kv_delta.input_1_0.to_v"), ModelFileError,
     "the K/V deltas of blocks ['input_1_0'] hold only one of to_k/to_v", HEADER),
    ("kv-some-blocks-missing", drop_tensors(*(f"kv_delta.{b}.{p}" for b in ("middle_0_0", "output_3_0")
                                               for p in ("to_k", "to_v"))), ModelFileError,
     "K/V deltas are missing for blocks ['middle_0_0', 'output_3_0']", HEADER),
    ("kv-wrong-shape", add_tensor("kv_delta.input_1_0.to_k", (32, 1024)), ModelFileError,
     "kv_delta.input_1_0.to_k has shape (32, 1024), expected (32, 768)", HEADER),
    ("module-tensor-missing", drop_tensors("mff.proj_out.weight"), ModelFileError,
     "does not match its own config: missing ['mff.proj_out.weight']", HEADER),
    ("module-tensor-unexpected", add_tensor("mff.extra", (2,)), ModelFileError, "unexpected tensors ['mff.extra']",
     HEADER),
    # ---- non-finite weights
    ("nan-module-weight", poison(idadapter_file, "mff.proj_out.weight", NAN), ModelFileError,
     "tensor 'mff.proj_out.weight' holds NaN or infinite values", DATA),
    ("inf-gate", poison(idadapter_file, "adapters.input_1_0.gamma", -INF), ModelFileError,
     "tensor 'adapters.input_1_0.gamma' holds NaN or infinite values", DATA),
    ("inf-kv-delta", poison(idadapter_file, "kv_delta.middle_0_0.to_v", INF, 5), ModelFileError,
     "tensor 'kv_delta.middle_0_0.to_v' holds NaN or infinite values", DATA),
    # ---- face embeds files
    ("faces-nan-box", poison(face_embeds_file, "boxes", NAN, 3), ModelFileError,
     "tensor 'boxes' holds NaN or infinite values", DATA),
    ("faces-inf-landmark", poison(face_embeds_file, "landmarks", INF, 7), ModelFileError,
     "tensor 'landmarks' holds NaN or infinite values", DATA),
    ("faces-nan-score", poison(face_embeds_file, "scores", NAN), ModelFileError,
     "tensor 'scores' holds NaN or infinite values", DATA),
    ("faces-nan-embeds", poison(face_embeds_file, "embeds", NAN), ModelFileError,
     "tensor 'embeds' holds NaN or infinite values", DATA),
    ("faces-zero-vector", face_embeds_file(lambda t: t["embeds"][1].zero_()), ModelFileError,
     "embeds rows [1] are all zeros, expected ArcFace vectors of non-zero length", DATA),
    ("faces-embeds-3d", face_embeds_file(lambda t: t.update(embeds=t["embeds"][None])), ModelFileError,
     "embeds must be a [faces, dim] tensor, got (1, 2, 512)", HEADER),
    ("faces-landmarks-wrong-shape", face_embeds_file(lambda t: t.update(landmarks=torch.zeros(2, 68, 2))),
     ModelFileError, "landmarks has shape (2, 68, 2), expected (2, 5, 2)", HEADER),
    ("faces-image-sizes-not-json", set_image_sizes("[[120, 100]"), ModelFileError,
     "the metadata field 'image_sizes' is not JSON (JSONDecodeError)", HEADER),
    ("faces-image-sizes-an-object", set_image_sizes('{"height": 120}'), ModelFileError,
     "the metadata field 'image_sizes' must be a JSON list of [height, width] pairs, got dict", HEADER),
    ("faces-image-sizes-flat", set_image_sizes("[120, 100]"), ModelFileError,
     "must be a JSON list of [height, width] pairs, got [120, 100]", HEADER),
    ("faces-image-sizes-triple", set_image_sizes("[[120, 100, 3]]"), ModelFileError,
     "image_sizes must be (height, width) pairs of whole pixels from 1 to 2147483647, got [(120, 100, 3)]", HEADER),
    ("faces-image-sizes-zero", set_image_sizes("[[0, 100]]"), ModelFileError,
     "image_sizes must be (height, width) pairs of whole pixels", HEADER),
    ("faces-image-sizes-fractional", set_image_sizes("[[120.5, 100]]"), ModelFileError,
     "image_sizes must be (height, width) pairs of whole pixels", HEADER),
    ("faces-image-sizes-true", set_image_sizes("[[true, 100]]"), ModelFileError,
     "image_sizes must be (height, width) pairs of whole pixels", HEADER),
    ("faces-image-sizes-5000-digits", set_image_sizes(f"[[{'9' * 5000}, 100]]"), ModelFileError,
     "the metadata field 'image_sizes' is not JSON (ValueError)", HEADER),
    ("faces-image-sizes-without-geometry", face_embeds_file(
        lambda t: [t.pop(name) for name in ("boxes", "landmarks", "scores", "image_index")]), ModelFileError,
     "image sizes are given for faces without boxes", HEADER),
    ("faces-image-sizes-fewer-than-the-images", face_embeds_file(lambda t: t["image_index"][1].fill_(1)),
     ModelFileError, "a face of image 1 (counting from 0), but image sizes of only 1 image(s)", DATA),
]


@pytest.mark.parametrize("build,error,fragment,found_from", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_a_clear_error(tmp_path, monkeypatch, build, error, fragment, found_from):
    loader, path = build(tmp_path)
    read_data = []
    read_tensors = files.SafetensorsReader.tensors
    monkeypatch.setattr(files.SafetensorsReader, "tensors", lambda self: read_data.append(1) or read_tensors(self))
    with pytest.raises(error) as caught:
        loader(path)
    message = str(caught.value)
    assert fragment in message and path in message
    assert bool(read_data) == (found_from == DATA), "header problems must be found before tensor data is read"


def test_wrong_format_is_refused_before_tensor_data_is_read(tmp_path, monkeypatch):
    path = str(tmp_path / "faces.safetensors")
    save_file({"embeds": torch.ones(1, 512)}, path, metadata={"format": ida.FORMAT})
    monkeypatch.setattr(files.SafetensorsReader, "tensors", lambda self: pytest.fail("tensor data read"))
    with pytest.raises(ModelFileError, match="format 'idadapter/1', expected 'face_embeds/1'"):
        load_face_embeds(path)


def test_adapter_without_kv_deltas_is_valid(tmp_path):
    _, path = idadapter_file(with_kv=False)(tmp_path)
    weights = ida.load_idadapter(path)
    assert weights.kv_deltas == {} and set(weights.adapter.adapters) == {"input_1_0", "middle_0_0", "output_3_0"}


MEMORY_LIMIT = 3 * 2**30
_LOAD_UNDER_LIMIT = textwrap.dedent(f"""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
    sys.path.insert(0, {str(TESTS)!r})
    import pack_import
    from comfyui_idadapter.nodes.arch.idadapter import load_idadapter
    from comfyui_idadapter.nodes.errors import ModelFileError

    load_idadapter(sys.argv[1])  # a good file loads under the limit
    print("good file loaded")
    for path in sys.argv[2:]:
        start = time.thread_time()  # CPU time: other processes' load does not count
        try:
            load_idadapter(path)
        except ModelFileError as exc:
            print(f"{{time.thread_time() - start:.3f}}s ModelFileError: {{exc}}")
        else:
            print("loaded", path)
""")


@posix_only
def test_config_claiming_huge_sizes_fails_fast_under_a_memory_limit(tmp_path):
    """The issue's case (width 10,000,000: ~20 GB) and a config inside the bounds that would still take hundreds of
    GB if built: both refused in well under a second by a process limited to 3 GB of address space."""
    good = tmp_path / "good"
    good.mkdir()
    _, good_path = idadapter_file()(good)
    hostile = []
    for name, values in (("ten-million", dict(width=10_000_000)),
                         ("in-bounds", dict(width=8192, mff_heads=8, mff_depth=64, clip_vision_dim=8192,
                                            embed_dim=8192, textual_hidden=16384))):
        folder = tmp_path / name
        folder.mkdir()
        hostile.append(set_field(**values)(folder)[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _LOAD_UNDER_LIMIT, good_path, *hostile], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "good file loaded" and len(lines) == 3, run.stdout
    for line, path, fragment in zip(lines[1:], hostile, ("'width' must be an integer from 1 to 8192",
                                                         "does not match its own config")):
        seconds, rest = line.split("s ", 1)
        assert float(seconds) < 1.0 and rest.startswith("ModelFileError: ") and path in rest and fragment in rest


def _save_idadapter(path):
    ida.save_idadapter(tiny_adapter(with_kv=False), path)


def _save_face_embeds(path):
    save_face_embeds(FaceEmbeds(torch.ones(1, 512)), path)


@pytest.fixture
def umask():
    """Sets the process umask for one test, restoring it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@posix_only
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("save", [_save_idadapter, _save_face_embeds], ids=["idadapter", "face_embeds"])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask, mode, save):
    umask(mask)
    path = str(tmp_path / "out.safetensors")
    save(path)
    save(path)  # replacing a file gives the new one the same mode
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert os.listdir(tmp_path) == ["out.safetensors"]


@posix_only
def test_leftover_temp_file_does_not_pass_on_its_mode(tmp_path, umask):
    umask(0o022)
    path = str(tmp_path / "out.safetensors")
    leftover = f"{path}.tmp-{os.getpid()}"
    open(leftover, "wb").close()
    os.chmod(leftover, 0o600)
    _save_face_embeds(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 and not os.path.exists(leftover)


def test_failed_write_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "out.safetensors")
    with pytest.raises(ValueError):  # safetensors refuses non-contiguous tensors
        files.write_safetensors({"weight": torch.zeros(2, 3).t()}, path, {"format": "test/1"})
    assert os.listdir(tmp_path) == []


LOADERS = [(ida.load_idadapter, _save_idadapter), (load_face_embeds, _save_face_embeds)]


def _permission_denied(path):
    return rf"cannot read {re.escape(path)}: permission denied; expected a .* readable by the user running ComfyUI"


@posix_only
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0,
                    reason="root reads a mode-0000 file; the next test covers the mapping")
@pytest.mark.parametrize("load,save", LOADERS, ids=["idadapter", "face_embeds"])
def test_unreadable_file_is_a_permission_error(tmp_path, load, save):
    path = str(tmp_path / "locked.safetensors")
    save(path)
    os.chmod(path, 0)
    with pytest.raises(ModelFileError, match=_permission_denied(path)):
        load(path)


@pytest.mark.parametrize("load,save", LOADERS, ids=["idadapter", "face_embeds"])
def test_permission_error_is_reported_as_one(tmp_path, monkeypatch, load, save):
    path = str(tmp_path / "locked.safetensors")
    save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(files, "open", denied, raising=False)  # files.py's own open(), as for a user without access
    with pytest.raises(ModelFileError, match=_permission_denied(path)):
        load(path)


def _make_folder(name):
    return lambda output: os.makedirs(output / name)


def _make_file(name):
    return lambda output: (output / name).write_bytes(b"someone's file")


SAVE_PREFIX_CASES = [
    # (id, filename_prefix, what is in the output folder first, message fragment)
    ("prefix-nul", "face_embeds/an\0na", None, "contains the control character '\\x00' at position 14"),
    ("prefix-newline", "anna\nbob", None, "contains the control character '\\n' at position 4"),
    ("prefix-300-characters", "a" * 300, None, "the file name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...aaaaaa' is 300 "
     "bytes long; at most 221 bytes fit"),
    ("prefix-300-character-folder", "b" * 300 + "/anna", None, "the folder name 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
     "...bbbbbb' is 300 bytes long; at most 255 bytes fit"),
    ("prefix-long-in-bytes", "é" * 120, None, "is 240 bytes long; at most 221 bytes fit"),
    ("prefix-lone-surrogate", "anna\ud800", None, "cannot be written on this file system"),
    ("prefix-empty", "", None, "filename_prefix is empty: expected a name such as 'face'"),
    ("prefix-blank", "   ", None, "filename_prefix is empty"),
    ("prefix-dot", ".", None, "the file name '.' starts with '.', which would make a hidden file"),
    ("prefix-hidden-file", "people/.anna", None, "the file name '.anna' starts with '.'"),
    ("prefix-parent-as-name", "people/..", None, "the file name '..' starts with '.'"),
    ("prefix-leads-out", "../elsewhere/anna", None, "leads out of the output folder"),
    ("prefix-leads-out-deeper", "a/../../anna", None, "leads out of the output folder"),
    ("prefix-absolute", "/tmp/anna", None, "is an absolute path; saves stay in the output folder"),
    ("prefix-names-a-folder", "face_embeds", _make_folder("face_embeds"),
     "names the folder {output}/face_embeds: end it with '/' to save into that folder "
     "(face_embeds/face_00001_.safetensors)"),
    ("prefix-file-in-the-way", "people/anna/", _make_file("people"),
     "needs the folder {output}/people/anna, but a file of that name (or of a folder above it) is in the way"),
]


def _tree(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, dirs, names in os.walk(root) for name in dirs + names)


@pytest.mark.parametrize("save", ["face_embeds", "wplus"])
@pytest.mark.parametrize("prefix,setup,fragment", [c[1:] for c in SAVE_PREFIX_CASES],
                         ids=[c[0] for c in SAVE_PREFIX_CASES])
def test_careless_filename_prefix_is_a_clear_error(tmp_path, save, prefix, setup, fragment):
    output = tmp_path / "output"
    output.mkdir()
    if setup:
        setup(output)
    before = _tree(tmp_path)
    if save == "face_embeds":
        def write(path):
            save_face_embeds(FaceEmbeds(torch.ones(1, 512)), path, replace=False)
    else:
        def write(path):
            wplus_edits.save_wplus_code(torch.zeros(18, 512), path, replace=False)
    with pytest.raises(ConfigError) as caught:
        save_to_new_file(str(output), prefix, write)
    assert fragment.format(output=output) in str(caught.value)
    assert _tree(tmp_path) == before, "a refused prefix writes nothing"


# ---- PyTorch files, read tensors-only (issue 25): a refused pickle is refused in the pack's words. torch's own text
# advises loading the file again with weights_only=False, which would run its code: it never reaches the user, not
# even chained onto the error.

TORCH_ADVICE = re.compile(r"weights_only(` set to `|\s*=\s*)False|safe_globals|trusted source|trust the source")


class _RunsACommand:
    """What a file carrying code pickles: a call of os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TrainingOptions:
    """An object of a script's own class, as a checkpoint saved with a training script's options object holds."""

    def __init__(self):
        self.learning_rate = 1e-4


def _arc2face_weights(tmp_path):
    """Arc2Face's encoder folder as transformers 4.x wrote it: config.json beside pytorch_model.bin."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "encoder"
    transformers.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=32).save_pretrained(folder)
    return folder / "pytorch_model.bin"


TORCH_LOADERS = [
    # (id, where the file goes, loader, what the message says a good file is)
    ("official-e4e", lambda tmp: tmp / "e4e_ffhq_encode.pt", e4e.load_official_e4e,
     "e4e_ffhq_encode.pt (omertov/encoder4editing 'FFHQ Inversion'"),
    ("official-wplus-adapter", lambda tmp: tmp / "wplus_adapter.bin", wplus.load_official_wplus,
     "Use the released wplus_adapter.bin or wplus_adapter_stage1.bin"),
    ("direction", lambda tmp: tmp / "smile.pt", wplus_edits.load_direction, "an InterFaceGAN .pt [1, 512]"),
    ("wplus-code", lambda tmp: tmp / "1.pth", wplus_edits.load_wplus_code, "a W+ code saved by e4e"),
    ("arc2face-encoder", _arc2face_weights, arc2face.load_arc2face_encoder, "FoivosPar/Arc2Face"),
    ("arcface-backbone", lambda tmp: tmp / "backbone.pth", iresnet.load_arcface_torch, "arcface_torch backbone.pth"),
]

REFUSED_PICKLES = [
    # (id, what is pickled given a marker file, what the message names)
    ("runs-a-command", lambda marker: {"weight": _RunsACommand(marker)}, r"the pickle names \w+\.system, which"),
    ("object-of-a-script-class", lambda marker: {"opts": _TrainingOptions()},
     r"the pickle names [\w.]*_TrainingOptions, which is neither a tensor nor plain data"),
    ("numpy-array", lambda marker: {"latent_avg": np.zeros((18, 512), np.float32)},
     r"the pickle names numpy\.[\w.]*_reconstruct, which is neither a tensor nor plain data"),
]


def _raised_chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize("where,load,good_file", [c[1:] for c in TORCH_LOADERS], ids=[c[0] for c in TORCH_LOADERS])
@pytest.mark.parametrize("payload,named", [c[1:] for c in REFUSED_PICKLES], ids=[c[0] for c in REFUSED_PICKLES])
def test_refused_pickle_is_refused_in_our_words(tmp_path, where, load, good_file, payload, named):
    marker = tmp_path / "marker"
    path = where(tmp_path)
    torch.save(payload(marker), path)
    with pytest.raises(ModelFileError) as caught:
        load(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path} was refused unread: "), message
    assert re.search(named, message) and good_file in message, message
    assert "a file that needs code of its own to load is refused on purpose" in message
    assert not any(TORCH_ADVICE.search(str(e)) for e in _raised_chain(caught.value)), message
    assert not marker.exists()


def test_official_e4e_refusal_says_what_the_file_must_be(tmp_path):
    path = tmp_path / "e4e_ffhq_encode.pt"
    torch.save({"state_dict": {}, "opts": _TrainingOptions(), "latent_avg": torch.zeros(18, 512)}, path)
    with pytest.raises(ModelFileError, match=r"refused on purpose.*e4e_ffhq_encode\.pt.*tensors-only layout reads as "
                                             r"it is; or an e4e/1 safetensors file"):
        e4e.load_official_e4e(str(path))


def test_legacy_format_backbone_carrying_code_is_refused_in_our_words(tmp_path):
    """arcface_torch backbones are read without memory-mapping, so the legacy (pre-1.6) format reaches the
    unpickler too."""
    marker = tmp_path / "marker"
    path = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": _RunsACommand(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match=r"was refused unread: the pickle names \w+\.system") as caught:
        iresnet.load_arcface_torch(str(path))
    assert not any(TORCH_ADVICE.search(str(e)) for e in _raised_chain(caught.value))
    assert not marker.exists()


def _convert_wplus_tool():
    """tools/convert_wplus.py as a module of this process (the pack it imports is the one already imported)."""
    spec = importlib.util.spec_from_file_location("pack_tools.convert_wplus", TESTS.parent / "tools" / "convert_wplus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag", ["--e4e", "--adapter"])
def test_converter_prints_our_refusal(tmp_path, capsys, flag):
    marker = tmp_path / "marker"
    path = tmp_path / "official.pt"
    torch.save({"weight": _RunsACommand(marker)}, path)
    assert _convert_wplus_tool().cli([flag, str(path), "--out", str(tmp_path / "out.safetensors")]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith(f"error: {path} was refused unread: the pickle names "), printed.err
    assert not TORCH_ADVICE.search(printed.out + printed.err)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(os.name != "posix", reason="FIFOs as POSIX has them")
@pytest.mark.parametrize("where,load,good_file", [c[1:] for c in TORCH_LOADERS], ids=[c[0] for c in TORCH_LOADERS])
def test_fifo_in_place_of_a_pytorch_file_is_named_and_never_opened(tmp_path, where, load, good_file):
    path = where(tmp_path)
    os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    with pytest.raises(ModelFileError, match=r"is not a regular file: it is a named pipe \(FIFO\) \(never opened"):
        load(str(path))
