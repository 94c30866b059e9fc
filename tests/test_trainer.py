"""training/train_idadapter.py on the tiny preset: exports, frozen base, exact resume, real learning, data checks."""

import collections
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from comfyui_idadapter.nodes.arch import idadapter as ida  # noqa: E402
from comfyui_idadapter.nodes.arch.files import file_fingerprint  # noqa: E402
from comfyui_idadapter.nodes.errors import ConfigError  # noqa: E402
from comfyui_idadapter.nodes.face.insightface_backend import recognizer_file  # noqa: E402
from comfyui_idadapter.training import checkpoint, data, diffusers_binding, loop, tiny  # noqa: E402
from comfyui_idadapter.training.base_model import PerImageCache  # noqa: E402
from comfyui_idadapter.training.cli import parse_args  # noqa: E402
from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig  # noqa: E402
from comfyui_idadapter.training.idadapter_task import IDAdapterTask  # noqa: E402
from comfyui_idadapter.training.prompts import identity_token  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--validation_every", "0"]


def run_dir(tmp_path, tiny_assets, name):
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(tiny_assets, out / "tiny_assets")
    return out


def train(out, *args):
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), *QUIET, *args])
    task = IDAdapterTask(config, log=lambda *a: None)
    return task, loop.run(task, config)


def frozen_snapshot(task):
    modules = {"unet": task.c.unet, "vae": task.c.vae, "text": task.c.text_encoder, "vision": task.c.clip_vision,
               "arcface": task.c.arcface}
    return {f"{m}.{k}": v.detach().clone() for m, module in modules.items() for k, v in module.state_dict().items()
            if ".fuser." not in k}


def test_tiny_run_exports_weights_the_nodes_load_and_only_trainables_change(tmp_path, tiny_assets):
    out = run_dir(tmp_path, tiny_assets, "run")
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), "--max_steps", "4",
                                               "--checkpoint_every", "2", "--validation_every", "4"])
    task = IDAdapterTask(config, log=lambda *a: None)
    before = frozen_snapshot(task)
    adapter_before = {k: v.clone() for k, v in task.adapter.state_dict().items()}
    export = loop.run(task, config)
    after = frozen_snapshot(task)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    kv_keys = sorted(k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k)
    assert changed == kv_keys and len(kv_keys) == 14  # 7 transformer blocks x (W_K, W_V); nothing else moved
    assert any(not torch.equal(adapter_before[k], v) for k, v in task.adapter.state_dict().items())

    weights = ida.load_idadapter(export)  # the node's loader, no conversion
    assert weights.config.family == "sd15" and weights.config.num_images == 2
    # the recognizer that made the dataset's identity vectors, which MFF Embed checks the face embeds against
    assert weights.recognizer.startswith("rec.onnx:")
    assert weights.recognizer == file_fingerprint(recognizer_file(task.c.analyzer))
    ida.check_unet_compatible(weights.config, diffusers_binding.block_specs(task.c.unet))
    for (name, proj), w in task.kv_params.items():
        torch.testing.assert_close(weights.kv_deltas[name][proj], w.detach() - task.base_kv[(name, proj)])
    for k, v in task.adapter.state_dict().items():
        assert torch.equal(weights.adapter.state_dict()[k], v)
    assert [os.path.basename(c) for c in checkpoint.checkpoints(str(out))] == ["checkpoint-2", "checkpoint-4"]
    assert list((out / "validation").glob("step0000004_*.png"))
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


def test_resume_is_exact(tmp_path, tiny_assets):
    _, straight = train(run_dir(tmp_path, tiny_assets, "straight"), "--max_steps", "6", "--checkpoint_every", "3")
    split = run_dir(tmp_path, tiny_assets, "split")
    train(split, "--max_steps", "3", "--checkpoint_every", "3")
    _, resumed = train(split, "--max_steps", "6", "--checkpoint_every", "3", "--resume", "latest")
    a, b = ida.load_idadapter(straight), ida.load_idadapter(resumed)
    for k, v in a.adapter.state_dict().items():
        assert torch.equal(v, b.adapter.state_dict()[k]), k
    for name in a.kv_deltas:
        assert torch.equal(a.kv_deltas[name]["to_k"], b.kv_deltas[name]["to_k"])


# The trainer's command line in a process that kills itself (SIGKILL: no cleanup runs) once the checkpoint of
# step argv[2] is fully written into its *.tmp folder, just before the rename that would complete it.
KILLED_BEFORE_RENAMING = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import pack_import
from comfyui_idadapter.training import checkpoint, train_idadapter

