"""The identity loss's face gate (training/face_gate.py): the detector gate on hand-made x0_hat images with the tiny
pack, box IoU, the open rate per timestep bucket and how it reaches TensorBoard."""

import math
import os
import shutil

import pytest
import torch
from tiny_face_models import expected_box

from comfyui_idadapter.nodes.face import insightface_backend as backend
from comfyui_idadapter.training import face_gate, tiny

SIZE = 64  # the tiny preset's training resolution
TARGET_CELL, OTHER_CELL = (1, 2), (3, 0)  # face cells of a 4 x 4 grid


def as_x0_hat(photo) -> torch.Tensor:
    """A [size, size, 3] 0..1 photo as a decoded x0_hat: [1, 3, size, size] in the VAE's -1..1."""
    return torch.as_tensor(photo, dtype=torch.float32).permute(2, 0, 1)[None] * 2 - 1


def test_detector_gate_opens_on_the_target_photo_only(analyzer):
    target = as_x0_hat(tiny.synthetic_image(0, TARGET_CELL, SIZE, seed=1))
    shuffled = target.flatten(2)[..., torch.randperm(SIZE * SIZE, generator=torch.Generator().manual_seed(0))]
    candidates = {
        "target photo": target,
        "black": torch.full_like(target, -1.0),
        "target's pixels shuffled": shuffled.view_as(target),  # the face's colours as noise, no face
        "face elsewhere": as_x0_hat(tiny.synthetic_image(0, OTHER_CELL, SIZE, seed=2)),
    }
    x0_hat = torch.cat(list(candidates.values()))
    boxes = torch.from_numpy(expected_box(TARGET_CELL, SIZE)).expand(len(candidates), 4)

    found = backend.detect_boxes(analyzer, ((x0_hat + 1) / 2).permute(0, 2, 3, 1))
    assert [len(f) for f in found] == [1, 0, 0, 1]  # the last has a face, at the wrong place
    assert torch.equal(found[0][0], boxes[0]) and face_gate.box_iou(found[3], boxes[3]).item() == 0.0

    gate = face_gate.detector_gate(analyzer, x0_hat, boxes, min_iou=0.5)
    assert dict(zip(candidates, gate.tolist())) == {"target photo": True, "black": False,
                                                    "target's pixels shuffled": False, "face elsewhere": False}
    anywhere = face_gate.detector_gate(analyzer, x0_hat, boxes, min_iou=0.0)  # any face, wherever it is
    assert anywhere.tolist() == [True, False, False, True]


def test_square_box_follows_the_centre_crop_like_the_landmarks(tmp_path):
    from PIL import Image

    from comfyui_idadapter.training import data

    Image.new("RGB", (100, 80)).save(tmp_path / "wide.png")  # centre square: x 10..90, scaled by 40 / 80
    photo = data.FaceImage(str(tmp_path / "wide.png"), "", torch.tensor([20.0, 10.0, 60.0, 50.0]),
                           torch.tensor([[20.0, 10.0]] * 5), torch.zeros(512))
    assert data.square_box(photo, 40).tolist() == [5.0, 5.0, 25.0, 25.0]
    assert data.load_square(photo, 40)[1][0].tolist() == [5.0, 5.0]


def test_box_iou():
    box = torch.tensor([0.0, 0.0, 2.0, 2.0])
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [2.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(face_gate.box_iou(boxes, box), torch.tensor([1.0, 1 / 3, 0.0, 0.0]))
    assert face_gate.box_iou(torch.zeros(0, 4), box).shape == (0,)


def test_norm_gate_compares_with_a_share_of_the_target_norm():
    features = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 2.0]])  # norms 5, 1, 2
    assert face_gate.norm_gate(features, torch.tensor([4.0, 4.0, 4.0]), 0.5).tolist() == [True, False, True]


def test_open_rates_per_bucket_count_the_window_and_leave_empty_buckets_out():
    rates = face_gate.GateOpenRates(1000, window=2)
    assert rates.names == ["id_gate_open/t000-249", "id_gate_open/t250-499", "id_gate_open/t500-749",
                           "id_gate_open/t750-999"]
    def add(gate, timesteps):  # the rates stay tensors, read back by the loop when it logs
        found = rates.add(torch.tensor(gate), torch.tensor(timesteps))
        assert all(isinstance(rate, torch.Tensor) and rate.ndim == 0 for rate in found.values())
        return {name: float(rate) for name, rate in found.items()}

    first = add([True, False, True], [0, 249, 999])
    assert first == {"id_gate_open/t000-249": 0.5, "id_gate_open/t750-999": 1.0}
    second = add([False], [500])
    assert second == {"id_gate_open/t000-249": 0.5, "id_gate_open/t500-749": 0.0, "id_gate_open/t750-999": 1.0}
    third = add([True], [250])  # the first step has left the window
    assert third == {"id_gate_open/t250-499": 1.0, "id_gate_open/t500-749": 0.0}
    assert face_gate.GateOpenRates(50, buckets=2).names == ["id_gate_open/t00-24", "id_gate_open/t25-49"]


def test_open_rates_reach_tensorboard_finite_and_by_bucket(tmp_path, tiny_assets):
    """A tiny run whose gate is always open (norm gate, ratio 0): every logged bucket reads 1.0, and only the
    bucket names of the schedule's four quarters appear."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from comfyui_idadapter.training import loop
    from comfyui_idadapter.training.cli import parse_args
    from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    out = tmp_path / "run"
    shutil.copytree(tiny_assets, out / "tiny_assets")
    config = parse_args(IDAdapterTrainConfig, [
        "--preset", "tiny", "--output_dir", str(out), "--validation_every", "0", "--max_steps", "4",
        "--log_every", "2", "--checkpoint_every", "4", "--batch_size", "4", "--image_dropout", "0",
        "--id_gate", "norm", "--id_gate_ratio", "0"])
    task = IDAdapterTask(config, log=lambda *a: None)
    loop.run(task, config)
    events = next(root for root, _, files in os.walk(out / "logs") if any(f.startswith("events.") for f in files))
    scalars = EventAccumulator(events)
    scalars.Reload()
    logged = {tag: [e.value for e in scalars.Scalars(tag)] for tag in scalars.Tags()["scalars"]}
    buckets = {tag: values for tag, values in logged.items() if tag.startswith("id_gate_open/")}
    assert buckets and set(buckets) <= set(task.gate_rates.names)
    assert all(value == 1.0 for values in buckets.values() for value in values)
    assert all(math.isfinite(value) for values in logged.values() for value in values)


def test_the_detector_gate_opens_on_every_training_target_at_training_size(tmp_path, tiny_assets):
    """The targets' face boxes, moved to the training resolution, are where the detector finds the faces of the
    target photos themselves: x0_hat equal to its target opens the gate."""
    from accelerate import Accelerator

    from comfyui_idadapter.training import data
    from comfyui_idadapter.training.cli import parse_args
    from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    shutil.copytree(tiny_assets, tmp_path / "tiny_assets")
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(tmp_path), "--id_gate",
                                               "detector"])
    task = IDAdapterTask(config, log=lambda *a: None)
    task.setup(Accelerator(cpu=True))
    photos = [image for identity in task.identities for image in identity.images]
    boxes = task.targets(photos)[2]
    x0_hat = torch.stack([data.load_square(image, config.resolution)[0] for image in photos]) * 2 - 1
    assert face_gate.detector_gate(task.c.analyzer, x0_hat, boxes, config.id_gate_iou).all()
