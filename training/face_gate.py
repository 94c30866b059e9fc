"""The identity loss's face gate F(x0_hat) (IDAdapter paper, eq. 9: the identity loss counts only where a face
is detected in x0_hat, which at large timesteps it is not) and its open rate per timestep bucket for the logs."""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from ..nodes.arch.transfer import host_to_device

GATES = ("detector", "norm")


def box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Intersection over union [n] of boxes [n, 4] with one box [4], all as x1, y1, x2, y2."""
    top_left = torch.maximum(boxes[:, :2], box[:2])
    bottom_right = torch.minimum(boxes[:, 2:], box[2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = lambda b: (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)  # noqa: E731
    return inter / (area(boxes) + area(box) - inter).clamp(min=1e-12)  # empty boxes: 0 / tiny = 0


def detector_gate(analyzer, decoded: torch.Tensor, target_boxes: torch.Tensor, min_iou: float) -> torch.Tensor:
    """Open [B] bool where the pack's face detector finds a face in x0_hat (decoded [B, 3, H, W] in -1..1, no
    gradient) whose box overlaps the target photo's face box [B, 4] by IoU >= ``min_iou``: the identity loss crops
    x0_hat at the target's landmarks, so a face found elsewhere would not be the face it embeds."""
    from ..nodes.face.insightface_backend import detect_boxes

    images = ((decoded.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
    found = detect_boxes(analyzer, images)
    return torch.tensor([bool((box_iou(boxes, target) >= min_iou).any())
                         for boxes, target in zip(found, target_boxes.float().cpu())], dtype=torch.bool)


def norm_gate(features: torch.Tensor, reference_norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """Open [B] bool where the ArcFace feature norm of the aligned x0_hat crop is at least ``ratio`` of the target
    photo's (ArcFace's norm is its own face-quality signal)."""
    return features.detach().norm(dim=-1) >= ratio * reference_norms


class GateOpenRates:
    """The gate's open rate per timestep bucket (``id_gate_open/t000-249`` ...) over the last ``window`` micro-steps.
    The loop logs one step in --log_every: counted over the window, a logged rate covers every row since the last
    log, not one step's few rows. A bucket that had no row in the window is left out (never a 0/0)."""

    def __init__(self, num_train_timesteps: int, buckets: int = 4, window: int = 1):
        self.num_train_timesteps, self.buckets = num_train_timesteps, buckets
        width = len(str(num_train_timesteps - 1))
        edges = [b * num_train_timesteps // buckets for b in range(buckets + 1)]
        self.names = [f"id_gate_open/t{lo:0{width}d}-{hi - 1:0{width}d}" for lo, hi in zip(edges, edges[1:])]
        self.history: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)

    def add(self, gate: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Counts one micro-step's rows (gate [n] bool on any device, at host timesteps [n]); returns the window's
        rates by name, as 0-dim tensors on the gate's device: nothing is read back here, so the host does not wait
        for the accelerator (the loop reads the logs on the steps that log)."""
        bucket = (timesteps.long() * self.buckets // self.num_train_timesteps).clamp(0, self.buckets - 1)
        in_bucket = F.one_hot(bucket, self.buckets).float()  # [n, buckets], on the host
        opened = gate.float() @ host_to_device(in_bucket, gate.device)
        self.history.append((opened, in_bucket.sum(0)))
        opened, rows = (torch.stack(counts).sum(0) for counts in zip(*self.history))
        return {name: opened[b] / rows[b].item() for b, name in enumerate(self.names) if rows[b] > 0}