kill_at, save_main = int(sys.argv[2]), checkpoint.save_main

def save_main_then_die(folder, task, optimizer, scheduler, ema, scaler, step, *rest):
    save_main(folder, task, optimizer, scheduler, ema, scaler, step, *rest)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_main = save_main_then_die
sys.exit(train_idadapter.cli(sys.argv[3:]))
"""


def test_killed_process_loses_only_steps_since_the_checkpoint(tmp_path, tiny_assets):
    out = run_dir(tmp_path, tiny_assets, "killed")
    args = ["--max_steps", "8", "--checkpoint_every", "2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAMING, os.path.join(REPO, "tests"), "4",
                             "--preset", "tiny", "--output_dir", str(out), *args, *QUIET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-4.tmp" / checkpoint.TRAINABLE_FILE).is_file()  # written whole, never renamed
    survivors = checkpoint.checkpoints(str(out))  # complete checkpoints only
    assert [os.path.basename(c) for c in survivors] == ["checkpoint-2"]
    assert os.path.isfile(os.path.join(survivors[0], checkpoint.TRAINABLE_FILE))
    assert not (out / "idadapter.safetensors").exists()
    # resume from what survived: the same weights as a run that was never interrupted
    _, resumed = train(out, *args, "--resume", "latest")
    _, straight = train(run_dir(tmp_path, tiny_assets, "straight"), *args)
    a, b = ida.load_idadapter(straight), ida.load_idadapter(resumed)
    assert all(torch.equal(v, b.adapter.state_dict()[k]) for k, v in a.adapter.state_dict().items())
    assert not (out / "checkpoint-4.tmp").exists()  # the resumed run wrote checkpoint-4 over it


def test_prefetched_photos_are_decoded_off_the_step_and_train_the_same(tmp_path, tiny_assets, monkeypatch):
    """With nothing cached (--cache_mb 0), no photo of a step after the first is decoded in the step: the prefetch
    threads decoded them while the step before ran. The run exports exactly what decoding in the step exports."""
    import threading

    in_step = [None]  # the step whose loss is running, if any
    decodes = []  # (step, thread name)
    load_rgb, loss = data.load_rgb, IDAdapterTask.loss

    def recording_load_rgb(path):
        decodes.append((in_step[0], threading.current_thread().name))
        return load_rgb(path)

    def recording_loss(self, model, step):
        in_step[0] = step
        try:
            return loss(self, model, step)
        finally:
            in_step[0] = None

    monkeypatch.setattr(data, "load_rgb", recording_load_rgb)
    monkeypatch.setattr(IDAdapterTask, "loss", recording_loss)
    exports, later_steps_in_step = {}, {}
    for threads in ("0", "2"):
        data._square_uint8.cache_clear()  # targets' decodes are memoised in the process
        decodes.clear()
        _, exports[threads] = train(run_dir(tmp_path, tiny_assets, f"threads-{threads}"), "--max_steps", "4",
                                    "--cache_mb", "0", "--prefetch_threads", threads, "--checkpoint_every", "4")
        later_steps_in_step[threads] = sum(step is not None and step >= 1 and name == "MainThread"
                                           for step, name in decodes)
        if threads != "0":  # steps 1 to 3, each at least its 2 examples' references
            assert sum(name.startswith("photo-loader") for _, name in decodes) >= 3 * 2
    assert later_steps_in_step["2"] == 0 and later_steps_in_step["0"] >= 3 * 2
    a, b = ida.load_idadapter(exports["0"]), ida.load_idadapter(exports["2"])
    assert all(torch.equal(v, b.adapter.state_dict()[k]) for k, v in a.adapter.state_dict().items())
    assert all(torch.equal(a.kv_deltas[n]["to_v"], b.kv_deltas[n]["to_v"]) for n in a.kv_deltas)


def test_every_attention_of_a_step_is_sdpa(tmp_path, tiny_assets):
    """Every attention a training step computes (UNet self and cross attention, the gated adapter, the text and
    vision encoders, MFF, the VAE's mid block; nothing cached) calls torch's scaled_dot_product_attention, which
    picks the flash or memory-efficient kernel on a GPU; none computes softmax(QK^T)V by hand."""
    from accelerate import Accelerator
    from torch.overrides import TorchFunctionMode

    class CountCalls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls[getattr(func, "__name__", str(func))] += 1
            return func(*args, **(kwargs or {}))

    out = run_dir(tmp_path, tiny_assets, "sdpa")
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), "--image_dropout", "0",
                                               "--cache_mb", "0"])
    task = IDAdapterTask(config, log=lambda *a: None)
    task.setup(Accelerator(cpu=True))
    with CountCalls() as counted:
        loss, _ = task.loss(task.trainable, 1)
        loss.backward()
    blocks = len(diffusers_binding.transformer_blocks(task.c.unet))
    assert counted.calls["scaled_dot_product_attention"] >= 3 * blocks  # attn1, attn2 and the gated attention
    assert not {name: n for name, n in counted.calls.items() if "softmax" in name}


SPEED_SETTINGS = {  # torch.compile's aot_eager backend traces as inductor does, without generating code
    "compiled": ["--compile", "unet", "vae_decoder", "arcface", "--compile_backend", "aot_eager"],
    "channels-last": ["--channels_last", "true"],
}


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # diffusers' checkpointing helper
def test_compiled_and_channels_last_steps_give_the_eager_step(tmp_path, tiny_assets):
    """--compile (the UNet with the adapter inside it, the VAE decoder and the identity loss's ArcFace) and
    --channels_last give the eager step's loss and gradients within fp32 tolerance (with gradient checkpointing, as
    docs/idadapter.md's command trains), and leave the parameter names, and so checkpoints and the export, as they are."""
    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    counters.clear()
    steps = {}
    for name, args in {"eager": [], **SPEED_SETTINGS}.items():
        out = run_dir(tmp_path, tiny_assets, name)
        config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), "--image_dropout", "0",
                                                   "--gradient_checkpointing", "true", *args])
        task = IDAdapterTask(config, log=lambda *a: None)
        task.setup(Accelerator(cpu=True))
        loss, logs = task.loss(task.trainable, 2)
        loss.backward()
        steps[name] = (float(loss.detach()), logs.keys(),
                       {n: p.grad.clone() for n, p in task.trainable.named_parameters() if p.grad is not None}, task)
    eager_loss, eager_logs, eager_grads, eager_task = steps.pop("eager")
    assert "loss_id" in eager_logs and len(eager_grads) > 10
    parts = ("unet", "vae_decoder", "arcface")
    assert all(eager_task.compiled_module(part)._compiled_call_impl is None for part in parts)
    assert all(steps["compiled"][3].compiled_module(part)._compiled_call_impl is not None for part in parts)
    # whole graphs: a graph break (a data-dependent shape, a host read) would run the rest of that module eagerly
    assert counters["stats"]["unique_graphs"] >= len(parts) and not counters["graph_break"], dict(counters["graph_break"])
    for task in (eager_task, steps["channels-last"][3]):
        conv = task.c.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == task.config.channels_last
    for name, (loss, logs, grads, _) in steps.items():
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss) and logs == eager_logs, name
        assert grads.keys() == eager_grads.keys(), name
        for param, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[param], rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


