"""training/train_adaface.py's run for torchrun, after which every process writes the trained tensors it holds to
<output_dir>/rank-<rank>.safetensors: what tests/test_trainer_multiprocess.py compares across the processes (rank 0
alone writes the checkpoints and the export)."""

import os
import sys

import pack_import  # noqa: F401  (first: the pack as `comfyui_idadapter`)
from safetensors.torch import save_file

from comfyui_idadapter.training import cli
from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig
from comfyui_idadapter.training.adaface_task import AdaFaceTask

built = []


def make_task(config, log):
    built.append(AdaFaceTask(config, log=log))
    return built[-1]


if __name__ == "__main__":
    cli.train_from_command_line(AdaFaceTrainConfig, make_task, sys.argv[1:], __doc__)
    task = built[-1]
    state = {k: v.detach().cpu().contiguous() for k, v in task.trainable_state().items()}
    save_file(state, os.path.join(task.config.output_dir, f"rank-{task.accelerator.process_index}.safetensors"))
