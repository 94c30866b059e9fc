"""Reading official AdaFace checkpoints through the restricted unpickler.

The official files are pickles of AdaFace and transformers 4.x objects. The tests re-create that layout without the
official code: small stand-in modules defined here are pickled under the official class names (a pickler that
writes the names the official objects would have), so the file names `adaface.*` / `ldm.modules.*` /
`transformers.*` classes exactly as a real one does while nothing of that name exists to import.
"""

import codecs
import copyreg
import os
import pickle
import pickletools
import re
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


# ---- The tokenizer each official generator carries: `self.tokenizer`, the transformers 4.x slow CLIPTokenizer that
# the official code loads as CLIP ViT-L/14's tokenizer. The stand-ins below give it the layout that
# transformers 4.41.2 (tokenizers 0.19.1, regex 2024.5.15) gives it, attribute for attribute and in that order, with and
# without ftfy installed; only the vocabulary is small. How that layout was observed: see REAL_TOKENIZER_GLOBALS.

TOKENIZATION_CLIP = "transformers.models.clip.tokenization_clip"
TOKENIZER_FORMS = {"without-ftfy": False, "with-ftfy": True}  # the official requirements list ftfy
tokenizer_forms = pytest.mark.parametrize("with_ftfy", TOKENIZER_FORMS.values(), ids=TOKENIZER_FORMS.keys())
# The globals a real tokenizer's pickle names, by the form it was made in. Observed by making a CLIPTokenizer with
# from_pretrained from a folder holding a small vocab.json and merges.txt plus openai/clip-vit-large-patch14's
# tokenizer_config.json and special_tokens_map.json, saving {"tokenizer": it} with torch.save (protocol 2) and listing
# the pickle's GLOBAL opcodes with pickletools (protocol 2 has no STACK_GLOBAL): the same sets under transformers
# 4.41.2 (tokenizers 0.19.1, regex 2024.5.15, ftfy 6.2.0) and 4.57.6 (tokenizers 0.22.2, regex 2026.12.2, ftfy
# 6.3.1). Read back through the restricted reader, that 4.41.2 tokenizer and the double below give the same records,
# attributes (in order) and values, the regex program aside (it varies from run to run).
REAL_TOKENIZER_GLOBALS = {
    False: {("__builtin__", "set"), ("_codecs", "encode"), ("regex._regex", "compile"), ("tokenizers", "AddedToken"),
            (TOKENIZATION_CLIP, "BasicTokenizer"), (TOKENIZATION_CLIP, "CLIPTokenizer"),
            ("transformers.tokenization_utils", "Trie")},
    True: {("__builtin__", "set"), ("_codecs", "encode"), ("ftfy", "fix_text"), ("regex._regex", "compile"),
           ("tokenizers", "AddedToken"), (TOKENIZATION_CLIP, "CLIPTokenizer"),
           ("transformers.tokenization_utils", "Trie")},
}
START, END = "<|startoftext|>", "<|endoftext|>"
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPLIT_FLAGS = 8226  # regex's IGNORECASE | UNICODE | VERSION0
# The program regex pickles for the split pattern, as it pickled it (the order of its character classes varies from
# run to run). A protocol-2 pickle writes these bytes as `_codecs.encode(<latin-1 text>, 'latin1')`.
SPLIT_PROGRAM = (b"\x8a\x01B\x03J\x01\x02<'%\x01\x9f\x80xA\x00%\x01\x81\x80\xf8\x02%\x01\x9f\x80x%\x01\xa1\x80x\x14%"
                 b"\x01\xa1\x80x\x14\nM\x00\x0f<|startoftext|>$M\x00\r<|endoftext|>$M\x00\x02's$M\x00\x02't$M\x00"
                 b"\x03're$M\x00\x03've$M\x00\x02'm$M\x00\x03'll$M\x00\x02'd$\x1d\x01\xff\xff\xff\xff\x0f&\x01\x9f"
                 b"\x80x\x14$&\x01\xa1\x80x$\x1d\x01\xff\xff\xff\xff\x0fB\x00%\x01\x81\x80\xf8\x02%\x01\x9f\x80x%\x01"
                 b"\xa1\x80x\x14\x14\x14\x01")
