"""ArcFace IResNet in torch, loadable from arcface_torch backbones and insightface recognition ONNX files.

Parameter names follow insightface's ``recognition/arcface_torch/backbones/iresnet.py`` so a ``backbone.pth``
loads with ``load_state_dict``. The insightface model packs (glintr100.onnx, w600k_r50.onnx) were exported
with constant folding, which fuses every BatchNorm that directly follows a convolution into that
convolution; ``IResNet(fused=True)`` is that variant (convolutions with a bias, no post-conv BatchNorm), and
:func:`iresnet_from_onnx` fills it from the ONNX initializers. Either way the module is differentiable
end to end, which is what the trainers' identity loss needs.

Input: RGB faces aligned to the ArcFace 112x112 template, scaled to [-1, 1] (see :func:`to_arcface_input`).
Output: the unnormalised 512-d identity embedding (L2-normalise it to compare identities).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImageInputError, ModelFileError
from .files import read_tensors_only
from .onnx_files import load_onnx_graph
from .transfer import host_to_device

# Blocks per stage of the published backbones (arcface_torch ``get_model``).
IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
DEFAULT_WIDTHS = (64, 128, 256, 512)
ARCFACE_INPUT_SIZE = 112
_FEATURE_GRID = 7  # 112 / 2**4: every stage halves the resolution
_BN_EPS = 1e-5

# The 5-point template insightface's norm_crop aligns faces to, at 112x112 (eyes, nose, mouth corners).
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


def to_arcface_input(rgb01: torch.Tensor) -> torch.Tensor:
    """[B, 3, 112, 112] RGB in [0, 1] -> the network's input range [-1, 1] (arcface_torch's (x - 0.5) / 0.5)."""
    return rgb01 * 2.0 - 1.0


def _post_conv_norm(channels: int, fused: bool) -> nn.Module:
    return nn.Identity() if fused else nn.BatchNorm2d(channels, eps=_BN_EPS)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: bn1 -> conv1 -> bn2 -> prelu -> conv2 -> bn3 (+ identity / downsample)."""

    def __init__(self, inplanes: int, planes: int, stride: int, fused: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=fused)
        self.bn2 = _post_conv_norm(planes, fused)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=fused)
        self.bn3 = _post_conv_norm(planes, fused)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=fused), _post_conv_norm(planes, fused)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """ArcFace IResNet. ``layers`` are blocks per stage, ``widths`` channels per stage (arcface_torch: 64..512)."""

    def __init__(
        self,
        layers: tuple[int, ...] = IRESNET_LAYERS["r100"],
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        num_features: int = 512,
        fused: bool = False,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ModelFileError(f"IResNet has 4 stages; got layers={layers}, widths={widths}")
        self.layers_per_stage = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.num_features = int(num_features)
        self.fused = bool(fused)
        stem = self.widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=fused)
        self.bn1 = _post_conv_norm(stem, fused)
        self.prelu = nn.PReLU(stem)
        inplanes = stem
        for stage, (blocks, planes) in enumerate(zip(self.layers_per_stage, self.widths), start=1):
            stage_blocks = [IBasicBlock(inplanes, planes, 2, fused)]
            stage_blocks += [IBasicBlock(planes, planes, 1, fused) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.fc = nn.Linear(inplanes * _FEATURE_GRID * _FEATURE_GRID, self.num_features)
        self.features = nn.BatchNorm1d(self.num_features, eps=_BN_EPS)
        # arcface_torch keeps this scale at 1 and frozen.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    @property
    def arch(self) -> dict:
        return {
            "layers": list(self.layers_per_stage),
            "widths": list(self.widths),
            "num_features": self.num_features,
            "fused": self.fused,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (ARCFACE_INPUT_SIZE, ARCFACE_INPUT_SIZE):
            raise ImageInputError(f"IResNet expects [B, 3, 112, 112] aligned faces, got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


# ---------------------------------------------------------------------------------------------------------
# arcface_torch ``.pth`` backbones


def _strip_prefixes(state_dict: dict) -> dict:
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    out = {}
    for name, value in state_dict.items():
        for prefix in ("module.", "backbone."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def arch_from_state_dict(state_dict: dict) -> dict:
    """Reads stage depths, widths and feature size off an arcface_torch state dict."""
    blocks = defaultdict(set)
    for name in state_dict:
        parts = name.split(".")
        if parts[0].startswith("layer") and len(parts) > 1 and parts[1].isdigit():
            blocks[parts[0]].add(int(parts[1]))
    stages = [f"layer{i}" for i in range(1, 5)]
    missing = [s for s in stages if not blocks.get(s)]
    if missing or "conv1.weight" not in state_dict or "fc.weight" not in state_dict:
        raise ModelFileError(
            "this is not an arcface_torch IResNet state dict: expected keys conv1.weight, layer1..layer4.*, "
            f"fc.weight (missing stages: {missing or 'none'}; first keys: {list(state_dict)[:5]})"
        )
    widths = tuple(int(state_dict[f"{s}.0.conv1.weight"].shape[0]) for s in stages)
    fused = "conv1.bias" in state_dict
    return {
        "layers": [len(blocks[s]) for s in stages],
        "widths": list(widths),
        "num_features": int(state_dict["fc.weight"].shape[0]),
        "fused": fused,
    }


def iresnet_from_state_dict(state_dict: dict) -> IResNet:
    state_dict = _strip_prefixes(state_dict)
    arch = arch_from_state_dict(state_dict)
    model = IResNet(tuple(arch["layers"]), tuple(arch["widths"]), arch["num_features"], arch["fused"])
    result = model.load_state_dict(state_dict, strict=False)
    # num_batches_tracked is bookkeeping only; older exports lack it.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"IResNet state dict does not match the {arch['layers']} layout: "
            f"missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    return model.eval()


def load_arcface_torch(path: str) -> IResNet:
    """Loads an arcface_torch ``backbone.pth`` (a tensors-only pickle: read with weights_only=True)."""
    # not memory-mapped: arcface_torch backbones may be in the legacy format, and the whole state is used anyway
    state_dict = read_tensors_only(path, "ArcFace backbone", "Expected an arcface_torch backbone.pth state dict",
                                   mmap=False)
    if not isinstance(state_dict, dict):
        raise ModelFileError(f"{path} holds a {type(state_dict).__name__}, expected a state dict")
    return iresnet_from_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# insightface recognition ONNX files (BN fused into the convolutions)


def _onnx_tensors(model) -> dict:
    from onnx import numpy_helper

    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in tensors:
            # the exporter shares equal initializers (e.g. PReLU slopes left at 0.25) through Identity nodes
            tensors[node.output[0]] = tensors[node.input[0]]
    return tensors


def _attr(node, name, default):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class _OnnxParams:
    """The IResNet parameters of a recognition graph, grouped by kind in graph (topological) order.

    Within each kind the order is fixed by data dependencies, so no node names are needed: 3x3 convolutions
    run stem, then conv1/conv2 of each block; 1x1 convolutions are the stage downsamples; BatchNorms are each
    block's pre-conv bn1, then bn2, then ``features``.
    """

    def __init__(self, model, path: str):
        tensors = _onnx_tensors(model)

        def weight(node, index):
            if len(node.input) <= index or not node.input[index]:
                return None
            if node.input[index] not in tensors:
                raise ModelFileError(f"{path}: {node.op_type} node {node.name!r} has a computed weight input")
            return torch.from_numpy(tensors[node.input[index]].copy()).float()

        ops = [n.op_type for n in model.graph.node[:8]]
        if "Sub" in ops and "Mul" in ops:
            raise ModelFileError(
                f"{path} is an MXNet-converted recognition model (input normalisation inside the graph); "
                "use an arcface_torch export such as glintr100.onnx (antelopev2) or w600k_r50.onnx (buffalo_l)"
            )
        self.conv3, self.conv1x1, self.bns, self.prelus, self.fc = [], [], [], [], []
        matmul_weight = None
        for node in model.graph.node:
            if node.op_type == "Conv":
                w, b = weight(node, 1), weight(node, 2)
                (self.conv3 if w.shape[-1] == 3 else self.conv1x1).append((w, b, node))
            elif node.op_type == "BatchNormalization":
                self.bns.append([weight(node, i) for i in range(1, 5)] + [_attr(node, "epsilon", 1e-5)])
            elif node.op_type == "PRelu":
                self.prelus.append(weight(node, 1).reshape(-1))
            elif node.op_type == "Gemm":
                w = weight(node, 1)
                self.fc.append((w if _attr(node, "transB", 0) else w.t(), weight(node, 2)))
            elif node.op_type == "MatMul":
                matmul_weight = weight(node, 1).t()
            elif node.op_type == "Add" and matmul_weight is not None:
                self.fc.append((matmul_weight, weight(node, 1)))
                matmul_weight = None
        if len(self.fc) != 1 or not self.conv3:
            raise ModelFileError(
                f"{path} does not look like an ArcFace IResNet graph: found {len(self.conv3)} 3x3 convolutions "
                f"and {len(self.fc)} fully connected layers (expected many and exactly one)"
            )

    def arch(self, path: str) -> dict:
        block_convs = self.conv3[1:]
        if len(block_convs) % 2:
            raise ModelFileError(f"{path}: odd number of block convolutions ({len(block_convs)}); not an IResNet")
        # a stage starts where a block's conv2 downsamples (stride 2)
        widths, layers = [], []
        for (w, _, _), (_, _, conv2) in zip(block_convs[::2], block_convs[1::2]):
            if not layers or list(_attr(conv2, "strides", [1, 1])) != [1, 1]:
                widths.append(int(w.shape[0]))
                layers.append(0)
            layers[-1] += 1
        fc_w = self.fc[0][0]
        if len(layers) != 4:
            raise ModelFileError(f"{path}: found {len(layers)} stages (channels {widths}); an IResNet has 4")
        return {"layers": layers, "widths": widths, "num_features": int(fc_w.shape[0]), "fused": True}


def iresnet_from_onnx(path: str) -> IResNet:
    """Builds the fused IResNet matching an insightface recognition ONNX file and copies its weights in."""
    # the graph only: a file whose tensors live in other files is refused (they could be anywhere on disk)
    model = load_onnx_graph(path, "recognition model")
    params = _OnnxParams(model, path)
    arch = params.arch(path)
    net = IResNet(tuple(arch["layers"]), tuple(arch["widths"]), arch["num_features"], fused=True)
    blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    n_bn_expected = len(blocks) + 1  # each block's bn1, then bn2; ``features`` may be folded into the Gemm
    if len(params.conv1x1) != 4 or len(params.prelus) != len(blocks) + 1 or len(params.bns) not in (
        n_bn_expected,
        n_bn_expected + 1,
    ):
        raise ModelFileError(
            f"{path}: graph has {len(params.conv1x1)} downsample convolutions, {len(params.prelus)} PReLUs and "
            f"{len(params.bns)} BatchNorms; an IResNet {arch['layers']} with BN fused into the convolutions has "
            f"4, {len(blocks) + 1} and {n_bn_expected}-{n_bn_expected + 1}"
        )

    def put(param: torch.Tensor, value: torch.Tensor | None, what: str):
        if value is None:
            value = torch.zeros_like(param)  # a conv exported without bias
        if tuple(param.shape) != tuple(value.shape):
            raise ModelFileError(f"{path}: {what} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(value)

    def put_conv(conv: nn.Conv2d, entry, what: str):
        put(conv.weight, entry[0], f"{what} weight")
        put(conv.bias, entry[1], f"{what} bias")

    def put_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, entry, what: str):
        scale, shift, mean, var, eps = entry
        for p, v, name in ((bn.weight, scale, "scale"), (bn.bias, shift, "shift"), (bn.running_mean, mean, "mean")):
            put(p, v, f"{what} {name}")
        # Keep the exported epsilon's effect exactly while our module uses its own eps.
        put(bn.running_var, var + (eps - bn.eps), f"{what} variance")

    convs3 = iter(params.conv3)
    put_conv(net.conv1, next(convs3), "stem conv")
    put(net.prelu.weight, params.prelus[0], "stem PReLU")
    for i, block in enumerate(blocks):
        put_bn(block.bn1, params.bns[i], f"block {i} bn1")
        put_conv(block.conv1, next(convs3), f"block {i} conv1")
        put(block.prelu.weight, params.prelus[i + 1], f"block {i} PReLU")
        put_conv(block.conv2, next(convs3), f"block {i} conv2")
    for stage, entry in zip((net.layer1, net.layer2, net.layer3, net.layer4), params.conv1x1):
        put_conv(stage[0].downsample[0], entry, "downsample conv")
    put_bn(net.bn2, params.bns[len(blocks)], "bn2")
    put(net.fc.weight, params.fc[0][0], "fc weight")
    put(net.fc.bias, params.fc[0][1], "fc bias")
    if len(params.bns) == n_bn_expected + 1:
        put_bn(net.features, params.bns[-1], "features")
    else:  # folded into the Gemm: make ``features`` an exact identity
        net.features.running_mean.zero_()
        net.features.running_var.fill_(1.0 - net.features.eps)
        net.features.bias.data.zero_()
    return net.eval()


def load_arcface(path: str) -> IResNet:
    """Loads ArcFace weights from an insightface ``.onnx`` or an arcface_torch ``.pth``/``.pt``."""
    if path.lower().endswith(".onnx"):
        return iresnet_from_onnx(path)
    return load_arcface_torch(path)


def same_features(a: IResNet, b: IResNet, tolerance: float = 1e-3) -> bool:
    """Whether two ArcFace networks (in eval mode, as load_arcface returns them) compute the same features: their
    outputs on a fixed input differ by at most ``tolerance`` of their size. The same weights read from an .onnx
    (BatchNorm folded into the convolutions) and from a .pth differ by rounding only (about 1e-6); another model's
    differ by about their whole size."""
    x = torch.rand(2, 3, ARCFACE_INPUT_SIZE, ARCFACE_INPUT_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        features_a, features_b = a(x), b(x)
    return features_a.shape == features_b.shape and \
        bool((features_a - features_b).norm() <= tolerance * features_a.norm())


def similarity_to_template(landmarks: torch.Tensor, size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """[B, 5, 2] landmarks -> [B, 2, 3] least-squares similarity transforms onto the ArcFace template
    (Umeyama, as insightface's norm_crop estimates it)."""
    src = landmarks.double()
    dst = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64, device=landmarks.device) * (size / 112.0)
    dst = dst.expand_as(src)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.transpose(1, 2) @ src_c / src.shape[1]
    u, s, vh = torch.linalg.svd(cov)
    d = torch.ones(src.shape[0], 2, dtype=torch.float64, device=landmarks.device)
    d[:, 1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    rotation = u @ torch.diag_embed(d) @ vh
    scale = (s * d).sum(-1) / src_c.square().sum((1, 2)).div(src.shape[1])
    translation = dst_mean.transpose(1, 2) - scale[:, None, None] * rotation @ src_mean.transpose(1, 2)
    return torch.cat([scale[:, None, None] * rotation, translation], dim=2).to(landmarks.dtype)


def crop_to_image(landmarks: torch.Tensor, size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """[B, 5, 2] landmarks -> [B, 2, 3] affine maps from aligned-crop pixels to image pixels (the inverse of
    :func:`similarity_to_template`), in float32."""
    m = similarity_to_template(landmarks.float(), size)  # image pixels -> crop pixels
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], device=m.device).expand(m.shape[0], 1, 3)], dim=1)
    return torch.linalg.inv(full)[:, :2]


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """Differentiable ArcFace alignment: [B, C, H, W] images and their [B, 5, 2] pixel landmarks ->
    [B, C, size, size] crops warped onto the template (bilinear, zeros outside), like norm_crop."""
    b, _, h, w = images.shape
    # the small solves run where the landmarks are (host landmarks: on the host, no wait for the accelerator)
    inverse = host_to_device(crop_to_image(landmarks, size), images.device)
    # grid_sample works in [-1, 1] with align_corners=False: pixel centres at (i + 0.5) / n * 2 - 1
    ys, xs = torch.meshgrid(torch.arange(size, device=images.device), torch.arange(size, device=images.device),
                            indexing="ij")
    crop = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3).float()
    src = crop @ inverse.transpose(1, 2)  # [B, size*size, 2] source pixel coordinates
    grid = torch.stack([(src[..., 0] + 0.5) / w * 2 - 1, (src[..., 1] + 0.5) / h * 2 - 1], -1)
    grid = grid.reshape(b, size, size, 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def aligned_crop_source_box(landmarks: torch.Tensor, size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """[B, 5, 2] landmarks -> [B, 4] whole-pixel boxes x1, y1, x2, y2 (x2, y2 exclusive) holding every image pixel
    :func:`align_faces` reads: its crop's corner pixels mapped back into the image (the map is affine, so the
    corners bound the rest), grown by the bilinear sample's second neighbour."""
    last = size - 1
    corners = torch.tensor([[0.0, 0.0, 1.0], [last, 0.0, 1.0], [0.0, last, 1.0], [last, last, 1.0]],
                           device=landmarks.device)
    src = corners @ crop_to_image(landmarks, size).transpose(1, 2)  # [B, 4, 2] image pixel coordinates
    return torch.cat([src.amin(1).floor(), src.amax(1).floor() + 2], dim=1)