class CountedReads:
    """A logged value that counts how often the loop reads it back to the host (float())."""

    reads = 0

    def __init__(self, value):
        self.value = value

    def __float__(self):
        CountedReads.reads += 1
        return float(self.value)


def test_the_loop_reads_the_loss_back_only_on_steps_that_log_or_save(tmp_path, tiny_assets, monkeypatch):
    """A step that neither logs nor checkpoints reads nothing back to the host (on a GPU: no wait for the step to
    finish), so the CPU queues the next step meanwhile."""
    reads_at = {}
    original = IDAdapterTask.loss

    def loss(self, model, step):
        value, logs = original(self, model, step)
        reads_at[step] = CountedReads.reads
        return value, {k: CountedReads(v) for k, v in logs.items()}

    monkeypatch.setattr(IDAdapterTask, "loss", loss)
    train(run_dir(tmp_path, tiny_assets, "reads"), "--max_steps", "6", "--log_every", "3", "--checkpoint_every", "6",
          "--validation_every", "0")
    # the value of step s is read (if at all) before step s + 1 asks for its loss: steps 3 and 6 are logged
    read = {step: reads_at[step + 1] - reads_at[step] for step in range(5)}
    assert read == {0: 0, 1: 0, 2: read[2], 3: 0, 4: 0} and read[2] > 0, read


