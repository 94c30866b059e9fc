"""The IDAdapter trainer with two processes (torchrun, CPU, gloo DDP): each process trains on its own examples,
one process prints and writes the shared files, checkpoints are complete and pickle-free, and a resume (from a
folder holding planted malicious pickles) gives the uninterrupted run's export and EMA."""

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

from comfyui_idadapter.training import checkpoint as ckpt  # noqa: E402
from comfyui_idadapter.training import loop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def torchrun(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "training", "train_idadapter.py"), "--preset", "tiny", "--output_dir", str(out), *ARGS,
           *args]
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
    assert [os.path.basename(c) for c in loop.checkpoints(str(straight))] == ["checkpoint-2", "checkpoint-4"]
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
