"""The trainers with two processes (torchrun, CPU, gloo DDP). IDAdapter: each process trains on its own examples,
one process prints and writes the shared files, checkpoints are complete and pickle-free, and a resume (from a
folder holding planted malicious pickles) gives the uninterrupted run's export and EMA. AdaFace: training goes on
past a model expansion with the processes' weights equal, and a resume from a grown checkpoint is exact."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from comfyui_idadapter.nodes.arch import adaface as ada  # noqa: E402
from comfyui_idadapter.training import checkpoint as ckpt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDADAPTER = os.path.join(REPO, "training", "train_idadapter.py")
ADAFACE = os.path.join(REPO, "tests", "adaface_ranks.py")  # train_adaface.py's run; each process then writes its weights
ARGS = ["--max_steps", "4", "--checkpoint_every", "2", "--validation_every", "0", "--log_examples", "true",
        "--use_ema", "true", "--ema_decay", "0.9", "--tiny_base_steps", "20"]
CHECKPOINT_FILES = sorted([ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE, ckpt.EMA_FILE, ckpt.STATE_FILE,
                           ckpt.rng_file(0), ckpt.rng_file(1)])


class Planted:
    """A pickle that creates a file when unpickled: what a checkpoint from a stranger could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def torchrun(out, *args, script=IDADAPTER, options=ARGS):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           "--preset", "tiny", "--output_dir", str(out), *options, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def examples(out):
    """{(rank, step): [(identity, target), ...]} from --log_examples (the last line per step wins)."""
    found = {}
    for rank in (0, 1):
        with open(out / "examples" / f"rank-{rank}.jsonl") as f:
            for line in f:
                entry = json.loads(line)
                assert entry["rank"] == rank
                found[(rank, entry["step"])] = [(e["identity"], e["target"]) for e in entry["examples"]]
    return found


def tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_file(a, b):
    """Same metadata and bit-identical tensors (safetensors may order header keys differently per process)."""
    (meta_a, ta), (meta_b, tb) = tensors(a), tensors(b)
    assert meta_a == meta_b and sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (a, k)


def test_two_processes_train_on_different_examples_and_resume_exactly(tmp_path):
    straight = tmp_path / "straight"
    # a fresh folder: the main process builds the tiny assets and the face cache while the other waits
    output = torchrun(straight, "--report_to", "tensorboard")
    assert len(re.findall(r"^dataset: 6 identities", output, re.M)) == 1  # one dataset report
    assert output.count("held-out dataset: ") == 1
    assert output.count("global batch 4 = batch 2 x 2 process(es)") == 1
    assert output.count("steps:   0%") == 1  # one progress bar
    assert output.count("done: steps ") == 1 and output.count("in ComfyUI  cp ") == 1
    events = list((straight / "logs").rglob("events.out.tfevents.*"))  # <time>.<host>.<pid>.<n>
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # TensorBoard written by one process

    # each step's global batch is split over the processes: different examples (here different identities)
    seen = examples(straight)
    assert sorted(seen) == [(rank, step) for rank in (0, 1) for step in range(4)]
    for step in range(4):
        assert len(seen[(0, step)]) == len(seen[(1, step)]) == 2
        assert not {i for i, _ in seen[(0, step)]} & {i for i, _ in seen[(1, step)]}, seen

    # complete checkpoints only, each with every process's RNG state and no pickle
    assert [os.path.basename(c) for c in ckpt.checkpoints(str(straight))] == ["checkpoint-2", "checkpoint-4"]
    assert not list(straight.glob("*.tmp"))
    for name in ("checkpoint-2", "checkpoint-4"):
        assert sorted(os.listdir(straight / name)) == CHECKPOINT_FILES
    state = json.loads((straight / "checkpoint-2" / ckpt.STATE_FILE).read_text())
    assert state["step"] == 2 and state["processes"] == 2

    # resume from checkpoint-2 of a copy, in which someone planted pickles that accelerate would load
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("tiny_assets", "cache", "checkpoint-2"):
        shutil.copytree(straight / name, resumed / name)
    marker = tmp_path / "pwned"
    for planted in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "random_states_1.pkl", "optimizer.bin"):
        (resumed / "checkpoint-2" / planted).write_bytes(pickle.dumps(Planted(str(marker))))
    output = torchrun(resumed, "--report_to", "none", "--resume", "latest")
    assert not marker.exists(), "resuming unpickled a planted file"
    assert output.count("resumed from") == 1 and "pickles are never loaded" in output

    # the uninterrupted run's data, export (EMA weights), EMA and optimiser state, bit for bit
    again = examples(resumed)
    assert again == {key: value for key, value in seen.items() if key[1] >= 2}
    assert_same_file(straight / "idadapter.safetensors", resumed / "idadapter.safetensors")
    for name in (ckpt.EMA_FILE, ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE, ckpt.rng_file(0), ckpt.rng_file(1)):
        assert_same_file(straight / "checkpoint-4" / name, resumed / "checkpoint-4" / name)


