"""The main job as a newcomer runs it, `python training/train_idadapter.py --preset tiny`: nothing alarming that the
project causes, and a closing summary that says what was made, that it learned, and where everything is."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_prints_no_warnings_and_ends_with_a_summary(tmp_path, tiny_assets):
    out = tmp_path / "run"
    shutil.copytree(tiny_assets, out / "tiny_assets")
    env = dict(os.environ, PYTHONWARNINGS="default")  # show every warning once, as a fresh interpreter would
    result = subprocess.run([sys.executable, os.path.join(REPO, "training", "train_idadapter.py"), "--preset", "tiny",
                             "--output_dir", str(out), "--max_steps", "4", "--checkpoint_every", "4",
                             "--validation_every", "4"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (result.stdout + result.stderr).replace(str(tmp_path), "<tmp>")  # the test's own name has "warning" in it
    alarming = [line for line in text.splitlines() if re.search(r"warn|deprecat|traceback|error", line, re.I)]
    assert not alarming, alarming

    summary = result.stdout[result.stdout.index("done: steps 0 to 4"):].splitlines()
    export = out / "idadapter.safetensors"
    assert summary[1].split() == ["export", str(export)] and export.is_file()
    assert "tiny test UNet only" in summary[2]
    held_out = re.fullmatch(r"  held-out    denoising loss with the right identity (\d\.\d{4}) vs another's (\d\.\d{4}) "
                            r"\((-?\d+\.\d) % lower\); before training: (\d\.\d{4}) vs (\d\.\d{4})", summary[3])
    assert held_out, summary[3]
    right, other = float(held_out[1]), float(held_out[2])
    assert float(held_out[3]) == pytest.approx(100 * (1 - right / other), abs=0.06)
    assert summary[4] == f"  validation  {out / 'validation'}{os.sep} (1 image)"
    assert summary[5] == f"  logs        tensorboard --logdir {out / 'logs'}"
    assert summary[6] == f"  in ComfyUI  cp {export} ComfyUI/models/idadapter/"
    assert len(summary) == 7
