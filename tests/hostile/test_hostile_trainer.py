"""Hostile and careless inputs to training/train_idadapter.py (issue 10, items 5, 7, 8, 12 and left-over temporary
files; issue 25, items 7 and 8) and, where the trainers share the code, to train_wplus.py and train_adaface.py:
every row is (options or setup, expected error class or outcome, message fragment).

- options: every option of IDAdapterTrainConfig is checked up front, all problems in one message, no model loaded;
- model folders: --base_model and --clip_vision of the wrong kind or incomplete are named up front, saying what the
  folder must hold (every trainer for --base_model);
- --help states each option's default once; each trainer logs under logs/<its name>/;
- a checkpoint of another trainer given to --resume is refused naming that trainer, for every pair;
- output folder: one run per folder (a second is refused, naming the first's pid), an unwritable folder is a clear
  error before anything heavy, and at a checkpoint too; interrupted runs' temporary files are removed;
- resume: a corrupt newest checkpoint falls back to the previous one, `--resume latest` with nothing to resume says
  so, changed options are listed (and a new learning rate really applies), a changed adapter shape is refused.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from comfyui_idadapter.nodes.errors import ConfigError, PackError
from comfyui_idadapter.training import checkpoint as ckpt
from comfyui_idadapter.training import loop, outdir, tiny
from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig
from comfyui_idadapter.training.cli import parse_args
from comfyui_idadapter.training.idadapter_config import IDAdapterEvalConfig, IDAdapterTrainConfig
from comfyui_idadapter.training.options import LR_SCHEDULERS
from comfyui_idadapter.training.wplus_config import WPlusTrainConfig

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--validation_every", "0"]


# ---- options: (arguments, message fragment); all are ConfigError from parse_args, before any model loads

OPTION_ROWS = [
    (["--mff_heads", "0"], "--mff_heads must be at least 1, got 0"),
    (["--checkpoint_every", "0"], "--checkpoint_every must be at least 1, got 0"),
    (["--log_every", "0"], "--log_every must be at least 1, got 0"),
    (["--kv_learning_rate", "-5"], "--kv_learning_rate must be 0 (= --learning_rate) or more, got -5.0"),
    (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be 0 (keep all) or more, got -1"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--ema_decay", "1"], "--ema_decay must be in (0, 1)"),
    (["--ema_decay", "0"], "--ema_decay must be in (0, 1)"),
    (["--lr_scheduler", "cosinus"], "--lr_scheduler must be one of constant, constant_with_warmup"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_scheduler must be one of"),
    (["--validation_steps", "0"], "--validation_steps must be at least 1"),
    (["--validation_every", "-1"], "--validation_every must be 0 (off) or more"),
    (["--validation_every", "5", "--validation_prompts", " "], "--validation_prompts must be one or more non-empty"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be 0 or more"),
    (["--adam_weight_decay", "-0.1"], "--adam_weight_decay must be 0 or more"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be 0 (no clipping) or more"),
    (["--id_loss_weight", "-1"], "--id_loss_weight must be 0 (off) or more"),
    (["--id_gate_ratio", "-0.5"], "--id_gate_ratio must be 0 (gate always on) or more"),
    (["--id_gate_ratio", "inf"], "--id_gate_ratio must be a finite number"),
    (["--cache_mb", "-1"], "--cache_mb must be 0 (off) or more"),
    (["--tiny_base_steps", "-1"], "--tiny_base_steps must be 0 or more"),
    (["--text_dropout", "1"], r"--text_dropout must be in [0, 1)"),
    (["--image_dropout", "-0.1"], r"--image_dropout must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--resolution", "100"], "--resolution must be a multiple of 8"),
    (["--num_images", "0"], "--num_images must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_steps", "0"], "--max_steps must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--num_tokens", "0"], "--num_tokens must be at least 1"),
    (["--mff_width", "0"], "--mff_width must be at least 1"),
    (["--mff_width", "30", "--mff_heads", "4"], "--mff_width (30) must be divisible by --mff_heads (4)"),
    (["--mff_width", "16384", "--mff_heads", "16"],
     "--mff_width must be at most 8192 (the largest IDAdapter files the nodes load)"),
    (["--num_tokens", "4096"], "--num_tokens must be at most 1024"),
    (["--embed_dim", "0"], "--embed_dim must be at least 1"),
    (["--textual_hidden", "-3"], "--textual_hidden must be at least 1"),
    (["--synthetic_identities", "1"], "--synthetic_identities must be at least 2"),
    (["--synthetic_images", "0"], "--synthetic_images must be at least 1"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
    (["--report_to", "wandb"], "--report_to must be tensorboard or none"),
    (["--preset", "huge"], "--preset must be 'tiny' or absent"),
    (["--export_name", "../x.safetensors"], "--export_name must be a file name ending in .safetensors"),
    (["--export_name", "x.bin"], "--export_name must be a file name ending in .safetensors"),
    (["--output_dir", ""], "--output_dir must not be empty"),
    (["--identifier", ""], "--identifier"),
    (["--arcface", "/nonexistent/arcface.onnx"], "--arcface '/nonexistent/arcface.onnx' does not exist"),
    (["--base_model", "/nonexistent"], "--base_model '/nonexistent' does not exist"),
    (["--clip_vision", "/nonexistent"], "--clip_vision '/nonexistent' does not exist"),
    (["--insightface_pack", "/nonexistent"], "--insightface_pack '/nonexistent' does not exist"),
    (["--dataset", "/nonexistent"], "--dataset '/nonexistent' does not exist"),
    (["--heldout_dataset", "/nonexistent"], "--heldout_dataset '/nonexistent' does not exist"),
    (["--resume", "/nonexistent"], "--resume '/nonexistent' is not a checkpoint folder"),
    (["--cache_dir", __file__], "--cache_dir " + repr(__file__) + " is a file, not a folder"),
    (["--prefetch_threads", "-1"], "--prefetch_threads must be 0 (decode in the step) or more, got -1"),
    (["--min_images", "-1"], "--min_images must be 0 (= --num_images + 1) or more, got -1"),
    (["--reference_crop", "body"], "--reference_crop must be face or photo, got 'body'"),
    (["--face_crop_margin", "5"], "--face_crop_margin must be from 0 to 4.0, got 5.0"),
    (["--id_gate", "arcface"], "--id_gate must be detector or norm, got 'arcface'"),
    (["--id_gate_iou", "1.5"], "--id_gate_iou must be in [0, 1]"),
    (["--id_decode", "crop"], "--id_decode must be full or window, got 'crop'"),
    (["--compile", "all"], "--compile must be none or one or more of unet, vae_decoder, arcface (each once), got 'all'"),
    (["--compile", "unet", "unet"], "(each once), got 'unet unet'"),
    (["--compile", "none", "unet"], "got 'none unet'"),
    (["--compile", "unet", "--compile_backend", "tensorrt-ish"], "--compile_backend must be one of torch.compile's"),
]
NOT_PRESET = [  # rows that need the real inputs instead of --preset tiny
    (["--dataset", "x"], "--base_model is required (or use --preset tiny)"),
]
BOOL_OPTIONS = {"gradient_checkpointing", "use_ema", "log_examples", "references_include_target", "channels_last"}  # argparse accepts only true/false for these


@pytest.mark.parametrize("args,fragment", OPTION_ROWS, ids=[" ".join(a) for a, _ in OPTION_ROWS])
def test_bad_option_is_a_config_error(args, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(IDAdapterTrainConfig, ["--preset", "tiny", *args])
    assert fragment in str(info.value)


@pytest.mark.parametrize("args,fragment", NOT_PRESET)
def test_missing_input_is_a_config_error(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_args(IDAdapterTrainConfig, args)


def test_every_option_has_a_row():
    covered = {a[2:] for args, _ in OPTION_ROWS + NOT_PRESET for a in args if a.startswith("--")}
    fields = {f.name for f in dataclasses.fields(IDAdapterTrainConfig)}
    assert fields - covered - BOOL_OPTIONS == set()


def test_all_problems_in_one_message_in_well_under_a_second():
    args = ["--preset", "tiny", "--mff_heads", "0", "--checkpoint_every", "0", "--log_every", "0",
            "--kv_learning_rate", "-5", "--checkpoints_total_limit", "-1", "--ema_decay", "2"]
    started = time.thread_time()  # CPU time: other processes' load does not count
    with pytest.raises(ConfigError) as info:
        parse_args(IDAdapterTrainConfig, args)
    assert time.thread_time() - started < 0.5
    assert str(info.value).count("\n  --") == 6


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(tmp_path / "f")])


def test_lr_scheduler_choices_are_diffusers_names():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


# ---- model folders: (name, option, the folder or file given, message fragments); ConfigError from parse_args, from
# the files alone (no model loads)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A complete diffusers Stable Diffusion folder and a CLIP vision folder, as save_pretrained writes them."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("model_folders")
    tokenizer = tiny.tiny_tokenizer(str(root / "tokenizer_files"))
    StableDiffusionPipeline(vae=tiny.tiny_vae(), text_encoder=tiny.tiny_text_encoder(len(tokenizer)),
                            tokenizer=tokenizer, unet=tiny.tiny_unet(), scheduler=tiny.tiny_scheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd")
    tiny.tiny_clip_vision().save_pretrained(root / "clip_vision")
    return root


def sd_copy(model_folders, tmp_path, change):
    """A copy of the SD folder with ``change(folder)`` applied."""
    folder = tmp_path / "sd"
    shutil.copytree(model_folders / "sd", folder)
    change(folder)
    return folder


def random_file(model_folders, tmp_path):
    path = tmp_path / "CLIP-ViT-H-14.safetensors"  # what ComfyUI's models/clip_vision holds, by name
    path.write_bytes(os.urandom(4096))
    return path


def vision_without_weights(model_folders, tmp_path):
    folder = tmp_path / "clip_vision"
    shutil.copytree(model_folders / "clip_vision", folder)
    os.remove(folder / "model.safetensors")
    return folder


def without_max_length(folder):
    path = folder / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    del settings["model_max_length"]
    path.write_text(json.dumps(settings))


EXPECTED_VISION = "expected a transformers CLIP vision model folder (config.json of model_type clip_vision_model or clip"
EXPECTED_SD = "a diffusers Stable Diffusion folder holds model_index.json, unet/, vae/ and text_encoder/"
CLIP_VISION_ROWS = [
    ("SD folder", lambda m, t: m / "sd",
     ["is a Stable Diffusion folder (model_index.json), not a CLIP vision model", EXPECTED_VISION]),
    ("random file", random_file,
     ["CLIP-ViT-H-14.safetensors' is a file: " + EXPECTED_VISION, "pass the folder the file came from"]),
    ("unet folder", lambda m, t: m / "sd" / "unet",
     ["holds a UNet2DConditionModel (its config.json), not a CLIP vision model", EXPECTED_VISION]),
    ("text_encoder folder", lambda m, t: m / "sd" / "text_encoder",
     ["holds a clip_text_model (its config.json), not a CLIP vision model"]),
    ("folder without weights", vision_without_weights,
     ["has no weights (model.safetensors or pytorch_model.bin)", EXPECTED_VISION]),
]
BASE_MODEL_ROWS = [
    ("no tokenizer_config.json",
     lambda m, t: sd_copy(m, t, lambda f: os.remove(f / "tokenizer" / "tokenizer_config.json")),
     ["is not a complete diffusers folder (no tokenizer/tokenizer_config.json)", EXPECTED_SD,
      "Download the missing files again"]),
    ("tokenizer_config.json without model_max_length", lambda m, t: sd_copy(m, t, without_max_length),
     ["tokenizer/tokenizer_config.json sets no usable model_max_length (77 for Stable Diffusion's CLIP tokenizers)"]),
    ("no tokenizer folder", lambda m, t: sd_copy(m, t, lambda f: shutil.rmtree(f / "tokenizer")),
     ["is not a complete diffusers folder (no tokenizer/)"]),
    ("no unet weights",
     lambda m, t: sd_copy(m, t, lambda f: os.remove(f / "unet" / "diffusion_pytorch_model.safetensors")),
     ["(no weights in unet/ (e.g. diffusion_pytorch_model.safetensors))"]),
    ("no vae and no scheduler config",
     lambda m, t: sd_copy(m, t, lambda f: (shutil.rmtree(f / "vae"),
                                           os.remove(f / "scheduler" / "scheduler_config.json"))),
     ["(no vae/; no scheduler/scheduler_config.json)"]),
    ("unet folder", lambda m, t: m / "sd" / "unet",
     ["is the unet/ part of the Stable Diffusion folder", "pass that folder as --base_model"]),
    ("CLIP vision folder", lambda m, t: m / "clip_vision",
     ["is a folder without model_index.json, not a diffusers Stable Diffusion folder", EXPECTED_SD]),
]
TRAINERS = {"idadapter": IDAdapterTrainConfig, "wplus": WPlusTrainConfig, "adaface": AdaFaceTrainConfig}  # by name


@pytest.mark.parametrize("name,make,fragments", CLIP_VISION_ROWS, ids=[r[0] for r in CLIP_VISION_ROWS])
@pytest.mark.parametrize("config_cls", [IDAdapterTrainConfig, IDAdapterEvalConfig], ids=lambda c: c.__name__)
def test_clip_vision_of_another_kind_is_named_up_front(model_folders, tmp_path, config_cls, name, make, fragments):
    with pytest.raises(ConfigError) as info:
        parse_args(config_cls, ["--preset", "tiny", "--clip_vision", str(make(model_folders, tmp_path))])
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("name,make,fragments", BASE_MODEL_ROWS, ids=[r[0] for r in BASE_MODEL_ROWS])
@pytest.mark.parametrize("config_cls", [*TRAINERS.values(), IDAdapterEvalConfig], ids=lambda c: c.__name__)
def test_incomplete_base_folder_is_named_up_front(model_folders, tmp_path, config_cls, name, make, fragments):
    with pytest.raises(ConfigError) as info:
        parse_args(config_cls, ["--preset", "tiny", "--base_model", str(make(model_folders, tmp_path))])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_complete_folders_pass_and_load(model_folders, tmp_path):
    """The checks ask for no more than the loaders read: save_pretrained's folders, and the tokenizer layout of
    Stable Diffusion's published folders (vocab.json + merges.txt beside tokenizer_config.json)."""
    from transformers import CLIPVisionModelWithProjection

    from comfyui_idadapter.training.base_model import load_base_model

    def vocab_files(folder):
        os.remove(folder / "tokenizer" / "tokenizer.json")
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(model_folders / "tokenizer_files" / name, folder / "tokenizer" / name)

    published = sd_copy(model_folders, tmp_path, vocab_files)
    for base in (model_folders / "sd", published):
        parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--base_model", str(base),
                                          "--clip_vision", str(model_folders / "clip_vision")])
        tokenizer = load_base_model(str(base))["tokenizer"]
        assert tokenizer.model_max_length == 77 and len(tokenizer("a photo of sks").input_ids) == 6
    assert CLIPVisionModelWithProjection.from_pretrained(model_folders / "clip_vision").config.hidden_size == 48


