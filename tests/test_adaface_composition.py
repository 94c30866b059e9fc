"""training/train_adaface.py --stage composition (the paper's stage 2, composition distillation) on the tiny preset:
it runs and changes only the inverter, the captured cross-attention features are the UNet's own, the subject's
attention mass and the face masks land where they should, the delta loss goes down, bad options are refused."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from comfyui_idadapter.nodes.arch import adaface as ada  # noqa: E402
from comfyui_idadapter.nodes.errors import ConfigError  # noqa: E402
from comfyui_idadapter.training import adaface_task, loop  # noqa: E402
from comfyui_idadapter.training import data as dataset  # noqa: E402
from comfyui_idadapter.training import tiny  # noqa: E402
from comfyui_idadapter.training.adaface_compos import (  # noqa: E402
    capturing_cross_attention,
    cross_attention_layers,
    end_token_index,
    replaced_positions,
    subject_token_mass,
)
from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig  # noqa: E402
from comfyui_idadapter.training.adaface_expansion import expand_kv  # noqa: E402
from comfyui_idadapter.training.adaface_models import DEFAULT_LAYER_WEIGHTS  # noqa: E402
from comfyui_idadapter.training.adaface_task import AdaFaceTask  # noqa: E402
from comfyui_idadapter.training.cli import parse_args  # noqa: E402

QUIET = ["--report_to", "none", "--validation_every", "0"]
MASKED = ("id000", "img00")  # the synthetic photo given a face-mask file


def compos_config(out, *args):
    return parse_args(AdaFaceTrainConfig, ["--preset", "tiny", "--stage", "composition", "--output_dir", str(out),
                                           *QUIET, *args])


def with_assets(assets, out):
    """``out`` holding a copy of the module's tiny assets (models' pack, synthetic dataset with one mask file)."""
    os.makedirs(out, exist_ok=True)
    shutil.copytree(assets, os.path.join(out, "tiny_assets"))
    return out


def make_task(config):
    task = AdaFaceTask(config, log=lambda *args: None)
    task.setup(loop.make_accelerator(config))
    return task


def frozen_state(task):
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in (("text_encoder", task.m.text_encoder), ("unet", task.m.unet),
                                 ("teacher_unet", task.m.teacher_unet), ("arc2face", task.m.arc2face),
                                 ("vae", task.m.vae))}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny preset's assets, built once, with a face mask (white = face) beside one synthetic photo."""
    from PIL import Image

    out = tmp_path_factory.mktemp("compos_assets")
    make_task(compos_config(out))  # builds <out>/tiny_assets
    folder = out / "tiny_assets" / "dataset" / MASKED[0]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / f"{MASKED[1]}_mask.png")
    shutil.rmtree(out / "cache")  # scanned again with the mask there
    return out / "tiny_assets"


@pytest.fixture(scope="module")
def task(assets, tmp_path_factory):
    return make_task(compos_config(with_assets(assets, tmp_path_factory.mktemp("compos_task"))))


# --- end to end


