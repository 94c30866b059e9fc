"""Train IDAdapter weights for the ComfyUI nodes (idadapter/1 safetensors).

    python training/train_idadapter.py --preset tiny                  # minutes on a CPU: tiny random models
    accelerate launch training/train_idadapter.py --base_model path/to/sd21 --clip_vision path/to/clip-vit-h \\
        --insightface_pack ComfyUI/models/insightface/models/antelopev2 --dataset path/to/identities \\
        --mixed_precision bf16 --gradient_checkpointing true

Every option: --help. The dataset layout: docs/training.md ("Training data"). The export,
<output_dir>/idadapter.safetensors, goes into ComfyUI/models/idadapter/.
"""

import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

from comfyui_idadapter.training.cli import trainer_command_line  # noqa: E402
from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig  # noqa: E402


def task_class():
    """IDAdapterTask, imported once the options are checked: diffusers and the models' code take seconds to import."""
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    return IDAdapterTask


main, cli = trainer_command_line(IDAdapterTrainConfig, task_class, __doc__)

if __name__ == "__main__":
    sys.exit(cli())
