"""Tiny stand-ins for an insightface model pack, exported to ONNX in the tests.

The detector is a real SCRFD-shaped graph (9 outputs: scores, box distances and keypoints at strides 8, 16,
32 with two anchors each), so insightface's own SCRFD decoding, NMS and alignment run on it. It "detects" a
face in every 32x32 cell of its 128x128 input whose mean brightness is high: the box is that cell and the
landmarks are the ArcFace template scaled into it. The recognizer is a small random IResNet.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nodes.arch.iresnet import ARCFACE_TEMPLATE_112, IResNet

DET_INPUT = 128
CELL = 32  # the detecting stride: a face is one 32x32 cell of the detector input


class TinySCRFD(nn.Module):
    def forward(self, x):
        scores, boxes, kps = [], [], []
        template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float32).reshape(1, 10) / 112.0
        for stride in (8, 16, 32):
            brightness = F.avg_pool2d(x.mean(1, keepdim=True), stride).flatten().repeat_interleave(2)
            n = brightness.shape[0]
            if stride == CELL:
                score = torch.sigmoid(20.0 * (brightness - 0.5))
            else:
                score = brightness * 0.0
            scores.append(score.reshape(n, 1))
            # distances in stride units from the anchor (the cell's top-left corner): the box is the cell
            boxes.append(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4) + brightness.reshape(n, 1) * 0.0)
            kps.append(template.expand(n, 10) + brightness.reshape(n, 1) * 0.0)
        return (*scores, *boxes, *kps)


def export_onnx(module: nn.Module, path: str, example: torch.Tensor, dynamic_batch: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            path,
            dynamo=False,  # the TorchScript exporter, like insightface's own torch2onnx (opset 11, BN folded)
            opset_version=11,
            input_names=["data"],
            dynamic_axes={"data": {0: "batch"}} if dynamic_batch else None,
        )
    return path


def random_iresnet(seed: int = 0, layers=(1, 1, 1, 1), widths=(8, 16, 16, 32)) -> IResNet:
    """A small IResNet with non-trivial BatchNorm statistics and PReLU slopes (so BN folding matters)."""
    gen = torch.Generator().manual_seed(seed)
    net = IResNet(layers, widths, 512)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        net.features.weight.fill_(1.0)
    return net.eval()


def make_detector(path: str) -> str:
    return export_onnx(TinySCRFD(), path, torch.zeros(1, 3, DET_INPUT, DET_INPUT))


def make_recognizer(path: str, seed: int = 0) -> str:
    return export_onnx(random_iresnet(seed), path, torch.zeros(1, 3, 112, 112), dynamic_batch=True)


def make_pack(insightface_root: str, name: str = "tinypack", detector=True, recognizer=True) -> str:
    """``<insightface_root>/models/<name>/`` with det.onnx and rec.onnx, as a user would lay out antelopev2."""
    folder = os.path.join(insightface_root, "models", name)
    os.makedirs(folder, exist_ok=True)
    if detector:
        make_detector(os.path.join(folder, "det.onnx"))
    if recognizer:
        make_recognizer(os.path.join(folder, "rec.onnx"))
    return folder


def face_image(cells: list[tuple[int, int]], size: int = DET_INPUT, seed: int = 0) -> torch.Tensor:
    """IMAGE [1, size, size, 3]: dark background with a textured bright "face" in each (row, col) cell.

    Cells are in detector-input units (32 px at 128 px), so at other sizes a face is size/4 px wide.
    """
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), dtype=np.float32)
    cell = size * CELL // DET_INPUT
    for r, c in cells:
        img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = rng.uniform(0.8, 1.0, (cell, cell, 3))
    return torch.from_numpy(img)[None]


def expected_box(cell: tuple[int, int], size: int = DET_INPUT) -> np.ndarray:
    r, c = cell
    s = size * CELL / DET_INPUT
    return np.array([c * s, r * s, (c + 1) * s, (r + 1) * s], dtype=np.float32)


def expected_landmarks(cell: tuple[int, int], size: int = DET_INPUT) -> np.ndarray:
    r, c = cell
    s = size * CELL / DET_INPUT
    return np.array(ARCFACE_TEMPLATE_112, dtype=np.float32) * (s / 112.0) + np.array([c * s, r * s], np.float32)