def test_a_tiny_composition_run_trains_only_the_inverter_and_restores_the_unet(assets, tmp_path):
    # it starts, as a stage-2 run does, from an expanded face-stage export given as --inverter_init
    inverter = tiny.tiny_clip_l(layers=2, seed=2)
    expand_kv(inverter, {0: 2, 1: 2}, 0.1, torch.Generator().manual_seed(0))
    init = str(tmp_path / "init.safetensors")
    ada.save_adaface(ada.AdaFaceWeights(ada.AdaFaceConfig(inverter.config, None), inverter,
                                        torch.tensor(DEFAULT_LAYER_WEIGHTS)), init)

    config = compos_config(with_assets(assets, tmp_path / "run"), "--max_steps", "3", "--inverter_init", init,
                           "--expand_on_plateau", "false")
    task = AdaFaceTask(config, log=lambda *args: None)
    assert len(task.photos) == 18  # the mask file is not a photo
    assert task.trainable.inverter.config.kv_multipliers == [2, 2]
    originals = task.m.unet.attn_processors
    frozen = frozen_state(task)
    start_weights = copy.deepcopy(task.trainable.state_dict())
    logged = []
    loss = task.loss

    def recording(model, step):
        value, logs = loss(model, step)
        logged.append({k: float(v) for k, v in logs.items()})
        return value, logs

    task.loss = recording
    loop.run(task, config)

    assert len(logged) == 3
    distill, composition = [logged[0], logged[2]], logged[1]  # every 2nd step keeps the identity (--face_distill_every)
    for logs in distill:
        assert set(logs) == {"loss", "face_distill_loss"}
        assert logs["loss"] == pytest.approx(8.0 * logs["face_distill_loss"], rel=1e-5)  # --face_distill_weight
    assert set(composition) == {"loss", "delta_loss", "face_preserving_loss", "delta_attn_out", "delta_attn_map",
                                "delta_prompt_embeds"}
    for logs in logged:
        assert all(np.isfinite(v) for v in logs.values()), logs
    assert composition["loss"] == pytest.approx(composition["delta_loss"] + composition["face_preserving_loss"],
                                                rel=1e-5)
    assert 0 < composition["delta_loss"] <= 6 and 0 <= composition["face_preserving_loss"] <= 2
    assert task.m.unet.attn_processors == originals  # the very same processor objects
    for name, state in frozen_state(task).items():
        for key, value in state.items():
            assert torch.equal(value, frozen[name][key]), (name, key)
    moved = [k for k, v in task.trainable.state_dict().items() if not torch.equal(v, start_weights[k])]
    assert moved and all(not k.startswith("inverter.text_model.embeddings.") for k in moved)
    exported = ada.load_adaface(os.path.join(config.output_dir, config.export_name))
    assert exported.config.inverter.kv_multipliers == [2, 2]


def test_the_processors_are_restored_when_a_step_raises(task, monkeypatch):
    originals = task.m.unet.attn_processors

    def failing(*args, **kwargs):
        raise RuntimeError("a loss part failed")

    monkeypatch.setattr(adaface_task, "face_preserving_loss", failing)
    with pytest.raises(RuntimeError, match="a loss part failed"):
        task.loss(task.trainable, 1)  # step 1: a composition step (0 is an identity-keeping distillation step)
    assert task.m.unet.attn_processors == originals


# --- the captured features


def test_capture_leaves_the_unet_output_unchanged_and_records_probabilities(task):
    unet = task.m.unet
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        plain = unet(latents, t, encoder_hidden_states=text).sample
        with capturing_cross_attention(unet) as captured:
            captured_out = unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(captured_out, plain, atol=1e-5, rtol=0)
    layers = cross_attention_layers(unet)
    assert set(captured) == set(layers) and len(layers) == 7  # 2 down, 1 middle, 4 up in the tiny UNet
    for name, layer in captured.items():
        heads = layers[name].heads
        batch, tokens, width = layer.output.shape
        assert layer.probs.shape == (batch, heads, tokens, 77) and layer.query.shape[:2] == (batch, tokens)
        torch.testing.assert_close(layer.probs.sum(-1), torch.ones(batch, heads, tokens), atol=1e-5, rtol=0)
        assert tokens in (16 * 16, 8 * 8)


