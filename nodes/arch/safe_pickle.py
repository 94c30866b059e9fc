"""A restricted reader of torch's zip checkpoints that hold pickled module objects (the official AdaFace files).

Those files pickle whole transformers 4.x / AdaFace / einops objects, so `torch.load(weights_only=True)` refuses
them and `weights_only=False` would run whatever the pickle names. This reader runs nothing: every allowed class
name becomes an inert `Record` that only stores what the pickle hands it, tensors are rebuilt here from the zip's
storages, bytes objects (which protocol-2 pickles write as calls to `_codecs.encode`) are rebuilt here too, and any
other global is refused. It uses Python's own (pure-Python) unpickler so that every opcode can be
counted: a small file cannot make it build more objects or a deeper stack than the limits below.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from typing import Any

import torch

from ..errors import ModelFileError
from .files import check_regular_file

# Objects built plus items put into containers. Generous for the official files (the two CLIP tokenizers of a joint
# checkpoint take about 0.8 million: vocabulary, decoder and BPE ranks), small enough that a hostile pickle is
# stopped within about a second.
MAX_OBJECTS = 2_000_000
# Well-formed pickles keep at most a batch of 1000 items (a dict batch: 2000) on the stack and nest a few levels.
MAX_STACK = 100_000
MAX_MARK_DEPTH = 1_000

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# The encodings a protocol-2 pickle names when it writes a bytes object as `_codecs.encode(text, 'latin1')`.
LATIN1_NAMES = ("latin1", "latin-1")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")

ADAFACE_CLASSES = {
    "subj_basis_generator": ("SubjBasisGenerator", "ImgPrompt2TextPrompt", "ExpandEmbs", "LayerwiseMLPProjWithSkip",
                             "CrossAttention", "Lambda"),
    "arc2face_models": ("CLIPTextModelWrapper", "CLIPAttentionMKV"),
    "util": ("GradientScaler",),
}
# Older checkpoints name the same classes under the latent-diffusion package the AdaFace code grew out of.
ADAFACE_PACKAGES = ("adaface", "ldm.modules")

TORCH_NN_CLASSES = {
    "torch.nn.modules.container": ("ModuleList", "ModuleDict", "Sequential", "ParameterList", "ParameterDict"),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.sparse": ("Embedding",),
    "torch.nn.modules.activation": ("GELU", "ReLU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU", "Softmax"),
    "torch.nn.modules.dropout": ("Dropout",),
}
TRANSFORMERS_CLASSES = {
    "transformers.models.clip.modeling_clip": (
        "CLIPTextModel", "CLIPTextTransformer", "CLIPEncoder", "CLIPEncoderLayer", "CLIPAttention",
        "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP", "CLIPTextEmbeddings"),
    "transformers.models.clip.configuration_clip": ("CLIPTextConfig",),
    # the slow tokenizer keeps a BasicTokenizer as `nlp` when ftfy is not installed
    "transformers.models.clip.tokenization_clip": ("CLIPTokenizer", "BasicTokenizer"),
    "transformers.activations": ("QuickGELUActivation", "GELUActivation"),
    "transformers.tokenization_utils_base": ("AddedToken",),
    "transformers.tokenization_utils": ("Trie",),
    "tokenizers": ("AddedToken",),
    "einops.layers.torch": ("Rearrange", "Reduce"),
}


def _record_names() -> set[tuple[str, str]]:
    names = set()
    for package in ADAFACE_PACKAGES:
        for module, classes in ADAFACE_CLASSES.items():
            names.update((f"{package}.{module}", name) for name in classes)
    for table in (TORCH_NN_CLASSES, TRANSFORMERS_CLASSES):
        for module, classes in table.items():
            names.update((module, name) for name in classes)
    # Tokenizer internals, recorded and never run: the compiled split pattern is pickled as a call to regex's compile,
    # and a tokenizer made while ftfy was installed holds its text fixer (`self.fix_text = ftfy.fix_text`).
    names.add(("regex._regex", "compile"))
    names.add(("ftfy", "fix_text"))
    return names


RECORD_NAMES = frozenset(_record_names())


class Record:
    """What the pickle said about one object of an allowed class: its name, constructor arguments and state.

    Nothing of the named class is imported or run; attribute access goes to `state` (a module's `_parameters`,
    `_buffers`, `_modules` and plain attributes such as `prompt2token_proj_attention_multipliers`).
    """

    module_name = ""
    class_name = ""

    # Records are made through __new__ (pickle's NEWOBJ) or a call (REDUCE); both only store the arguments.
    def __new__(cls, *args, **kwargs):
        record = super().__new__(cls)
        record.args = args
        record.kwargs = kwargs
        record.state = None
        return record

    def __setstate__(self, state):
        self.state = state

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.class_name}"

    @property
    def attributes(self) -> dict:
        """The recorded `__dict__` (pickle's state is either that dict or a (dict, slots) pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}


_record_classes: dict[tuple[str, str], type] = {}


def record_class(module_name: str, class_name: str) -> type:
    key = (module_name, class_name)
    if key not in _record_classes:
        _record_classes[key] = type(class_name, (Record,), {"module_name": module_name, "class_name": class_name})
    return _record_classes[key]


class _StorageType:
    """Stands for torch.<X>Storage in a storage reference; only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _TensorType:
    """Stands for torch.Tensor in `_rebuild_from_type_v2`; plain tensors are the only type accepted there."""


# Opcodes that add to the stack; they and the container-filling ones count against MAX_OBJECTS.
_CREATING_OPCODES = (
    pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.INT, pickle.BININT, pickle.BININT1, pickle.BININT2,
    pickle.LONG, pickle.LONG1, pickle.LONG4, pickle.FLOAT, pickle.BINFLOAT, pickle.STRING, pickle.BINSTRING,
    pickle.SHORT_BINSTRING, pickle.UNICODE, pickle.BINUNICODE, pickle.SHORT_BINUNICODE, pickle.BINUNICODE8,
    pickle.BINBYTES, pickle.SHORT_BINBYTES, pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.EMPTY_LIST,
    pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.EMPTY_SET, pickle.LIST, pickle.DICT, pickle.TUPLE, pickle.TUPLE1,
    pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET, pickle.REDUCE, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ,
    pickle.INST, pickle.BINPERSID, pickle.PERSID, pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.BINGET, pickle.GET,
    pickle.LONG_BINGET,
)
_FILLING_OPCODES = (pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.ADDITEMS, pickle.BUILD)


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one, whose opcode table can be wrapped
    def __init__(self, data_file, checkpoint: "_Checkpoint"):
        super().__init__(data_file, encoding="utf-8")
        self.checkpoint = checkpoint
        self.objects_left = MAX_OBJECTS
        self.dispatch = dict(pickle._Unpickler.dispatch)
        for opcode in _CREATING_OPCODES:
            self.dispatch[opcode[0]] = self._counted(pickle._Unpickler.dispatch[opcode[0]], check_stack=True)
        for opcode in _FILLING_OPCODES:
            self.dispatch[opcode[0]] = self._counted(pickle._Unpickler.dispatch[opcode[0]], check_stack=False)
        self.dispatch[pickle.MARK[0]] = self._bounded_mark(pickle._Unpickler.dispatch[pickle.MARK[0]])

    def _counted(self, handler, check_stack: bool):
        def run(unpickler):
            unpickler.objects_left -= 1
            if unpickler.objects_left < 0:
                raise self.checkpoint.error(f"its pickle builds more than {MAX_OBJECTS} objects")
            if check_stack and len(unpickler.stack) > MAX_STACK:
                raise self.checkpoint.error(f"its pickle keeps more than {MAX_STACK} objects on its stack")
            handler(unpickler)
        return run

    def _bounded_mark(self, handler):
        def run(unpickler):
            if len(unpickler.metastack) >= MAX_MARK_DEPTH:
                raise self.checkpoint.error(f"its pickle nests more than {MAX_MARK_DEPTH} levels")
            handler(unpickler)
        return run

    def find_class(self, module, name):
        if (module, name) in RECORD_NAMES:
            return record_class(module, name)
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice"):
            return {"set": set, "frozenset": frozenset, "slice": slice}[name]
        if module == "_codecs" and name == "encode":
            return self.checkpoint.latin1_bytes
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPE_NAMES:
            return getattr(torch, name)
        if module == "torch" and name == "Tensor":
            return _TensorType
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self.checkpoint.rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self.checkpoint.rebuild_from_type
        raise self.checkpoint.error(f"it names {module}.{name}, which is not among the classes this reader allows")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.checkpoint.error("it refers to outside data that is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise self.checkpoint.error("a tensor storage reference is malformed")
        return self.checkpoint.storage(key, storage_type.dtype, numel)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise TypeError("a parameter's data is not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


class _Checkpoint:
    """One open torch zip checkpoint: its pickle and its storages, each storage read once."""

    def __init__(self, path: str, archive: zipfile.ZipFile, prefix: str):
        self.path = path
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.Tensor] = {}

    def error(self, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.path} cannot be read safely: {problem}. Only official AdaFace checkpoints "
                              "(pickled CLIP text models and AdaFace generators) are accepted; re-download the file.")

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in self.storages:
            try:
                info = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise self.error(f"tensor storage {key!r} is missing from the archive") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if numel < 0 or info.file_size != numel * itemsize:
                raise self.error(f"tensor storage {key!r} holds {info.file_size} bytes, not {numel} x {itemsize}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self.error(f"tensor storage {key!r} is compressed (torch.save never compresses)")
            data = bytearray(self.archive.read(info))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        storage = self.storages[key]
        if storage.dtype != dtype:
            raise self.error(f"tensor storage {key!r} is used with two dtypes")
        return storage

    def latin1_bytes(self, *args) -> bytes:
        """The bytes object a protocol-2 pickle writes as `_codecs.encode(text, 'latin1')` (the compiled tokenizer
        pattern's program, for one), made here by encoding the text; any other use of `_codecs.encode` is refused."""
        if len(args) != 2 or type(args[0]) is not str or args[1] not in LATIN1_NAMES:
            described = ", ".join(type(arg).__name__ if type(arg) is not str or len(arg) > 20 else repr(arg)
                                  for arg in args[:3])
            raise self.error(f"it calls _codecs.encode({described}), not (text, 'latin1') as a pickled bytes object "
                             "does")
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            raise self.error("a pickled bytes object holds characters beyond latin-1") from None

    def rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        if not isinstance(storage, torch.Tensor):
            raise self.error("a tensor is built from something that is not a storage")
        if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)
                and type(storage_offset) is int and storage_offset >= 0):
            raise self.error("a tensor's size, stride or offset is malformed")
        if math.prod(size) > 0:
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel():
                raise self.error(f"a tensor of size {tuple(size)} reaches past the end of its storage")
        return torch.as_strided(storage, size, stride, storage_offset)

    def rebuild_from_type(self, func, new_type, args, state):
        if func != self.rebuild_tensor or new_type is not _TensorType or not isinstance(args, tuple):
            raise self.error("a tensor is rebuilt as a subclass this reader does not allow")
        return func(*args)


