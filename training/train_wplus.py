"""Train a W+ adapter for the ComfyUI nodes (wplus/1 safetensors): stage I aligns e4e's StyleGAN W+ codes with the
UNet on aligned faces (--stage 1, the default), stage II teaches it in-the-wild photos with captions while W+ edits
leave everything but the face alone (--stage 2, from stage I's export given as --adapter_init).

    python training/train_wplus.py --preset tiny                   # minutes on a CPU: tiny random models
    python training/train_wplus.py --preset tiny --stage 2 --adapter_init runs/wplus/wplus_adapter.safetensors \\
        --output_dir runs/wplus-stage2
    accelerate launch training/train_wplus.py --base_model path/to/sd15 --e4e ComfyUI/models/wplus/e4e_ffhq_encode.pt \\
        --insightface_pack ComfyUI/models/insightface/models/antelopev2 --dataset path/to/ffhq --mixed_precision fp16
    accelerate launch training/train_wplus.py --stage 2 --adapter_init runs/wplus/wplus_adapter.safetensors \\
        --dataset path/to/wild-photos --output_dir runs/wplus-stage2 ...

Every option: --help. The export, <output_dir>/wplus_adapter.safetensors, goes into ComfyUI/models/wplus/.
"""

import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

from comfyui_idadapter.training.cli import trainer_command_line  # noqa: E402
from comfyui_idadapter.training.wplus_config import WPlusTrainConfig  # noqa: E402


def task_class():
    """WPlusTask, imported once the options are checked: diffusers and the models' code take seconds to import."""
    from comfyui_idadapter.training.wplus_task import WPlusTask

    return WPlusTask


main, cli = trainer_command_line(WPlusTrainConfig, task_class, __doc__)

if __name__ == "__main__":
    sys.exit(cli())