def test_subject_mass_sums_the_placeholder_positions_and_the_class_words():
    placeholder, start, end = 7, 1, 2
    # a subject prompt: the placeholder written 3 times (for 3 vectors), its class twin with a 2-token word
    subject = torch.tensor([[start, 4, 7, 7, 7, 5, end, end], [start, 7, 7, 7, 4, 4, 5, end]])
    marked = torch.tensor([[start, 4, 7, 5, end, end, end, end], [start, 7, 4, 4, 5, end, end, end]])
    word = [8, 9]
    klass = torch.tensor([[start, 4, 8, 9, 5, end, end, end], [start, 8, 9, 4, 4, 5, end, end]])
    class_positions = replaced_positions(marked, placeholder, klass, word)
    assert class_positions.nonzero().tolist() == [[0, 2], [0, 3], [1, 1], [1, 2]]
    # two uses of the placeholder: the second shifts by the word's extra token
    twice = replaced_positions(torch.tensor([[start, 7, 4, 7, end, end, end, end]]), placeholder,
                               torch.tensor([[start, 8, 9, 4, 8, 9, end, end]]), word)
    assert twice.nonzero()[:, 1].tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="not at"):
        replaced_positions(marked, placeholder, subject, word)

    probs = torch.softmax(torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    mass = subject_token_mass(probs, subject == placeholder)
    torch.testing.assert_close(mass[0], probs[0, :, :, 2:5].sum(-1))
    torch.testing.assert_close(mass[1], probs[1, :, :, 1:4].sum(-1))
    mass = subject_token_mass(probs, class_positions)
    torch.testing.assert_close(mass[0], probs[0, :, :, 2:4].sum(-1))
    torch.testing.assert_close(mass[1], probs[1, :, :, 1:3].sum(-1))
    assert end_token_index(subject, end).tolist() == [6, 7]


def test_the_tasks_prompts_mark_the_subject_and_the_class_word(task):
    tokenizer, prompts = task.m.tokenizer, task.compos
    suffixes = task.config.composition_prompts
    assert prompts.subject_ids.shape == prompts.class_ids.shape == (1 + len(suffixes), 77)
    assert (prompts.subject_positions.sum(1) == ada.NUM_ID_VECS).all()
    assert (prompts.subject_ids[prompts.subject_positions] == task.placeholder_id).all()
    person = tokenizer("person", add_special_tokens=False).input_ids
    assert (prompts.class_ids[prompts.class_positions] == person[0]).all()
    assert (prompts.class_positions.sum(1) == 1).all()
    texts = tokenizer.batch_decode(prompts.class_ids, skip_special_tokens=True)
    assert texts[0] == "a photo of person"
    assert texts[3].replace(" ,", ",") == f"a photo of person, {suffixes[2]}"  # CLIP decodes "," as a word


# --- face masks


def test_masks_from_a_file_and_from_a_box_land_in_the_square_crop(tmp_path):
    from PIL import Image

    # a 80 x 40 photo; its centre square is x 20..60; the face is x 30..50, y 10..30 -> 10..30 in the square,
    # 5..15 at size 20
    Image.fromarray(np.full((40, 80, 3), 128, np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((40, 80), np.uint8)
    mask[10:30, 30:50] = 255
    Image.fromarray(mask).save(tmp_path / "p_mask.png")
    image = dataset.FaceImage(str(tmp_path / "p.png"), "", torch.tensor([30.0, 10.0, 50.0, 30.0]), torch.zeros(5, 2),
                              torch.zeros(512))
    expected = torch.zeros(20, 20)
    expected[5:15, 5:15] = 1

    from_file, source = dataset.load_square_mask(image, 20, "_mask.png")
    assert source == "file" and from_file.shape == (20, 20)
    outside = torch.ones(20, 20, dtype=torch.bool)
    outside[4:16, 4:16] = False  # a pixel's width of resampling blur at the edges
    assert from_file[6:14, 6:14].min() > 0.99 and from_file[outside].max() < 0.01
    assert abs(from_file.sum().item() - 100) < 2  # the face's area, 10 x 10

    from_box, source = dataset.load_square_mask(image, 20, "_none.png")
    assert source == "box"
    assert torch.equal(from_box, expected)

    # a mask made at another resolution (a segmenter's) is first fitted to the photo
    Image.fromarray(np.kron(mask, np.ones((2, 2), np.uint8))).save(tmp_path / "p_big.png")
    from_big, _ = dataset.load_square_mask(image, 20, "_big.png")
    assert from_big[6:14, 6:14].min() > 0.99 and from_big[outside].max() < 0.01
    assert abs(from_big.sum().item() - 100) < 2

    # a box reaching out of the square is cut at its edge; a fractional one covers partial pixels
    cut = dataset.box_mask(torch.tensor([0.0, 0.0, 30.0, 40.0]), 0.5, 20, 0, 20)
    assert torch.equal(cut[:, :5], torch.ones(20, 5)) and cut[:, 5:].sum() == 0
    half = dataset.box_mask(torch.tensor([21.0, 0.0, 23.0, 40.0]), 0.5, 20, 0, 20)
    assert half[0, :2].tolist() == [0.5, 0.5] and half[:, 2:].sum() == 0

    # an unreadable mask file falls back to the box and says so
    (tmp_path / "p_bad.png").write_bytes(b"not a png")
    fallback, source = dataset.load_square_mask(image, 20, "_bad.png")
    assert torch.equal(fallback, expected) and source.startswith("box: unreadable mask")


def test_a_mask_file_is_not_a_photo_and_is_used(task):
    masked = [p for p in task.photos if p.path.endswith(os.path.join(*MASKED) + ".png")]
    assert len(masked) == 1 and not any(p.path.endswith("_mask.png") for p in task.photos)
    mask, source = dataset.load_square_mask(masked[0], task.config.resolution, task.config.mask_suffix)
    assert source == "file" and mask[9:23, 9:23].min() > 0.99 and mask[:6].max() < 0.01


# --- it learns


def test_the_delta_loss_has_a_gradient_and_falls_on_a_fixed_batch(assets, tmp_path):
    config = compos_config(with_assets(assets, tmp_path), "--face_preserving_weight", "0")
    task = make_task(config)
    batch = task.composition_batch(0)
    params = [p for p in task.trainable.parameters() if p.requires_grad]
    loss, logs = task.composition_loss_on(task.trainable, batch)
    assert loss.item() == pytest.approx(logs["delta_loss"].item())
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.norm() ** 2 for g in grads).sqrt() > 1e-4

    first = loss.item()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    for _ in range(5):
        loss, _ = task.composition_loss_on(task.trainable, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = task.composition_loss_on(task.trainable, batch)[0].item()
    assert after < 0.8 * first, (first, after)


# --- options


def test_the_tiny_composition_preset_is_shorter_and_the_command_line_wins(tmp_path):
    assert compos_config(tmp_path).max_steps == 30
    assert compos_config(tmp_path, "--max_steps", "7").max_steps == 7
    face = parse_args(AdaFaceTrainConfig, ["--preset", "tiny", "--output_dir", str(tmp_path)])
    assert face.stage == "face" and face.max_steps == 60


@pytest.mark.parametrize("args, message", [
    (["--stage", "both"], "--stage must be face or composition, got 'both'"),
    (["--composition_prompts", " "], "--composition_prompts must be one or more non-empty suffixes"),
    (["--composition_prompts", "in a garden", "z in the rain"], "--composition_prompts must not contain the "
                                                                  "placeholder 'z'"),
    (["--class_word", "per5on"], "--class_word must be a word of letters"),
    (["--class_word", "Z"], "--class_word must differ from --placeholder"),
    (["--delta_loss_weight", "-1"], "--delta_loss_weight must be 0 or more"),
    (["--delta_loss_weight", "0", "--face_preserving_weight", "0"], "would train on nothing"),
    (["--composition_timestep_max", "0"], "--composition_timestep_max must be in (0, 1]"),
    (["--composition_timestep_max", "1.5"], "--composition_timestep_max must be in (0, 1]"),
    (["--mask_suffix", "_mask.txt"], "--mask_suffix must end a file name with an image extension"),
    (["--mask_suffix", "masks/x.png"], "--mask_suffix must end a file name with an image extension"),
    (["--gradient_checkpointing", "true"], "--gradient_checkpointing is not available with --stage composition"),
    (["--distill_prompt", "a photo of someone"], "--distill_prompt must contain the placeholder 'z'"),
    (["--face_distill_every", "-1"], "--face_distill_every and --face_distill_weight must be 0 or more"),
])
def test_bad_composition_options_are_refused(tmp_path, args, message):
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=escaped):
        compos_config(tmp_path, *args)


def test_a_composition_prompt_too_long_for_the_text_encoder_is_refused(assets, tmp_path):
    config = compos_config(with_assets(assets, tmp_path), "--composition_prompts", "in a garden " * 20)
    with pytest.raises(ConfigError, match="over the text encoder's 77"):
        AdaFaceTask(config, log=lambda *args: None)
