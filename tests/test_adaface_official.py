"""Reading official AdaFace checkpoints through the restricted unpickler.

The official files are pickles of AdaFace and transformers 4.x objects. The tests re-create that layout without the
official code: small stand-in modules defined here are pickled under the official class names (a pickler that
writes the names the official objects would have), so the file names `adaface.*` / `ldm.modules.*` /
`transformers.*` classes exactly as a real one does while nothing of that name exists to import.
"""

import os
import pickle
import sys
import time
import types
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from comfyui_idadapter.nodes.arch import safe_pickle
from comfyui_idadapter.nodes.arch.adaface_official import read_official_adaface
from comfyui_idadapter.nodes.errors import ModelFileError

WIDTH = 32
POSITIONS = 24  # room for the official inverter template of 16 ID vectors ("photo of a " + ", " * 18: 23 tokens)
CLIP = "transformers.models.clip.modeling_clip"


def pickled_as(module, name):
    def mark(obj):
        obj._pickled_as = (module, name)
        return obj
    return mark


class OfficialNamesPickler(pickle._Pickler):
    """Writes stand-ins under the official (module, name) they were marked with."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_global(self, obj, name=None):
        official = getattr(obj, "__dict__", {}).get("_pickled_as")
        if official is None:
            return pickle._Pickler.save_global(self, obj, name)
        self.write(pickle.GLOBAL + f"{official[0]}\n{official[1]}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global
    dispatch[types.FunctionType] = save_global


OFFICIAL_NAMES_PICKLE = types.SimpleNamespace(__name__="official_names_pickle", Pickler=OfficialNamesPickler)


@pickled_as("regex._regex", "compile")
def regex_compile(*args):
    raise AssertionError("the reader must never call what the pickle names")


class CompiledPattern:
    def __reduce__(self):
        return regex_compile, (r"'s|'t|\p{L}+", 2, {}, {})


@pickled_as("tokenizers", "AddedToken")
class AddedToken:
    def __init__(self, content):
        self.content, self.special = content, True


@pickled_as("transformers.models.clip.tokenization_clip", "CLIPTokenizer")
class CLIPTokenizer:
    def __init__(self):
        self.encoder = {"photo</w>": 1125, "id</w>": 1014}
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = {("p", "h"): 0, ("i", "d</w>"): 1}
        self.pat = CompiledPattern()
        self.added_tokens_decoder = {49406: AddedToken("<|startoftext|>")}


@pickled_as("transformers.models.clip.configuration_clip", "CLIPTextConfig")
class CLIPTextConfig:
    def __init__(self, layers):
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = WIDTH, layers, 4
        self.torch_dtype = torch.float16


@pickled_as("transformers.activations", "QuickGELUActivation")
class QuickGELUActivation(nn.Module):
    pass


@pickled_as("einops.layers.torch", "Rearrange")
class Rearrange(nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern


@pickled_as(CLIP, "CLIPMLP")
class CLIPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.activation_fn = QuickGELUActivation()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)


def attention_class(package, multiplier):
    """CLIPAttentionMKV where keys/values are expanded, transformers' own attention where they are not."""
    @pickled_as(f"{package}.arc2face_models", "CLIPAttentionMKV")
    class CLIPAttentionMKV(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.multiplier = m
            self.k_proj, self.v_proj = nn.Linear(WIDTH, WIDTH * m), nn.Linear(WIDTH, WIDTH * m)
            self.q_proj, self.out_proj = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    @pickled_as(CLIP, "CLIPSdpaAttention")
    class CLIPSdpaAttention(CLIPAttentionMKV):
        pass

    return CLIPAttentionMKV if multiplier > 1 else CLIPSdpaAttention


@pickled_as(CLIP, "CLIPEncoderLayer")
class CLIPEncoderLayer(nn.Module):
    def __init__(self, package, multiplier):
        super().__init__()
        self.self_attn = attention_class(package, multiplier)(multiplier)
        self.layer_norm1, self.mlp, self.layer_norm2 = nn.LayerNorm(WIDTH), CLIPMLP(), nn.LayerNorm(WIDTH)


@pickled_as(CLIP, "CLIPEncoder")
class CLIPEncoder(nn.Module):
    def __init__(self, package, multipliers):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(package, m) for m in multipliers)


@pickled_as(CLIP, "CLIPTextEmbeddings")
class CLIPTextEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(100, WIDTH), nn.Embedding(POSITIONS, WIDTH)
        self.register_buffer("position_ids", torch.arange(POSITIONS).unsqueeze(0), persistent=False)


