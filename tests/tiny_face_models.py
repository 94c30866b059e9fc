"""Test helpers over training/tiny.py's tiny insightface pack: images with "faces" where the tiny detector finds
them, and the boxes and landmarks it must report."""

from __future__ import annotations

import numpy as np
import torch

from comfyui_idadapter.training.tiny import CELL, DET_INPUT, export_onnx, make_detector, make_pack, make_recognizer, random_iresnet  # noqa: F401
from comfyui_idadapter.training.tiny import cell_landmarks as expected_landmarks  # noqa: F401


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