def _is_int_tuple(values) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int and v >= 0 for v in values)


def load_restricted(path: str) -> Any:
    """The object a torch zip checkpoint holds, with allowed classes as `Record`s and tensors rebuilt here.

    Raises ModelFileError for anything else: a legacy (non-zip) or corrupt file, a global outside the allow-list,
    a missing or mis-sized storage, or a pickle exceeding the object or nesting limits.
    """
    check_regular_file(path, "AdaFace checkpoint", "Put the official AdaFace .pt file there.")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path} is not a torch zip checkpoint ({exc}); official AdaFace .pt files are. "
                             "Re-download the file.") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ModelFileError(f"{path} is not a torch zip checkpoint: expected one <name>/data.pkl entry, "
                                 f"found {len(pickles)}. Re-download the file.")
        checkpoint = _Checkpoint(path, archive, pickles[0][: -len("data.pkl")])
        try:
            byteorder = archive.read(checkpoint.prefix + "byteorder").decode("ascii", "replace")
        except KeyError:
            byteorder = "little"  # torch writes the record only since 1.x; older files are little-endian
        if byteorder != "little":
            raise checkpoint.error(f"its tensors are stored {byteorder}-endian")
        pickle_info = archive.getinfo(pickles[0])
        if pickle_info.compress_type != zipfile.ZIP_STORED:
            raise checkpoint.error("its pickle is compressed (torch.save never compresses)")
        try:
            # Read whole (its size is bounded by the file's, as it is stored uncompressed): the unpickler reads
            # one byte per opcode, which is several times faster from memory than through the zip reader.
            data_file = io.BytesIO(archive.read(pickle_info))
            return _RestrictedUnpickler(data_file, checkpoint).load()
        except ModelFileError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError,
                IndexError, AttributeError, struct.error, RuntimeError, OverflowError, MemoryError) as exc:
            raise checkpoint.error(f"its pickle is corrupt ({type(exc).__name__}: {exc})") from None
