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

import importlib.util
import pathlib
import sys

if not __package__:  # run as a script: import this checkout as `comfyui_idadapter` (ComfyUI owns the name `nodes`)
    _root = pathlib.Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("comfyui_idadapter", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)

from comfyui_idadapter.training.config import WPlusTrainConfig  # noqa: E402
from comfyui_idadapter.training.loop import trainer_command_line  # noqa: E402

main, cli = trainer_command_line(WPlusTrainConfig, "wplus_task", "WPlusTask", __doc__)

if __name__ == "__main__":
    sys.exit(cli())