@pickled_as(CLIP, "CLIPTextTransformer")
class CLIPTextTransformer(nn.Module):
    def __init__(self, package, multipliers):
        super().__init__()
        self.config = CLIPTextConfig(len(multipliers))
        self.embeddings, self.encoder = CLIPTextEmbeddings(), CLIPEncoder(package, multipliers)
        self.final_layer_norm = nn.LayerNorm(WIDTH)


def official_classes(package):
    """The AdaFace classes as a checkpoint of `package` ('adaface' or the older 'ldm.modules') names them."""
    @pickled_as(f"{package}.arc2face_models", "CLIPTextModelWrapper")
    class CLIPTextModelWrapper(nn.Module):
        def __init__(self, multipliers):
            super().__init__()
            self.config = CLIPTextConfig(len(multipliers))
            self.text_model = CLIPTextTransformer(package, multipliers)

    @pickled_as(f"{package}.util", "GradientScaler")
    class GradientScaler(nn.Module):
        def __init__(self, alpha):
            super().__init__()
            self._alpha, self._debug = torch.tensor(alpha), False

    @pickled_as(f"{package}.subj_basis_generator", "SubjBasisGenerator")
    class SubjBasisGenerator(nn.Module):
        def __init__(self, num_id_vecs, multipliers):
            super().__init__()
            self.N_ID, self.N_SFX, self.dtype = num_id_vecs, 0, torch.float16
            self.tokenizer = CLIPTokenizer()
            self.prompt2token_proj = CLIPTextModelWrapper(multipliers)
            self.prompt2token_proj_attention_multipliers = list(multipliers)
            self.obj_proj_in = nn.Sequential(nn.Linear(8, 2 * WIDTH), Rearrange("b (n d) -> b n d"))
            self.layerwise_proj = nn.Identity()
            self.hidden_state_layer_weights = nn.Parameter(torch.tensor([[0.9163], [0.9483], [2.0762]]))
            self.hidden_state_layer_weights_grad_scaler = GradientScaler(5.0)
            self.pad_embeddings = torch.randn(POSITIONS, WIDTH)
            self.static_img_suffix_embs = None

    return SubjBasisGenerator


def save_official(path, generator):
    checkpoint = {
        "string_to_subj_basis_generator_dict": nn.ModuleDict({"z": generator}),
        "placeholder_strings": ["z"],
        "subject_strings": ["z"],
        "unet_lora_modules": OrderedDict(),
    }
    torch.save(checkpoint, path, pickle_module=OFFICIAL_NAMES_PICKLE)


def assert_same_tensors(read, module):
    expected = module.state_dict()
    assert list(read) == list(expected)
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


@pytest.mark.parametrize("package", ["adaface", "ldm.modules"])
def test_single_generator_reads_with_official_names_shapes_and_values(tmp_path, package):
    torch.manual_seed(0)
    generator = official_classes(package)(16, [2, 4])
    path = str(tmp_path / "adaface.pt")
    save_official(path, generator)
    names = pickle_globals(path)
    assert (f"{package}.subj_basis_generator", "SubjBasisGenerator") in names
    assert (CLIP, "CLIPTextTransformer") in names and ("regex._regex", "compile") in names

    imported_before = set(sys.modules)  # other tests may have imported regex (transformers' tokenizers use it)
    inverter = read_official_adaface(path)
    imported = set(sys.modules) - imported_before

    assert_same_tensors(inverter.state_dict, generator)
    assert "prompt2token_proj.text_model.encoder.layers.0.self_attn.k_proj.weight" in inverter.state_dict
    assert inverter.state_dict["prompt2token_proj.text_model.encoder.layers.1.self_attn.v_proj.weight"].shape == (
        4 * WIDTH, WIDTH)
    assert inverter.multipliers == [2, 4]
    assert inverter.num_id_vecs == 16
    assert torch.equal(inverter.hidden_state_layer_weights, generator.hidden_state_layer_weights.detach())
    assert torch.equal(inverter.pad_embeddings, generator.pad_embeddings)
    assert not any(name == "adaface" or name.startswith(("adaface.", "ldm", "regex")) for name in imported), imported


def test_joint_checkpoint_gives_the_arc2face_branch(tmp_path):
    torch.manual_seed(1)
    generator_class = official_classes("adaface")
    consistent_id, arc2face = generator_class(4, [1, 1]), generator_class(16, [4, 2])
    path = str(tmp_path / "joint.pt")
    save_official(path, nn.ModuleList([consistent_id, arc2face]))

    inverter = read_official_adaface(path)

    assert_same_tensors(inverter.state_dict, arc2face)
    assert inverter.multipliers == [4, 2] and inverter.num_id_vecs == 16
    with pytest.raises(ModelFileError, match="ConsistentID's own"):
        read_official_adaface(path, branch="consistentID")