def test_cli_prints_a_model_folder_error_on_one_line(model_folders, tmp_path, capsys):
    from comfyui_idadapter.training import train_idadapter

    assert train_idadapter.cli(["--preset", "tiny", "--output_dir", str(tmp_path), "--clip_vision",
                                str(model_folders / "sd"), *QUIET]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training configuration:\n  --clip_vision ") and "Traceback" not in err


@pytest.mark.parametrize("config_cls", [*TRAINERS.values(), IDAdapterEvalConfig], ids=lambda c: c.__name__)
def test_help_states_each_default_once(config_cls, capsys):
    with pytest.raises(SystemExit):
        parse_args(config_cls, ["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert text.count("(default: ") == len(dataclasses.fields(config_cls))


# ---- the output folder: (setup, expected error class, message fragment) through the CLI's main(), in-process


def main(out, *args):
    from comfyui_idadapter.training import train_idadapter

    return train_idadapter.main(["--preset", "tiny", "--output_dir", str(out), "--max_steps", "1", *QUIET, *args])


@pytest.fixture
def locked_by_other_process(tmp_path):
    """A folder held by another process, as a running trainer holds it."""
    out = tmp_path / "out"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pack_import; "
            "from comfyui_idadapter.training import outdir\n"
            "with outdir.hold(sys.argv[2]):\n    print('locked', flush=True); sys.stdin.read()")  # until killed
    holder = subprocess.Popen([sys.executable, "-c", code, TESTS, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield out, holder.pid
    finally:
        holder.kill()
        holder.wait()


def deny_makedirs(monkeypatch, out):
    real = os.makedirs

    def makedirs(path, *args, **kwargs):
        if os.path.abspath(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)


def deny_access(monkeypatch, out):  # what a non-root user sees in a read-only folder
    real = os.access
    os.makedirs(out)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(out) else real(p, mode, **kw))


FOLDER_ROWS = [
    ("unwritable: cannot create it", deny_makedirs, ConfigError, ["cannot write to the output folder", "creating it",
                                                                  "nothing was written and nothing was lost"]),
    ("unwritable: no write permission", deny_access, ConfigError, ["cannot write to the output folder",
                                                                   "no write permission", "nothing was lost"]),
]


@pytest.mark.parametrize("name,setup,error,fragments", FOLDER_ROWS, ids=[r[0] for r in FOLDER_ROWS])
def test_unwritable_output_folder_before_anything_heavy(tmp_path, monkeypatch, name, setup, error, fragments):
    out = tmp_path / "out"
    setup(monkeypatch, out)
    with pytest.raises(error) as info:
        main(out)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(out) in str(info.value)
    assert not (out / "tiny_assets").exists()


def test_second_run_into_a_locked_folder_fails_fast_naming_the_first(locked_by_other_process):
    out, pid = locked_by_other_process
    planted = out / "idadapter.safetensors.tmp-1"
    planted.write_text("the first run's export being written")
    started = time.thread_time()  # CPU time: other processes' load does not count
    with pytest.raises(ConfigError) as info:
        main(out)
    assert time.thread_time() - started < 10  # accelerate's start-up; no model is built or loaded
    message = str(info.value)
    assert f"is in use by another training run (pid {pid} on host " in message and "command: " in message
    assert "pass another --output_dir" in message
    assert not (out / "tiny_assets").exists()
    assert planted.exists()  # the running run's temporary files are not touched


def test_cli_prints_the_lock_error_on_one_line(locked_by_other_process, capsys):
    from comfyui_idadapter.training import train_idadapter

    out, pid = locked_by_other_process
    assert train_idadapter.cli(["--preset", "tiny", "--output_dir", str(out), *QUIET]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"pid {pid}" in err and "Traceback" not in err


class OtherRank:
    """A non-main process of a multi-process run (its main process holds the lock)."""
    is_main_process, num_processes = False, 1


def test_other_ranks_of_a_run_are_not_refused(locked_by_other_process):
    out, _ = locked_by_other_process
    with outdir.hold(str(out), OtherRank()):
        pass


def test_lock_is_released_after_the_run_and_reentrant(tmp_path):
    out = str(tmp_path / "out")
    with outdir.hold(out):
        with outdir.hold(out):  # loop.run inside main(): the same process, no second lock
            pass
        info = json.loads((tmp_path / "out" / outdir.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] and "command" in info
    with outdir.hold(out):  # released: a next run may start
        pass


def test_interrupted_runs_temporary_files_are_removed_once_the_lock_is_held(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3.tmp").mkdir(parents=True)
    (out / "checkpoint-3.tmp" / "trainable.safetensors.tmp-77").write_text("half")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "state.json").write_text("{}")
    (out / "cache").mkdir()
    dead = [out / "idadapter.safetensors.tmp-999999999", out / "cache" / "faces.safetensors.tmp-12"]
    alive = out / f"idadapter.safetensors.tmp-{os.getppid()}"  # a live pid: still a left-over once we hold the lock
    kept = [out / "notes.tmp-draft", out / "idadapter.safetensors", out / "checkpoint-2" / "state.json"]
    for path in [*dead, alive, *kept]:
        path.write_text("x")
    said = []
    with outdir.hold(str(out), log=said.append):
        pass
    assert not (out / "checkpoint-3.tmp").exists() and not alive.exists()
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in kept)
    assert len(said) == 1 and "removed 4 temporary file(s)/folder(s) of an interrupted run" in said[0]


# ---- resume and mid-run problems: tiny models, a few steps


def run_dir(tmp_path, tiny_assets, name, source=None):
    out = tmp_path / name
    if source is not None:
        shutil.copytree(source, out, ignore=shutil.ignore_patterns("tiny_assets"))
    else:
        out.mkdir()
    shutil.copytree(tiny_assets, out / "tiny_assets")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_assets):
    """A run of 2 steps with checkpoint-1 and checkpoint-2."""
    out = run_dir(tmp_path_factory.mktemp("trained"), tiny_assets, "run")
    main(out, "--max_steps", "2", "--checkpoint_every", "1")
    assert sorted(os.listdir(out / "checkpoint-2")) == sorted([ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE,
                                                               ckpt.STATE_FILE, ckpt.rng_file(0)])
    return out


def truncate_trainable(out):
    path = out / "checkpoint-2" / ckpt.TRAINABLE_FILE
    path.write_bytes(path.read_bytes()[:1000])


def garble_state(out):
    (out / "checkpoint-2" / ckpt.STATE_FILE).write_text('{"format": "training-checkpoint/1", "st')


def break_both(out):
    truncate_trainable(out)
    (out / "checkpoint-1" / ckpt.OPTIMIZER_FILE).write_bytes(b"\0" * 20)


def no_checkpoints(out):
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(out / name)


def forget_saved_options(out):  # a checkpoint written before the options were saved in state.json
    for name in ("checkpoint-1", "checkpoint-2"):
        path = out / name / ckpt.STATE_FILE
        state = json.loads(path.read_text())
        del state["config"]
        path.write_text(json.dumps(state))


def nothing(out):
    pass


# (name, setup of a copy of `trained`, options, expected error class or None, fragments of the error or output)
RESUME_ROWS = [
    ("truncated newest trainable falls back", truncate_trainable, ["--resume", "latest", "--max_steps", "3"], None,
     ["checkpoint-2 (not resumable:", "corrupt or truncated", "falling back to the previous checkpoint",
      "checkpoint-1 at step 1"]),
    ("garbled newest state.json falls back", garble_state, ["--resume", "latest", "--max_steps", "3"], None,
     ["checkpoint-2 (not resumable:", "is not valid JSON", "checkpoint-1 at step 1"]),
    ("no usable checkpoint at all", break_both, ["--resume", "latest"], ConfigError,
     ["--resume latest: no usable checkpoint in", "checkpoint-2:", "checkpoint-1:"]),
    ("corrupt checkpoint named explicitly", truncate_trainable, ["--resume", "{out}/checkpoint-2"], ConfigError,
     ["checkpoint-2' cannot be used", "corrupt or truncated", "or 'latest'"]),
    ("resume latest with nothing to resume", no_checkpoints, ["--resume", "latest", "--max_steps", "1"], None,
     ["no checkpoint in {out}: starting from step 0"]),
    ("changed --num_tokens", nothing, ["--resume", "latest", "--num_tokens", "8"], ConfigError,
     ["trained with other adapter options (--num_tokens 4 -> 8)"]),
    ("changed --mff_width and --mff_heads", nothing, ["--resume", "latest", "--mff_width", "64", "--mff_heads", "4"],
     ConfigError, ["--mff_width 32 -> 64", "--mff_heads 2 -> 4"]),
    ("changed shape, options not saved", forget_saved_options, ["--resume", "latest", "--num_tokens", "8"], ConfigError,
     ["holds an adapter of another shape", "--num_tokens"]),
    ("changed learning rate wins", nothing, ["--resume", "latest", "--max_steps", "3", "--learning_rate", "0.001",
                                             "--adam_weight_decay", "0.01"], None,
     ["resuming with changed options", "--learning_rate 0.003 -> 0.001", "--adam_weight_decay 0.0 -> 0.01",
      "--max_steps 2 -> 3", "resumed from {out}/checkpoint-2 at step 2"]),
]


@pytest.mark.parametrize("name,setup,args,error,fragments", RESUME_ROWS, ids=[r[0] for r in RESUME_ROWS])
def test_resume(tmp_path, tiny_assets, trained, capsys, name, setup, args, error, fragments):
    out = run_dir(tmp_path, tiny_assets, "copy", source=trained)
    setup(out)
    args = [a.format(out=out) for a in args]
    fragments = [f.format(out=out) for f in fragments]
    if error is not None:
        with pytest.raises(error) as info:
            main(out, *args)
        text = str(info.value)
    else:
        main(out, *args)
        text = capsys.readouterr().out
    for fragment in fragments:
        assert fragment in text, text
    if name == "changed learning rate wins":  # the optimiser and the schedule use the new values from step 2 on
        meta, _ = ckpt._read(str(out / "checkpoint-3" / ckpt.OPTIMIZER_FILE), device=None)
        groups = meta["param_groups"]
        assert [g["initial_lr"] for g in groups] == [0.001, 3e-4] and [g["lr"] for g in groups] == [0.001, 3e-4]
        assert [g["weight_decay"] for g in groups] == [0.01, 0.01]
        state = json.loads((out / "checkpoint-3" / ckpt.STATE_FILE).read_text())
        assert state["scheduler"]["base_lrs"] == [0.001, 3e-4] and state["config"]["learning_rate"] == 0.001


def test_folder_unwritable_at_a_checkpoint(tmp_path, tiny_assets, monkeypatch):
    out = run_dir(tmp_path, tiny_assets, "run")

    def save_main(folder, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(folder, ckpt.TRAINABLE_FILE))

    monkeypatch.setattr(ckpt, "save_main", save_main)
    with pytest.raises(ConfigError) as info:
        main(out, "--max_steps", "1")
    message = str(info.value)
    assert f"cannot write to the output folder {str(out)!r} (writing checkpoint-1" in message
    assert "the checkpoints already there are intact (none yet)" in message and "--resume latest" in message
    assert not (out / "checkpoint-1.tmp").exists() and not (out / "checkpoint-1").exists()
    assert isinstance(info.value, PackError)


# ---- each trainer's own logs and checkpoints: the shared loop run with each trainer's options


class LoopContractTask:
    """The least a task gives ``training.loop`` (its documented contract): one linear layer, a quadratic loss. The
    loop writes its logs and checkpoints (state.json with the trainer's options and name) as for the real task."""

    comfyui_folder = "none"

    def __init__(self):
        import torch

        self.trainable = torch.nn.Linear(2, 1)

    def setup(self, accelerator):
        pass

    def param_groups(self):
        return [{"params": list(self.trainable.parameters())}]

    def trainable_state(self):
        return {k: v.detach() for k, v in self.trainable.state_dict().items()}

    def load_trainable_state(self, state):
        self.trainable.load_state_dict(state)

    def loss(self, model, step):
        import torch

        loss = model(torch.ones(1, 2)).square().sum()
        return loss, {"loss": loss.detach()}

    def heldout_check(self):
        return None

    def export(self, path):
        from safetensors.torch import save_file

        save_file(self.trainable_state(), path)

    def describe_export(self):
        return "a linear layer"


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """trainer name -> the output folder of a 1-step run with that trainer's tiny options and TensorBoard logs."""
    runs = {}
    for trainer, config_cls in TRAINERS.items():
        out = tmp_path_factory.mktemp(trainer)
        config = parse_args(config_cls, ["--preset", "tiny", "--output_dir", str(out), "--max_steps", "1",
                                         "--checkpoint_every", "1", "--log_every", "1", "--validation_every", "0",
                                         "--report_to", "tensorboard"])
        loop.run(LoopContractTask(), config)
        runs[trainer] = out
    return runs


@pytest.mark.parametrize("trainer", TRAINERS)
def test_each_trainer_logs_under_its_own_name(loop_runs, trainer):
    logs = loop_runs[trainer] / "logs"
    assert os.listdir(logs) == [trainer]
    assert list((logs / trainer).rglob("events.out.tfevents.*"))


def without_recorded_trainer(folder):  # a checkpoint written before state.json named its trainer
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    del state["trainer"]
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))


def nothing_changed(folder):
    pass


# (name, the trainer whose checkpoint is given, the trainer resuming, how the checkpoint is changed, fragments)
CROSS_RESUME_ROWS = [
    ("W+ checkpoint to AdaFace", "wplus", AdaFaceTrainConfig, nothing_changed,
     ["a checkpoint of the W+ adapter trainer (training/train_wplus.py), not of this AdaFace trainer",
      "resume it with training/train_wplus.py, or pass a checkpoint of the AdaFace trainer"]),
    ("AdaFace checkpoint to W+", "adaface", WPlusTrainConfig, nothing_changed,
     ["a checkpoint of the AdaFace trainer (training/train_adaface.py), not of this W+ adapter trainer"]),
    ("IDAdapter checkpoint to W+", "idadapter", WPlusTrainConfig, nothing_changed,
     ["a checkpoint of the IDAdapter trainer (training/train_idadapter.py), not of this W+ adapter trainer"]),
    ("IDAdapter checkpoint to AdaFace", "idadapter", AdaFaceTrainConfig, nothing_changed,
     ["a checkpoint of the IDAdapter trainer (training/train_idadapter.py), not of this AdaFace trainer"]),
    ("W+ checkpoint to IDAdapter", "wplus", IDAdapterTrainConfig, nothing_changed,
     ["a checkpoint of the W+ adapter trainer (training/train_wplus.py), not of this IDAdapter trainer"]),
    ("AdaFace checkpoint to IDAdapter", "adaface", IDAdapterTrainConfig, nothing_changed,
     ["a checkpoint of the AdaFace trainer (training/train_adaface.py), not of this IDAdapter trainer"]),
    ("written before the trainer was recorded", "wplus", AdaFaceTrainConfig, without_recorded_trainer,
     ["a checkpoint of the W+ adapter trainer (training/train_wplus.py)"]),
]


@pytest.mark.parametrize("name,source,config_cls,change,fragments", CROSS_RESUME_ROWS,
                         ids=[r[0] for r in CROSS_RESUME_ROWS])
@pytest.mark.parametrize("resume", ["folder", "latest"])
def test_checkpoint_of_another_trainer_is_named(loop_runs, tmp_path, resume, name, source, config_cls, change,
                                                fragments):
    out = tmp_path / "run"  # for latest: the other trainer's output folder given to this one
    shutil.copytree(loop_runs[source], out, ignore=shutil.ignore_patterns("logs"))
    change(out / "checkpoint-1")
    args = ["--resume", str(out / "checkpoint-1") if resume == "folder" else "latest"]
    with pytest.raises(ConfigError) as info:
        parse_args(config_cls, ["--preset", "tiny", "--output_dir", str(out), *args])
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "or a new --output_dir to start from step 0" in str(info.value)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_each_trainer_resumes_its_own_checkpoint(loop_runs, trainer):
    state = json.loads((loop_runs[trainer] / "checkpoint-1" / ckpt.STATE_FILE).read_text())
    assert state["trainer"] == trainer
    config = parse_args(TRAINERS[trainer], ["--preset", "tiny", "--output_dir", str(loop_runs[trainer]), "--resume", "latest"])
    assert config.resume == "latest"