def test_learning_is_real(tmp_path, tiny_assets):
    """Held-out images of the training identities: after a short run the denoising loss with the right identity is
    lower than with another identity's references, and lower than before training."""
    out = run_dir(tmp_path, tiny_assets, "learn")
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), *QUIET,
                                               "--checkpoint_every", "1000"])
    task = IDAdapterTask(config, log=lambda *a: None)
    held_out = tiny.make_synthetic_dataset(str(tmp_path / "held"), config.synthetic_identities, 3,
                                           size=config.resolution, seed=99)
    identities, _ = data.scan_dataset(held_out, task.c.analyzer, str(tmp_path / "held_cache"), log=lambda *a: None)
    from accelerate import Accelerator

    accelerator = Accelerator()
    task.setup(accelerator)
    before = task.denoising_loss(identities)
    loop.run(task, config, accelerator=accelerator)
    task.trainable.eval()
    right = task.denoising_loss(identities)
    shuffled = task.denoising_loss(identities, shuffle=True)
    assert right < 0.97 * shuffled, (right, shuffled)
    assert right < 0.95 * before, (right, before)


def test_cached_frozen_outputs_give_the_same_step_without_the_frozen_encoders(tmp_path, tiny_assets):
    from accelerate import Accelerator

    out = run_dir(tmp_path, tiny_assets, "cache")
    config = parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out), *QUIET])
    task = IDAdapterTask(config, log=lambda *a: None)
    task.setup(Accelerator(cpu=True))
    with torch.no_grad():
        first, logs = task.loss(task.trainable, 3)
    kinds = sorted({kind for kind, _ in task.cache.entries})
    assert "loss_id" in logs and kinds == ["reference", "target"]

    def no_call(*args, **kwargs):
        raise AssertionError("a cached photo ran a frozen encoder")

    encode, vision = task.c.vae.encode, task.c.clip_vision.forward
    task.c.vae.encode = task.c.clip_vision.forward = no_call  # the synthetic identities have >= N photos each
    with torch.no_grad():
        again, _ = task.loss(task.trainable, 3)
    task.c.vae.encode, task.c.clip_vision.forward = encode, vision
    task.cache = PerImageCache(0)  # --cache_mb 0: every step runs the frozen encoders
    with torch.no_grad():
        uncached, _ = task.loss(task.trainable, 3)
    assert torch.equal(first, again) and torch.equal(first, uncached)
    assert not task.cache.entries


