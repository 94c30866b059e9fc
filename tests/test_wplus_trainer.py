"""training/train_wplus.py on the tiny preset: stage I learns what W+ carries, stage II keeps the mapping and makes W+
swaps leave the background alone, codes are computed once, resumes are exact, and the exports load in the nodes'
loader."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from comfyui_idadapter.nodes.arch import e4e as e4e_arch  # noqa: E402
from comfyui_idadapter.nodes.arch import wplus as wp  # noqa: E402
from comfyui_idadapter.nodes.arch.unet_blocks import BlockSpec  # noqa: E402
from comfyui_idadapter.nodes.errors import ConfigError  # noqa: E402
from comfyui_idadapter.training import data, diffusers_binding, loop, tiny  # noqa: E402
from comfyui_idadapter.training import wplus_task as wt  # noqa: E402
from comfyui_idadapter.training.cli import parse_args  # noqa: E402
from comfyui_idadapter.training.wplus_config import WPlusTrainConfig  # noqa: E402
from comfyui_idadapter.training.wplus_models import cached_codes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--validation_every", "0"]


def tiny_config(out, *args):
    return parse_args(WPlusTrainConfig, ["--preset", "tiny", "--output_dir", str(out), *QUIET, *args])


def frozen_state(task):
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in (("unet", task.m.unet), ("text_encoder", task.m.text_encoder), ("vae", task.m.vae))}


def adapter_state(adapter):
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def train_stage(out, *args):
    """A whole in-process run: the task, what it held before training and after."""
    config = tiny_config(out, *args)
    accelerator = loop.make_accelerator(config)
    task = wt.WPlusTask(config, log=lambda *a: None)
    task.setup(accelerator)
    start, frozen = adapter_state(task.adapter), frozen_state(task)
    trainable = {name for name, p in task.trainable.named_parameters() if p.requires_grad}
    optimized = {id(p) for group in task.param_groups() for p in group["params"]}
    before = task.heldout_check()
    path = loop.run(task, config, accelerator)
    return {"task": task, "path": path, "start": start, "frozen": frozen, "before": before,
            "after": task.heldout_check(), "trainable": trainable, "optimized": optimized}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    first = train_stage(tmp_path_factory.mktemp("wplus_stage1"))
    out = tmp_path_factory.mktemp("wplus_stage2")
    shutil.copytree(first["task"].config.output_dir + "/tiny_assets", out / "tiny_assets")
    second = train_stage(out, "--stage", "2", "--adapter_init", first["path"],
                         "--cache_dir", first["task"].cache_dir)
    return first, second


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_stage_one_trains_the_mapping_and_the_residual_attention_from_copies_of_the_text_attention(stages):
    first, _ = stages
    task = first["task"]
    names = {f"adapter.{k}" for k, _ in task.adapter.named_parameters()}
    assert first["trainable"] == names  # the mapping and every residual projection, nothing of the UNet
    assert first["optimized"] == {id(p) for p in task.adapter.parameters()}
    blocks = diffusers_binding.transformer_blocks(task.m.unet)
    assert sorted(task.adapter.layers) == sorted(blocks)
    for name, layer in task.adapter.layers.items():  # the official initialisation
        for ours, theirs in (("to_q_wplus", "to_q"), ("to_k_wplus", "to_k"), ("to_v_wplus", "to_v")):
            assert torch.equal(first["start"][f"layers.{name}.{ours}.weight"],
                               getattr(blocks[name].attn2, theirs).weight.float())
    now = adapter_state(task.adapter)
    assert changed(first["start"], now) == set(now)  # every tensor of the adapter trained
    for module, state in frozen_state(task).items():  # the base stays bit-identical
        assert not changed(first["frozen"][module], state), module


def test_stage_two_keeps_the_mapping_bit_identical_and_trains_the_residual_attention(stages):
    first, second = stages
    task = second["task"]
    assert second["trainable"] == {f"adapter.{k}" for k, _ in task.adapter.named_parameters()
                                   if not k.startswith("w_proj.")}
    stage1 = wp.load_wplus_file(first["path"]).adapter.state_dict()
    assert not changed(stage1, second["start"])  # it starts where stage I ended
    export = wp.load_wplus_file(second["path"]).adapter.state_dict()
    moved = changed(stage1, export)
    assert moved == {k for k in export if k.startswith("layers.")}, sorted(moved)[:4]
    for module, state in frozen_state(task).items():
        assert not changed(second["frozen"][module], state), module


def check_w_plus_was_learned(before, after):
    """The held-out check before and after stage I. Untrained, the code hardly matters (the own code's loss within
    1.5 % of another person's); trained, the own code denoises clearly better (by more than 3 %) and better than
    before training (by more than 1 %). Measured on the tiny run (seeds 0, 1, 2, and seed 0 with one or two intra-op
    threads, which build different tiny models): untrained 0.001 to 0.44 %; trained 7.0 to 9.9 % and 3.9 to 15.5 %
    below the untrained loss, so each bound has a margin of two or more."""
    (own_before, other_before, _), (own, other, _) = before, after
    assert abs(1 - own_before / other_before) < 0.015, (own_before, other_before)
    assert own < 0.97 * other, (own, other)
    assert own < 0.99 * own_before, (own, own_before)


def test_learning_is_real_on_held_out_photos(stages):
    first, _ = stages
    check_w_plus_was_learned(first["before"], first["after"])
    with pytest.raises(AssertionError):  # a run that learned nothing stays at the untrained figures and fails
        check_w_plus_was_learned(first["before"], first["before"])


def test_after_stage_two_a_w_plus_swap_moves_the_background_less(stages):
    first, second = stages
    assert second["before"][2] == pytest.approx(first["after"][2], rel=1e-4)  # the same measurement, stage I's weights
    own, other, outside = second["after"]
    assert outside < 0.5 * first["after"][2], (outside, first["after"][2])
    assert own < 0.95 * other, (own, other)  # and the code still carries the face


def test_the_export_loads_in_the_nodes_loader_and_gives_the_trainers_tokens(stages):
    first, _ = stages
    task = first["task"]
    weights = wp.load_wplus_file(first["path"])
    assert weights.source == wp.FORMAT and weights.config == task.adapter.config
    assert not changed(adapter_state(task.adapter), weights.adapter.state_dict())
    codes = task.codes[:2]
    torch.testing.assert_close(weights.adapter.tokens(codes), task.adapter.tokens(codes), rtol=0, atol=0)


def test_codes_are_what_w_plus_encode_computes_and_are_computed_once(stages, tmp_path):
    first, _ = stages
    task = first["task"]
    photos = task.photos[:3]
    encoder = tiny.TinyWPlusEncoder()
    expected = torch.stack([encoder(e4e_arch.align_for_e4e(data.load_rgb_tensor(p.path), p.landmarks)[None])[0] for p in photos])
    torch.testing.assert_close(task.codes[:3], expected, rtol=1e-6, atol=1e-6)

    calls, lines = [], []

    def counting():
        calls.append(1)
        return tiny.TinyWPlusEncoder()

    copies = []
    for photo in photos:
        copy = tmp_path / os.path.basename(os.path.dirname(photo.path)) / os.path.basename(photo.path)
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(photo.path, copy)
        copies.append(data.FaceImage(str(copy), photo.caption, photo.box, photo.landmarks, photo.embedding))
    cache = str(tmp_path / "codes.safetensors")
    made = cached_codes(copies, cache, "tiny-e4e", counting, torch.device("cpu"), log=lines.append)
    assert len(calls) == 1
    torch.testing.assert_close(made, task.codes[:3], rtol=1e-6, atol=1e-6)  # batched otherwise: rounding only
    assert torch.equal(cached_codes(copies, cache, "tiny-e4e", counting, "cpu", log=lines.append), made)
    assert len(calls) == 1  # everything cached: the encoder was not even built
    os.utime(copies[1].path, ns=(1, 1))  # a changed file is encoded again, alone
    cached_codes(copies, cache, "tiny-e4e", counting, "cpu", log=lines.append)
    assert len(calls) == 2 and lines[-1].startswith("W+ codes: encoding 1 face(s)")
    cached_codes(copies, cache, "another-e4e", counting, "cpu", log=lines.append)
    assert len(calls) == 3 and "another encoder's codes" in lines[-2] and "encoding 3 face(s)" in lines[-1]
    with open(cache, "r+b") as f:  # a damaged cache file is rebuilt, never trusted
        f.truncate(100)
    assert torch.equal(cached_codes(copies, cache, "tiny-e4e", counting, "cpu", log=lines.append), made)
    assert "corrupt W+ code cache" in lines[-2] and len(calls) == 4


def test_stage_two_loss_is_the_official_weighted_sum(stages):
    _, second = stages
    task = second["task"]
    loss, logs = task.loss(task.trainable, 7)
    expected = logs["reconstruction"] + 2.0 * logs["disentangle"] + 1.0 * logs["preserve"]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(logs["disentangle"]) > 0 and float(logs["preserve"]) > 0
    again, _ = task.loss(task.trainable, 7)  # every draw comes from (seed, step): a resumed run repeats it
    assert torch.equal(loss.detach(), again.detach())
    official = task.config
    try:
        task.config = dataclasses.replace(official, preserve_outside_face_only=True)
        _, masked = task.loss(task.trainable, 7)
        assert torch.equal(masked["disentangle"], logs["disentangle"])
        assert float(masked["preserve"]) != pytest.approx(float(logs["preserve"]), rel=1e-3)  # outside pixels only
        task.config = dataclasses.replace(official, disentangle_weight=0.0, preserve_weight=0.0)
        only, plain = task.loss(task.trainable, 7)  # terms weighted 0 are not computed at all
        assert set(plain) == {"loss", "reconstruction"} and torch.equal(only.detach(), logs["reconstruction"])
    finally:
        task.config = official


def test_face_masks_come_from_mask_files_or_the_landmarks(stages, tmp_path):
    _, second = stages
    task = second["task"]
    photo = task.photos[0]
    copy = tmp_path / "photo.png"
    shutil.copy(photo.path, copy)
    image = data.FaceImage(str(copy), photo.caption, photo.box, photo.landmarks, photo.embedding)
    from_landmarks = task.face_mask(image)
    size = task.config.resolution
    assert from_landmarks.shape == (size, size) and 0 <= float(from_landmarks.min()) and float(from_landmarks.max()) <= 1
    centre = data.load_square(image, size)[1].mean(dim=0).round().long()
    assert from_landmarks[centre[1], centre[0]] == 1 and from_landmarks[0, 0] == 0 and from_landmarks[-1, -1] == 0

    from PIL import Image

    left_half = torch.zeros(64, 64, dtype=torch.uint8)
    left_half[:, :32] = 255
    Image.fromarray(left_half.numpy()).save(tmp_path / "photo_mask.png")
    from_file = task.face_mask(image)
    assert from_file[32, 4] == 1 and from_file[32, 60] == 0  # white = face, then eroded and blurred
    assert from_file[32, 31] == 0  # the erosion (4 px at this size) pulls the face's edge inwards

    lines = []
    task.log = lines.append
    (tmp_path / "other.png").write_bytes(copy.read_bytes())
    (tmp_path / "other_mask.png").write_bytes(b"not an image")
    other = data.FaceImage(str(tmp_path / "other.png"), photo.caption, photo.box, photo.landmarks, photo.embedding)
    assert torch.equal(task.face_mask(other), from_landmarks) and torch.equal(task.face_mask(other), from_landmarks)
    assert len(lines) == 1 and "unreadable mask" in lines[0]  # said once


def test_resume_continues_exactly(stages, tmp_path):
    first, _ = stages
    assets = first["task"].config.output_dir + "/tiny_assets"
    runs = {}
    for name, legs in (("straight", [["--max_steps", "4"]]),
                       ("resumed", [["--max_steps", "2"], ["--max_steps", "4", "--resume", "latest"]])):
        shutil.copytree(assets, tmp_path / name / "tiny_assets")
        for leg in legs:
            config = tiny_config(tmp_path / name, "--checkpoint_every", "2", "--cache_dir",
                                 first["task"].cache_dir, *leg)
            runs[name] = loop.run(wt.WPlusTask(config, log=lambda *a: None), config)
    straight, resumed = (wp.load_wplus_file(runs[k]).adapter.state_dict() for k in ("straight", "resumed"))
    assert not changed(straight, resumed)


def test_direction_augmentation_and_validation_edits_from_the_command_line(stages, tmp_path):
    """The CLI: stage II with direction-augmented codes, bf16, gradient checkpointing and EMA, validation images per
    prompt x face x edit, no warning, the summary."""
    first, _ = stages
    direction = tmp_path / "smile.pt"
    torch.save(torch.nn.functional.normalize(torch.randn(1, 512), dim=-1), direction)
    out = tmp_path / "run"
    shutil.copytree(first["task"].config.output_dir + "/tiny_assets", out / "tiny_assets")
    env = dict(os.environ, PYTHONWARNINGS="default")
    result = subprocess.run([sys.executable, os.path.join(REPO, "training", "train_wplus.py"), "--preset", "tiny",
                             "--stage", "2", "--adapter_init", first["path"], "--output_dir", str(out),
                             "--cache_dir", first["task"].cache_dir, "--max_steps", "2", "--checkpoint_every", "2",
                             "--validation_every", "2", "--augment", "direction", "--augment_directions",
                             str(direction), "--validation_directions", str(direction), "--report_to", "none",
                             "--mixed_precision", "bf16", "--gradient_checkpointing", "true", "--use_ema", "true"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (result.stdout + result.stderr).replace(str(tmp_path), "<tmp>")
    alarming = [line for line in text.splitlines() if re.search(r"warn|deprecat|traceback|error", line, re.I)]
    assert not alarming, alarming
    summary = result.stdout[result.stdout.index("done: steps 0 to 2"):].splitlines()
    assert "W+ adapter (stage II) for the tiny test UNet only" in summary[2]
    assert re.fullmatch(r"  held-out    denoising loss with the photo's own W\+ \d\.\d{4} vs another person's "
                        r"\d\.\d{4} \(-?\d+\.\d % lower\); outside the face that swap moves the prediction by "
                        r"\d\.\d{5} \(mean square\); before training: .*", summary[3]), summary[3]
    # one prompt x two held-out faces x (no edit, the direction at -s and +s)
    assert summary[4] == f"  validation  {out / 'validation'}{os.sep} (6 images)"
    assert summary[-1] == f"  in ComfyUI  cp {out / 'wplus_adapter.safetensors'} ComfyUI/models/wplus/"


@pytest.mark.parametrize("args, message", [
    (["--stage", "2"], "--stage 2 needs --adapter_init"),
    (["--stage", "3"], "--stage must be 1"),
    (["--augment", "direction"], "--augment direction needs --augment_directions"),
    (["--augment", "rotate"], "--augment must name one or more of"),
    (["--wplus_dropout", "0.5", "--text_dropout", "0.5"], "with a sum below 1"),
    (["--mask_erode", "-1"], "--mask_erode must be 0 or more"),
    (["--augment_directions", "missing.pt"], "is not a file"),
])
def test_bad_options_are_refused_before_anything_loads(tmp_path, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(tmp_path, *args)


def test_stage_two_may_not_write_over_its_own_starting_point(tmp_path):
    init = tmp_path / "wplus_adapter.safetensors"
    init.write_bytes(b"")
    with pytest.raises(ConfigError, match="the export this run would write over"):
        tiny_config(tmp_path, "--stage", "2", "--adapter_init", str(init))


def test_real_runs_need_their_inputs(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_args(WPlusTrainConfig, ["--output_dir", str(tmp_path)])
    for name in ("base_model", "e4e", "insightface_pack", "dataset"):
        assert f"--{name} is required" in str(caught.value)


def test_an_adapter_for_another_unet_is_refused(tmp_path):
    unet = tiny.tiny_unet()
    other = wp.WPlusAdapter(wp.WPlusAdapterConfig("sd15", {"input_1_0": BlockSpec(320, 8, 768)}))
    path = tmp_path / "other.safetensors"
    wp.save_wplus_adapter(wp.WPlusAdapterWeights(other), str(path))
    config = WPlusTrainConfig(preset="tiny", adapter_init=str(path))
    with pytest.raises(ConfigError, match="use an adapter trained on this base"):
        wt.initial_adapter(config, unet, "sd15")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_share_one_code_cache(tmp_path):
    """torchrun, CPU, gloo DDP: the main process encodes the faces and writes the cache, the other reads it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "training", "train_wplus.py"), "--preset", "tiny", "--output_dir", str(out),
           "--max_steps", "2", "--checkpoint_every", "2", "--tiny_base_steps", "20", *QUIET]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert output.count("W+ codes: encoding 22 face(s)") == 1, output[-3000:]
    assert "global batch 8 = batch 4 x 2 process(es)" in output
    assert wp.load_wplus_file(str(out / "wplus_adapter.safetensors")).config.family == "sd15"
