"""training/train_adaface.py on the tiny preset: it learns, expands, resumes exactly, and exports what Load AdaFace
reads."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from comfyui_idadapter.nodes.arch import adaface as ada  # noqa: E402
from comfyui_idadapter.nodes.errors import ConfigError  # noqa: E402
from comfyui_idadapter.training import loop  # noqa: E402
from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig  # noqa: E402
from comfyui_idadapter.training.adaface_task import AdaFaceTask  # noqa: E402
from comfyui_idadapter.training.cli import parse_args  # noqa: E402

QUIET = ["--report_to", "none", "--validation_every", "0"]


def tiny_config(out, *args):
    return parse_args(AdaFaceTrainConfig, ["--preset", "tiny", "--output_dir", str(out), *QUIET, *args])


def frozen_state(task):
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in (("text_encoder", task.m.text_encoder), ("unet", task.m.unet),
                                 ("teacher_unet", task.m.teacher_unet), ("arc2face", task.m.arc2face))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaface_run")
    config = tiny_config(out)
    accelerator = loop.make_accelerator(config)
    task = AdaFaceTask(config, log=lambda *args: None)
    task.setup(accelerator)
    before = task.heldout_check()
    untrained_tokens = task.trainable(torch.randn(1, 16, 768)).detach()
    frozen = frozen_state(task)
    path = loop.run(task, config, accelerator)
    return {"task": task, "path": path, "before": before, "after": task.heldout_check(), "frozen": frozen,
            "out": out, "untrained_tokens": untrained_tokens}


def test_distillation_learns_on_held_out_faces(trained):
    (before, plain), (after, plain_after) = trained["before"], trained["after"]
    assert plain == plain_after  # the baseline involves no trained weight
    assert after < 0.5 * before, (before, after)  # the student's predictions came much closer to the teacher's
    assert after < 0.5 * plain, (after, plain)  # and closer than a prompt without the identity gets


def test_only_the_inverter_changes(trained):
    task = trained["task"]
    for name, state in frozen_state(task).items():
        for key, value in state.items():
            assert torch.equal(value, trained["frozen"][name][key]), (name, key)
    # the inverter's CLIP embeddings stay too; its layers moved
    start = task.m.inverter.state_dict()
    now = task.trainable.inverter.state_dict()
    assert torch.equal(now["text_model.embeddings.token_embedding.weight"],
                       start["text_model.embeddings.token_embedding.weight"])
    assert not torch.equal(now["text_model.encoder.layers.1.mlp.fc1.weight"],
                           start["text_model.encoder.layers.1.mlp.fc1.weight"])


def test_the_inverter_was_expanded_at_the_given_step(trained):
    task = trained["task"]
    assert task.trainable.inverter.config.kv_multipliers == [2, 2]  # the tiny preset's "2:0-1" at step 30
    assert task.expansion_state[3].item() == 1
    layer = task.trainable.inverter.text_model.encoder.layers[0].self_attn
    assert layer.k_proj.weight.shape == (2 * 768, 768)


def test_export_loads_and_gives_the_trainers_tokens(trained):
    task = trained["task"]
    weights = ada.load_adaface(trained["path"])
    assert weights.config.inverter.kv_multipliers == [2, 2] and weights.arc2face is not None
    encoder = ada.AdaFaceEncoder(weights, weights.arc2face)
    faces = F.normalize(torch.randn(3, ada.ARCFACE_DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        context = ada.arc2face_context(task.m.arc2face, faces)
        ours = task.trainable(context[:, ada.ID_START:ada.ID_START + ada.NUM_ID_VECS])
        for face, tokens in zip(faces, ours):
            torch.testing.assert_close(encoder(face[None]), tokens, atol=1e-5, rtol=0)
    # the padding embeddings for strength < 1: CLIP's empty prompt, positions included
    embeddings = task.m.inverter.text_model.embeddings
    assert torch.equal(weights.pad_embeddings[0], embeddings.token_embedding.weight[ada.START_TOKEN]
                       + embeddings.position_embedding.weight[0])


def test_resume_after_the_expansion_continues_exactly(trained, tmp_path):
    # 40 steps (the expansion at 30, checkpoints at 20 and 40), then resumed to 60: the uninterrupted run's weights
    first = tiny_config(tmp_path, "--max_steps", "40")
    loop.run(AdaFaceTask(first, log=lambda *args: None), first)
    resumed = tiny_config(tmp_path, "--resume", "latest")
    path = loop.run(AdaFaceTask(resumed, log=lambda *args: None), resumed)
    ours, theirs = ada.load_adaface(path), ada.load_adaface(trained["path"])
    assert ours.config.inverter.kv_multipliers == [2, 2]
    for (name, a), b in zip(ours.inverter.state_dict().items(), theirs.inverter.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_prodigy_runs_when_installed(tmp_path):
    pytest.importorskip("prodigyopt")
    config = tiny_config(tmp_path, "--optimizer", "prodigy", "--max_steps", "2", "--expand_at_steps", "1")
    task = AdaFaceTask(config, log=lambda *args: None)
    loop.run(task, config)
    assert task.trainable.inverter.config.kv_multipliers == [2, 2]  # Prodigy's state grew with the expansion


@pytest.mark.parametrize("args, message", [
    (["--expand_factors", "4:0-x"], "is not 'factor:layers'"),
    (["--expand_factors", "1:0"], "the factor must be 2 or more"),
    (["--expand_at_steps", "5", "3"], "--expand_at_steps must be increasing"),
    (["--expand_at_steps", "5", "6", "7"], "names 3 expansions, --expand_factors describes 1"),
    (["--placeholder", "z1"], "--placeholder: the placeholder 'z1' must be one word of letters"),
    (["--optimizer", "sgd"], "--optimizer must be auto, prodigy or adamw"),
    (["--distill_start", "0"], "--distill_start must be in (0, 1]"),
    (["--random_face_ratio", "1.5"], "--random_face_ratio must be in [0, 1]"),
])
def test_bad_options_are_refused_before_anything_loads(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_config(tmp_path, *args)


def test_real_runs_need_their_inputs(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_args(AdaFaceTrainConfig, ["--output_dir", str(tmp_path)])
    for name in ("base_model", "arc2face", "insightface_pack", "dataset"):
        assert f"--{name} is required (or use --preset tiny)" in str(err.value)


def test_placed_tokens_put_the_kth_vector_at_the_kth_placeholder():
    from comfyui_idadapter.training.prompts import placed_tokens

    class Encoder(torch.nn.Module):  # the part of a text encoder the hook sees: its input embedding
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            return self.embed(ids)

    encoder = Encoder()
    ids = torch.tensor([[1, 7, 7, 2, 7, 7], [7, 7, 3, 3, 7, 7]])  # 7: the placeholder, written K = 2 times per use
    vectors = torch.arange(16.0).reshape(2, 2, 4)
    with placed_tokens(encoder, ids, 7, vectors):
        out = encoder(ids)
    for row, columns in ((0, [1, 2, 4, 5]), (1, [0, 1, 4, 5])):
        for k, column in enumerate(columns):
            assert torch.equal(out[row, column], vectors[row, k % 2])
    assert torch.equal(out[0, 0], encoder.embed.weight[1]) and torch.equal(out[1, 2], encoder.embed.weight[3])
    assert torch.equal(encoder(ids)[0, 1], encoder.embed.weight[7])  # the hook is gone afterwards


def test_ema_follows_the_expansion(tmp_path):
    config = tiny_config(tmp_path, "--use_ema", "true", "--max_steps", "3", "--expand_at_steps", "2")
    task = AdaFaceTask(config, log=lambda *args: None)
    path = loop.run(task, config)  # the export is the EMA weights, at the grown shapes
    weights = ada.load_adaface(path)
    assert weights.config.inverter.kv_multipliers == [2, 2]
    k = weights.inverter.text_model.encoder.layers[0].self_attn.k_proj.weight
    assert k.shape == (2 * 768, 768) and torch.isfinite(k).all()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process, whose mixed precision the first Accelerator fixes: a test that needs
    another starts from none and leaves none (as accelerate's own test case does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_still_applies_after_the_expansion(tmp_path, fresh_accelerate_state):
    # the loop wraps the grown inverter anew (for DDP): its forward keeps accelerate's autocast
    config = tiny_config(tmp_path, "--mixed_precision", "bf16", "--max_steps", "2", "--expand_at_steps", "1")
    task = AdaFaceTask(config, log=lambda *args: None)
    calls = []  # (K/V multipliers, autocast on) at each call of the inverter
    task.trainable.inverter.register_forward_pre_hook(lambda module, args: calls.append(
        (list(module.config.kv_multipliers), torch.is_autocast_enabled(task.device.type))))
    loop.run(task, config)
    assert ([1, 1], True) in calls and ([2, 2], True) in calls
    assert all(on for _, on in calls), calls


def test_an_arc2face_folder_of_another_layout_is_named_before_anything_loads(tmp_path):
    folders = {name: tmp_path / name for name in ("arc2face", "pack", "faces")}
    for folder in folders.values():
        folder.mkdir()
    (folders["arc2face"] / "unet").mkdir()  # not Arc2Face's layout (arc2face/ + encoder/)
    folders["base"] = tmp_path / "sd15.safetensors"  # a single-file base: never read, the check comes first
    folders["base"].write_bytes(b"")
    config = parse_args(AdaFaceTrainConfig, [
        "--base_model", str(folders["base"]), "--arc2face", str(folders["arc2face"]), "--insightface_pack",
        str(folders["pack"]), "--dataset", str(folders["faces"]), "--output_dir", str(tmp_path / "out"), *QUIET])
    with pytest.raises(ConfigError, match="has no arc2face/config.json: expected the folder of FoivosPar/Arc2Face"):
        AdaFaceTask(config, log=lambda *args: None)