ADAFACE_ARGS = ["--max_steps", "4", "--expand_at_steps", "2", "--checkpoint_every", "2", "--validation_every", "0",
                "--report_to", "none", "--use_ema", "true", "--ema_decay", "0.5"]
GROWN = [f"inverter.text_model.encoder.layers.{layer}.self_attn.{proj}.{kind}"
         for layer in (0, 1) for proj in ("k_proj", "v_proj") for kind in ("weight", "bias")]


def test_two_adaface_processes_train_past_an_expansion_and_resume_exactly(tmp_path):
    straight = tmp_path / "straight"
    output = torchrun(straight, script=ADAFACE, options=ADAFACE_ARGS)
    # both processes went on after the expansion at step 2 (DDP wrapped anew around the grown parameters)
    assert output.count("step 2: expanded the inverter's keys/values (2:0-1)") == 1
    assert output.count("done: steps 0 to 4") == 1

    # the checkpoints (written after the step's expansion) and the export hold the grown inverter
    grown = {name: tensors(straight / name / ckpt.TRAINABLE_FILE)[1] for name in ("checkpoint-2", "checkpoint-4")}
    for saved in grown.values():
        for key in GROWN:
            assert saved[key].shape[0] == 2 * 768, (key, saved[key].shape)
    export = ada.load_adaface(str(straight / "adaface.safetensors"))
    assert export.config.inverter.kv_multipliers == [2, 2]
    assert export.inverter.text_model.encoder.layers[1].self_attn.v_proj.weight.shape == (2 * 768, 768)
    # steps 3 and 4 trained the grown tensors
    for key in GROWN:
        assert not torch.equal(grown["checkpoint-2"][key], grown["checkpoint-4"][key]), key

    # the processes drew different examples but averaged their gradients: both end with checkpoint-4's weights
    ranks = [tensors(straight / f"rank-{rank}.safetensors")[1] for rank in (0, 1)]
    for held in ranks:
        assert sorted(held) == sorted(grown["checkpoint-4"])
        for key, value in grown["checkpoint-4"].items():
            assert torch.equal(held[key], value), key

    # a resume from checkpoint-2 grows the fresh inverter before DDP wraps it: the uninterrupted run, bit for bit
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("tiny_assets", "cache", "checkpoint-2"):
        shutil.copytree(straight / name, resumed / name)
    output = torchrun(resumed, "--resume", "latest", script=ADAFACE, options=ADAFACE_ARGS)
    assert output.count("resumed from") == 1 and "expanded the inverter" not in output
    assert_same_file(straight / "adaface.safetensors", resumed / "adaface.safetensors")
    for name in (ckpt.EMA_FILE, ckpt.TRAINABLE_FILE, ckpt.OPTIMIZER_FILE, ckpt.rng_file(0), ckpt.rng_file(1)):
        assert_same_file(straight / "checkpoint-4" / name, resumed / "checkpoint-4" / name)
    for rank in (0, 1):
        assert_same_file(straight / f"rank-{rank}.safetensors", resumed / f"rank-{rank}.safetensors")
