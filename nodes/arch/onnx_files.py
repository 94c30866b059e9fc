"""Reading ONNX files safely: the graph only, never tensor data kept in other files.

An ONNX file may keep tensors in separate files ("external data"), named by a ``location`` field that can be
``../anything``, an absolute path, or a symlink inside the model folder that points out of it. Whoever opens
the model (onnx.load, onnxruntime, insightface) would then read those files. The face models this pack uses
(insightface's antelopev2 and buffalo_l packs, arcface_torch exports) are self-contained, so the pack refuses
every ONNX file with external data instead of trying to judge where each location leads.
"""

from __future__ import annotations

from ..errors import MissingDependencyError, ModelFileError
from .files import check_regular_file


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("reading ONNX files needs the onnx package: pip install onnx") from exc
    return onnx


def _graph_tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse initializers, node attributes, subgraphs."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def model_tensors(model):
    """Every TensorProto of a ModelProto (main graph, subgraphs, local functions)."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def external_data_locations(model) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor whose data lives outside the ONNX file."""
    onnx = _import_onnx()
    found = []
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            found.append((tensor.name, location))
    return found


def load_onnx_graph(path: str, what: str = "model"):
    """The ModelProto of ``path`` without reading any other file; ModelFileError for unreadable files and for
    files that keep tensor data elsewhere."""
    onnx = _import_onnx()
    check_regular_file(path, what)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated files, OSError
        raise ModelFileError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}); it may be corrupt or incompletely "
            "downloaded: download it again"
        ) from exc
    refs = external_data_locations(model)
    if refs:
        name, location = refs[0]
        more = f" and {len(refs) - 1} more tensor(s)" if len(refs) > 1 else ""
        raise ModelFileError(
            f"{path} keeps tensor data in separate files (tensor {name!r} -> {location!r}{more}); this pack reads "
            "only self-contained .onnx files, so that no file outside the model folder can be read through one. "
            "The insightface packs (antelopev2, buffalo_l) and arcface_torch exports are self-contained: download "
            "the model again, or save it as one file (onnx.save_model(model, path) without save_as_external_data)"
        )
    return model


def graph_input_shape(model) -> list | None:
    """The first real input's shape (ints for fixed dimensions, names for symbolic ones), or None."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:  # old opsets list weights among the inputs
            continue
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]
    return None