# Merges that make the official inverter template's words ("photo of a " + ", " * 18) single tokens, and the BPE
# cache tokenizing it leaves (words of one character are not cached).
MERGES = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>")]
TEMPLATE_CACHE = {"photo": "photo</w>", "of": "of</w>"}


@pickled_as("regex._regex", "compile")
def regex_compile(*args):
    raise AssertionError("the reader must never call what the pickle names")


@pickled_as("ftfy", "fix_text")
def fix_text(text):
    raise AssertionError("the reader must never call what the pickle names")


class CompiledPattern:
    """regex's compiled pattern, which pickles as a call to `_regex.compile` with its program and tables."""

    def __reduce__(self):
        return regex_compile, (SPLIT_PATTERN, SPLIT_FLAGS, SPLIT_PROGRAM, {}, {}, {}, [], 0, (), 0, 0)


@pickled_as("tokenizers", "AddedToken")
class AddedToken:
    """tokenizers' AddedToken: pickled as a bare object plus its state, no constructor arguments."""

    def __init__(self, content):
        self.content, self.single_word, self.lstrip, self.rstrip = content, False, False, False
        self.normalized, self.special = True, True


@pickled_as("transformers.tokenization_utils", "Trie")
class Trie:
    """The special tokens as a character tree, each word ending in {"": 1}."""

    def __init__(self, words):
        self.data, self._tokens = {}, set()
        for word in words:
            self._tokens.add(word)
            node = self.data
            for char in word:
                node = node.setdefault(char, {})
            node[""] = 1


@pickled_as(TOKENIZATION_CLIP, "BasicTokenizer")
class BasicTokenizer:
    """What CLIPTokenizer keeps as `nlp` when ftfy is not installed."""

    def __init__(self):
        self.do_lower_case, self.never_split, self.tokenize_chinese_chars = True, set(), True
        self.strip_accents, self.do_split_on_punc = False, False