def test_multipliers_are_inferred_from_shapes_when_not_stored(tmp_path):
    generator = official_classes("adaface")(16, [3, 1])
    del generator.prompt2token_proj_attention_multipliers
    path = str(tmp_path / "adaface.pt")
    save_official(path, generator)
    assert read_official_adaface(path).multipliers == [3, 1]


def test_other_layouts_say_what_was_expected(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(ModelFileError, match="string_to_subj_basis_generator_dict"):
        read_official_adaface(path)
    save_official(path, nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(ModelFileError, match="joint generator list of 2"):
        read_official_adaface(path)


def pickle_globals(path):
    import pickletools
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


class WritesMarker:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call, shown", [(os.system, "system"), (eval, "eval"),
                                         (__import__("subprocess").Popen, "Popen")])
def test_pickled_calls_are_refused_and_never_run(tmp_path, call, shown):
    marker = tmp_path / "marker"
    argument = f"open({str(marker)!r}, 'w')" if call is eval else ["touch", str(marker)]
    if call is os.system:
        argument = f"touch {marker}"
    path = str(tmp_path / "evil.pt")
    torch.save({"string_to_subj_basis_generator_dict": WritesMarker(call, argument)}, path)
    with pytest.raises(ModelFileError, match=shown):
        read_official_adaface(path)
    assert not marker.exists()


def test_a_class_outside_the_allow_list_is_refused_by_name(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"x": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)}, path)
    with pytest.raises(ModelFileError, match=r"torch\.optim\.sgd\.SGD.*not among"):
        safe_pickle.load_restricted(path)


def write_checkpoint(path, data_pkl, storages=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)


@pytest.mark.parametrize("bomb", [
    b"\x80\x02" + b"]" * 10**6 + b"a" * (10**6 - 1) + b".",  # 10^6 nested levels on the stack
    b"\x80\x02" + b"(" * 10**6 + b"l" * 10**6 + b".",  # 10^6 nested marks
    b"\x80\x02]" + b"]a" * 10**7 + b".",  # 10^7 items
], ids=["stack", "marks", "items"])
def test_pickle_bombs_fail_fast(tmp_path, bomb):
    path = str(tmp_path / "bomb.pt")
    write_checkpoint(path, bomb)
    start = time.monotonic()
    with pytest.raises(ModelFileError, match="more than"):
        safe_pickle.load_restricted(path)
    assert time.monotonic() - start < 2


def test_deep_tuple_chain_is_not_mistaken_for_a_checkpoint(tmp_path):
    path = str(tmp_path / "chain.pt")
    write_checkpoint(path, b"\x80\x02N" + b"\x85" * 10**6 + b".")
    start = time.monotonic()
    with pytest.raises(ModelFileError, match="string_to_subj_basis_generator_dict"):
        read_official_adaface(path)
    assert time.monotonic() - start < 2


def tensor_pickle(key, numel, size):
    """A pickle of one float tensor in storage `key`, as torch.save writes it."""
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            + b"X" + len(key).to_bytes(4, "little") + key.encode() + b"X\x03\x00\x00\x00cpu"
            + b"J" + numel.to_bytes(4, "little") + b"tQK\x00J" + size.to_bytes(4, "little") + b"\x85K\x01\x85"
            + b"\x89ccollections\nOrderedDict\n)RtR.")


def test_tensor_storages_are_checked_against_the_archive(tmp_path):
    path = str(tmp_path / "tensor.pt")
    write_checkpoint(path, tensor_pickle("0", 3, 3), {"0": torch.arange(3.0).numpy().tobytes()})
    assert torch.equal(safe_pickle.load_restricted(path), torch.arange(3.0))
    write_checkpoint(path, tensor_pickle("1", 3, 3), {"0": torch.arange(3.0).numpy().tobytes()})
    with pytest.raises(ModelFileError, match="'1' is missing"):
        safe_pickle.load_restricted(path)
    write_checkpoint(path, tensor_pickle("0", 10**6, 3), {"0": torch.arange(3.0).numpy().tobytes()})
    with pytest.raises(ModelFileError, match="holds 12 bytes"):
        safe_pickle.load_restricted(path)
    write_checkpoint(path, tensor_pickle("0", 3, 10**6), {"0": torch.arange(3.0).numpy().tobytes()})
    with pytest.raises(ModelFileError, match="past the end"):
        safe_pickle.load_restricted(path)


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    generator = official_classes("adaface")(16, [2, 1])
    path = tmp_path / "adaface.pt"
    save_official(str(path), generator)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelFileError):
        read_official_adaface(str(path))
    write_checkpoint(str(path), pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-5])
    with pytest.raises(ModelFileError, match="corrupt"):
        safe_pickle.load_restricted(str(path))
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="not a torch zip checkpoint"):
        read_official_adaface(str(path))