def test_per_image_cache_drops_the_least_recently_used_within_its_budget():
    cache = PerImageCache(1)
    entry = (torch.zeros(2**20 // 4 // 3),)  # a third of the budget
    for key in "abc":
        cache.get(key, lambda: entry)
    cache.get("a", lambda: None)  # a hit: "a" becomes the most recent
    cache.get("d", lambda: entry)
    assert list(cache.entries) == ["c", "a", "d"] and cache.used == 3 * PerImageCache.nbytes(entry)
    cache.get("big", lambda: (torch.zeros(2**20),))  # larger than the budget: returned, not kept
    assert "big" not in cache.entries and list(cache.entries) == ["c", "a", "d"]


def test_trainer_text_injection_equals_edited_embedding_table(tmp_path):
    tokenizer = tiny.tiny_tokenizer(str(tmp_path / "tok"))
    encoder = tiny.tiny_text_encoder(len(tokenizer)).eval()
    sks = tokenizer("sks", add_special_tokens=False).input_ids[0]
    ids = tokenizer(["a photo of sks, person is sks", "a photo of a person"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    vectors = torch.randn(2, 768) * 0.05
    with torch.no_grad(), identity_token(encoder, ids, sks, vectors):
        ours = encoder(ids)[0]
    plain = encoder(ids)[0]
    with torch.no_grad():
        encoder.get_input_embeddings().weight[sks] = vectors[0]
        reference = encoder(ids[:1])[0]
    torch.testing.assert_close(ours[:1], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1:], plain[1:].detach())  # no identifier: nothing injected
    assert (ours[0] - plain[0]).abs().max() > 1e-4


def test_dataset_problems_are_reported_not_fatal(tmp_path, tiny_assets):
    from comfyui_idadapter.nodes.face import insightface_backend

    root = tiny.make_synthetic_dataset(str(tmp_path / "ds"), 2, 2, size=64, seed=3)
    (tmp_path / "ds" / "id000" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ds" / "id001" / "black.png")  # no face
    os.makedirs(tmp_path / "ds" / "empty")
    analyzer = insightface_backend.load_analyzer(str(tiny_assets / "insightface" / "models" / "tinypack"), "CPU")
    identities, report = data.scan_dataset(root, analyzer, str(tmp_path / "cache"), log=lambda *a: None)
    assert [i.name for i in identities] == ["id000", "id001"] and report.images == 4
    assert report.skipped["unreadable image (UnidentifiedImageError)"] == [os.path.join("id000", "broken.png")]
    assert report.skipped["no face detected"] == [os.path.join("id001", "black.png")]
    assert report.skipped["identity with no usable image"] == ["empty"]
    assert "skipped 1 (no face detected)" in report.summary()

    def no_detection(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    original, insightface_backend.embed_faces = insightface_backend.embed_faces, no_detection
    try:
        again, _ = data.scan_dataset(root, analyzer, str(tmp_path / "cache"), log=lambda *a: None)
    finally:
        insightface_backend.embed_faces = original
    assert torch.equal(again[0].images[0].embedding, identities[0].images[0].embedding)


@pytest.mark.parametrize("args,message", [
    (["--resolution", "30"], "--resolution must be a multiple of 8"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
    (["--image_dropout", "1.5"], r"--image_dropout must be in \[0, 1\)"),
    (["--id_gate", "retinaface"], "--id_gate must be detector or norm, got 'retinaface'"),
    (["--id_gate_iou", "1.5"], r"--id_gate_iou must be in \[0, 1\]"),
    (["--id_decode", "tiles"], "--id_decode must be full or window, got 'tiles'"),
    (["--dataset", "/nonexistent"], "--base_model is required"),
])
def test_bad_configs_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(IDAdapterTrainConfig, args)


def test_cli_reports_config_errors_without_a_traceback():
    out = subprocess.run([sys.executable, os.path.join(REPO, "training", "train_idadapter.py"), "--base_model", "/nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "error: invalid training configuration" in out.stderr and "--base_model '/nope' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def identities_of(sizes: list[int]) -> list:
    """Identities with the given numbers of photos (paths only: sampling never opens them)."""
    return [data.Identity(f"id{i}", "person", [data.FaceImage(f"id{i}/img{j}.png", "", torch.zeros(4),
                                                              torch.zeros(5, 2), torch.zeros(512))
                                               for j in range(size)])
            for i, size in enumerate(sizes)]


def test_a_target_is_never_among_its_own_references():
    identities = identities_of([3, 6, 2, 1])  # N = 2: more than N, exactly N, a single photo
    seen = {3: 0, 6: 0, 2: 0, 1: 0}
    for step in range(300):
        for ex in data.sample_batch(identities, 4, 2, step, seed=5):
            refs, size = [im.path for im in ex["references"]], len(ex["identity"].images)
            seen[size] += 1
            if size == 1:  # nothing else to show: the photo is its own reference
                assert refs == [ex["target"].path]
                continue
            assert ex["target"].path not in refs and len(set(refs)) == len(refs)
            assert len(refs) == min(2, size - 1)  # fewer than N: filled up by augmentation later
    assert all(count > 100 for count in seen.values())
    # the old data path, kept for comparison: the target is the first of its N references
    old = data.sample_batch(identities, 4, 2, 0, seed=5, include_target=True)
    assert all(ex["references"][0] is ex["target"] for ex in old)
    assert data.sample_batch(identities, 4, 2, 7, seed=5) == data.sample_batch(identities, 4, 2, 7, seed=5)


def test_identities_with_too_few_photos_are_left_out_and_counted():
    task = IDAdapterTask.__new__(IDAdapterTask)  # only the config is needed
    lines = []
    task.config = IDAdapterTrainConfig(num_images=2)
    kept = task.enough_photos(identities_of([3, 2, 5, 1]), lines.append)
    assert [len(i.images) for i in kept] == [3, 5]
    assert lines == ["2 of 4 identities have 2 photos or fewer (N = --num_images 2): 2 with fewer than --min_images 3 "
                     "left out"]
    task.config = IDAdapterTrainConfig(num_images=2, min_images=2)
    assert [len(i.images) for i in task.enough_photos(identities_of([3, 2, 1]), lines.append)] == [3, 2]
    assert lines[-1].endswith("1 with fewer than --min_images 2 left out; the others' references are their other "
                              "photos, filled up to N by augmentation")
    task.config = IDAdapterTrainConfig(num_images=2)
    with pytest.raises(data.DatasetError, match="no identity has --min_images 3 photos"):
        task.enough_photos(identities_of([1, 2]), lines.append)
