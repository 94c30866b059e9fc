"""Train an AdaFace prompt inverter for the ComfyUI nodes (adaface/1 safetensors): the paper's face distillation
from Arc2Face, with dynamic model expansion (--stage face, the default), then its composition distillation
(--stage composition, from the face stage's export given as --inverter_init).

    python training/train_adaface.py --preset tiny                   # minutes on a CPU: tiny random models
    python training/train_adaface.py --preset tiny --stage composition
    accelerate launch training/train_adaface.py --base_model path/to/sd15 --arc2face path/to/Arc2Face \\
        --insightface_pack ComfyUI/models/insightface/models/antelopev2 --dataset path/to/faces --mixed_precision bf16
    accelerate launch training/train_adaface.py --stage composition --inverter_init runs/adaface/adaface.safetensors \\
        --prodigy_d_coef 0.5 --batch_size 3 --max_steps 120000 --expand_on_plateau false ...   # the paper's stage 2

Every option: --help. The export, <output_dir>/adaface.safetensors, goes into ComfyUI/models/adaface/.
"""

import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig  # noqa: E402
from comfyui_idadapter.training.cli import trainer_command_line  # noqa: E402


def task_class():
    """AdaFaceTask, imported once the options are checked: diffusers and the models' code take seconds to import."""
    from comfyui_idadapter.training.adaface_task import AdaFaceTask

    return AdaFaceTask


main, cli = trainer_command_line(AdaFaceTrainConfig, task_class, __doc__)

if __name__ == "__main__":
    sys.exit(cli())