def clip_byte_symbols():
    """CLIP's byte-level alphabet: printable bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}


@pickled_as(TOKENIZATION_CLIP, "CLIPTokenizer")
class CLIPTokenizer:
    """Its attributes as CLIPTokenizer.__init__, PreTrainedTokenizer.__init__ and from_pretrained set them, after
    tokenizing the official inverter template (which fills the BPE cache)."""

    def __init__(self, with_ftfy):
        if with_ftfy:
            self.fix_text = fix_text
        else:
            self.nlp = BasicTokenizer()
            self.fix_text = None
        symbols = list(clip_byte_symbols().values())
        words = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(m) for m in MERGES), START, END]
        self.encoder = {word: index for index, word in enumerate(words)}
        self.decoder = {index: word for word, index in self.encoder.items()}
        self.errors = "replace"
        self.byte_encoder = clip_byte_symbols()
        self.byte_decoder = {symbol: byte for byte, symbol in self.byte_encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(MERGES)}
        self.cache = {START: START, END: END, **TEMPLATE_CACHE}
        self.pat = CompiledPattern()
        self.tokens_trie = Trie([START, END])
        self._added_tokens_decoder = {self.encoder[START]: AddedToken(START), self.encoder[END]: AddedToken(END)}
        self._added_tokens_encoder = {START: self.encoder[START], END: self.encoder[END]}
        self.init_inputs = ()
        self.init_kwargs = {
            "errors": "replace", "unk_token": AddedToken(END), "bos_token": AddedToken(START),
            "eos_token": AddedToken(END), "pad_token": END, "add_prefix_space": False,
            "clean_up_tokenization_spaces": True, "do_lower_case": True, "model_max_length": 77,
            "name_or_path": "openai/clip-vit-large-patch14", "tokenizer_file": None}
        self.name_or_path = "openai/clip-vit-large-patch14"
        self._processor_class = None
        self.model_max_length = 77
        self.padding_side, self.truncation_side = "right", "right"
        self.model_input_names = ["input_ids", "attention_mask"]
        self.clean_up_tokenization_spaces, self.split_special_tokens = True, False
        self.deprecation_warnings = {}
        self._in_target_context_manager = False
        self.chat_template = None
        self._bos_token = self._added_tokens_decoder[self.encoder[START]]
        self._eos_token = self._added_tokens_decoder[self.encoder[END]]
        self._unk_token = AddedToken(END)
        self._sep_token, self._pad_token, self._cls_token, self._mask_token = None, END, None, None
        self._pad_token_type_id = 0
        self._additional_special_tokens = []
        self.verbose = False
        self._decode_use_source_tokenizer = False


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


def official_classes(package, with_ftfy=False):
    """The AdaFace classes as a checkpoint of `package` ('adaface' or the older 'ldm.modules') names them, their
    tokenizer made with or without ftfy installed."""
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
            self.tokenizer = CLIPTokenizer(with_ftfy)
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


@tokenizer_forms
@pytest.mark.parametrize("package", ["adaface", "ldm.modules"])
def test_single_generator_reads_with_official_names_shapes_and_values(tmp_path, package, with_ftfy):
    torch.manual_seed(0)
    generator = official_classes(package, with_ftfy)(16, [2, 4])
    path = str(tmp_path / "adaface.pt")
    save_official(path, generator)
    names = pickle_globals(path)
    assert (f"{package}.subj_basis_generator", "SubjBasisGenerator") in names
    assert (CLIP, "CLIPTextTransformer") in names and REAL_TOKENIZER_GLOBALS[with_ftfy] <= names

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
    assert not any(name.split(".")[0] in ("adaface", "ldm", "regex", "ftfy", "transformers", "tokenizers")
                   for name in imported), imported


@tokenizer_forms
def test_joint_checkpoint_gives_the_arc2face_branch(tmp_path, with_ftfy):
    torch.manual_seed(1)
    generator_class = official_classes("adaface", with_ftfy)
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


def pickle_opcodes(path):
    """(opcode name, argument) of a torch checkpoint's pickle, in order."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]


def pickle_globals(path):
    return {tuple(arg.split(" ", 1)) for name, arg in pickle_opcodes(path) if name == "GLOBAL"}


def save_tokenizer(path, with_ftfy):
    torch.save({"tokenizer": CLIPTokenizer(with_ftfy)}, path, pickle_module=OFFICIAL_NAMES_PICKLE)


@tokenizer_forms
def test_tokenizer_double_pickles_the_globals_a_real_one_does(tmp_path, with_ftfy):
    path = str(tmp_path / "tokenizer.pt")
    save_tokenizer(path, with_ftfy)
    opcodes = pickle_opcodes(path)
    assert opcodes[0] == ("PROTO", 2) and "STACK_GLOBAL" not in {name for name, _ in opcodes}
    assert pickle_globals(path) == REAL_TOKENIZER_GLOBALS[with_ftfy]
    # protocol 2 writes the regex program (bytes) as a call: _codecs.encode(<its latin-1 text>, 'latin1')
    assert ("BINUNICODE", SPLIT_PROGRAM.decode("latin-1")) in opcodes and ("BINUNICODE", "latin1") in opcodes


@tokenizer_forms
def test_tokenizer_is_read_as_inert_records(tmp_path, with_ftfy):
    path = str(tmp_path / "tokenizer.pt")
    save_tokenizer(path, with_ftfy)

    imported_before = set(sys.modules)
    tokenizer = safe_pickle.load_restricted(path)["tokenizer"]
    imported = set(sys.modules) - imported_before

    assert not any(name.split(".")[0] in ("regex", "ftfy", "transformers", "tokenizers", "codecs")
                   for name in imported), imported
    attributes = tokenizer.attributes
    assert tokenizer.qualified_name == f"{TOKENIZATION_CLIP}.CLIPTokenizer"
    assert list(attributes) == list(vars(CLIPTokenizer(with_ftfy)))
    pattern = attributes["pat"]
    assert pattern.qualified_name == "regex._regex.compile"
    assert pattern.args[:3] == (SPLIT_PATTERN, SPLIT_FLAGS, SPLIT_PROGRAM) and type(pattern.args[2]) is bytes
    if with_ftfy:
        fixer = attributes["fix_text"]
        assert issubclass(fixer, safe_pickle.Record) and (fixer.module_name, fixer.class_name) == ("ftfy", "fix_text")
    else:
        assert attributes["fix_text"] is None
        assert attributes["nlp"].qualified_name == f"{TOKENIZATION_CLIP}.BasicTokenizer"
        assert attributes["nlp"].attributes["never_split"] == set()
    assert attributes["tokens_trie"].attributes["_tokens"] == {START, END}
    assert attributes["_bos_token"] is attributes["_added_tokens_decoder"][attributes["encoder"][START]]
    assert attributes["_unk_token"].attributes == {"content": END, "single_word": False, "lstrip": False,
                                                   "rstrip": False, "normalized": True, "special": True}


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


class Calls:
    """Pickles as `function(*args)`: a call a hostile file may write where the tokenizer's objects are."""

    def __init__(self, function, *args):
        self.function, self.args, self.state = function, args, None

    def __reduce__(self):
        return self.function, self.args


def made_with(cls, args, state):
    """An object that pickles as `cls.__new__(cls, *args)` (protocol 2's NEWOBJ) under `cls`'s official name, then
    hands `state` to what that made."""
    @pickled_as(*cls._pickled_as)
    class Made:
        def __reduce__(self):
            return copyreg.__newobj__, (Made, *args), state

    made = Made()
    made.function, made.args, made.state = Made, args, state
    return made


@pickled_as("ftfy", "fix_file")
def ftfy_fix_file(*args):
    raise AssertionError("the reader must never call what the pickle names")


@pickled_as("ftfy.fixes", "fix_encoding")
def ftfy_fix_encoding(*args):
    raise AssertionError("the reader must never call what the pickle names")


def marker_command(marker):
    return f"touch {marker}"


# (id, what the file holds where the tokenizer would be, the refusal's message or None where it is read as an inert
# record of the call, its arguments and state)
HOSTILE_TOKENIZER_PICKLES = [
    # ---- _codecs.encode is answered only as protocol 2 writes bytes: (text, 'latin1')
    ("codecs-encode-utf8", lambda m: Calls(codecs.encode, "abc", "utf-8"), "_codecs.encode('abc', 'utf-8'), not"),
    ("codecs-encode-rot13", lambda m: Calls(codecs.encode, marker_command(m), "rot13"), "_codecs.encode(str, 'rot13')"),
    ("codecs-encode-int", lambda m: Calls(codecs.encode, 7, "latin1"), "_codecs.encode(int, 'latin1'), not"),
    ("codecs-encode-bytes", lambda m: Calls(codecs.encode, b"abc", "latin1"), "_codecs.encode(bytes, 'latin1')"),
    ("codecs-encode-one-argument", lambda m: Calls(codecs.encode, "abc"), r"_codecs.encode('abc'), not"),
    ("codecs-encode-errors-argument", lambda m: Calls(codecs.encode, "abc", "latin1", "ignore"),
     "_codecs.encode('abc', 'latin1', 'ignore'), not"),
    ("codecs-encode-beyond-latin1", lambda m: Calls(codecs.encode, "\u20ac", "latin1"), "characters beyond latin-1"),
    # ---- other _codecs and ftfy names
    ("codecs-decode", lambda m: Calls(codecs.decode, "abc", "latin1"), "_codecs.decode, which is not among"),
    ("codecs-lookup", lambda m: Calls(codecs.lookup, "latin1"), "_codecs.lookup, which is not among"),
    ("ftfy-fix-file", lambda m: Calls(ftfy_fix_file, marker_command(m)), "ftfy.fix_file, which is not among"),
    ("ftfy-fixes-module", lambda m: Calls(ftfy_fix_encoding, marker_command(m)),
     "ftfy.fixes.fix_encoding, which is not among"),
    # ---- the tokenizer's own names used as calls with odd arguments: recorded, nothing runs
    ("basic-tokenizer-called", lambda m: Calls(BasicTokenizer, marker_command(m), [b"\xff"], {"__class__": 1}), None),
    ("basic-tokenizer-new-with-arguments", lambda m: made_with(BasicTokenizer, (marker_command(m),), {"x": 1}), None),
    ("basic-tokenizer-odd-state", lambda m: made_with(BasicTokenizer, (), (marker_command(m), {"__dict__": 0})), None),
    ("ftfy-fix-text-called", lambda m: Calls(fix_text, marker_command(m)), None),
]


@pytest.mark.parametrize("build, refusal", [c[1:] for c in HOSTILE_TOKENIZER_PICKLES],
                         ids=[c[0] for c in HOSTILE_TOKENIZER_PICKLES])
def test_hostile_tokenizer_pickles_never_run_code(tmp_path, build, refusal):
    marker = tmp_path / "marker"
    hostile = build(marker)
    path = str(tmp_path / "hostile.pt")
    torch.save({"tokenizer": hostile}, path, pickle_module=OFFICIAL_NAMES_PICKLE)
    imported_before = set(sys.modules)
    if refusal is not None:
        with pytest.raises(ModelFileError, match=re.escape(refusal)):
            safe_pickle.load_restricted(path)
    else:
        record = safe_pickle.load_restricted(path)["tokenizer"]
        assert isinstance(record, safe_pickle.Record)
        assert (record.module_name, record.class_name) == hostile.function.__dict__["_pickled_as"]
        assert record.args == hostile.args and record.state == hostile.state
    imported = set(sys.modules) - imported_before
    assert not marker.exists()
    assert not any(name.split(".")[0] in ("ftfy", "transformers", "codecs") for name in imported), imported


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
def test_pickle_bombs_fail_fast(tmp_path, monkeypatch, bomb):
    # The shipped object limit alone costs about a second of pure-Python unpickling, too close to the bound
    # below on a busy machine; a tenth of it keeps the test about the stopping, not the machine's speed.
    # Reading all 10^7 items before stopping would still take several seconds and fail.
    monkeypatch.setattr(safe_pickle, "MAX_OBJECTS", safe_pickle.MAX_OBJECTS // 10)
    path = str(tmp_path / "bomb.pt")
    write_checkpoint(path, bomb)
    start = time.thread_time()  # this thread's CPU time: other processes' load does not count
    with pytest.raises(ModelFileError, match="more than"):
        safe_pickle.load_restricted(path)
    assert time.thread_time() - start < 2


def test_deep_tuple_chain_is_not_mistaken_for_a_checkpoint(tmp_path):
    path = str(tmp_path / "chain.pt")
    write_checkpoint(path, b"\x80\x02N" + b"\x85" * 2 * 10**5 + b".")  # far past any recursion limit
    start = time.thread_time()  # this thread's CPU time: other processes' load does not count
    with pytest.raises(ModelFileError, match="string_to_subj_basis_generator_dict"):
        read_official_adaface(path)
    assert time.thread_time() - start < 2


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


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero as POSIX has them")
@pytest.mark.parametrize("make,kind", [
    (os.mkfifo, r"a named pipe \(FIFO\) \(never opened"),
    (lambda path: os.symlink("/dev/zero", path), r"a symbolic link to '/dev/zero', which is a character device"),
    (os.mkdir, "a folder"),
], ids=["fifo", "link-to-dev-zero", "folder"])
def test_a_checkpoint_path_that_is_no_file_is_named_and_never_opened(tmp_path, make, kind):
    path = str(tmp_path / "adaface.pt")
    make(path)  # a FIFO opened for reading would wait for a writer for ever; /dev/zero never ends
    with pytest.raises(ModelFileError, match=f"AdaFace checkpoint {path} is not a regular file: it is {kind}"):
        read_official_adaface(path)


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
