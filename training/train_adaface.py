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

import importlib.util
import pathlib
import sys

if not __package__:  # run as a script: import this checkout as `comfyui_idadapter` (ComfyUI owns the name `nodes`)
    _root = pathlib.Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("comfyui_idadapter", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)

from comfyui_idadapter.training.config import AdaFaceTrainConfig  # noqa: E402
from comfyui_idadapter.training.loop import trainer_command_line  # noqa: E402

main, cli = trainer_command_line(AdaFaceTrainConfig, "adaface_task", "AdaFaceTask", __doc__)

if __name__ == "__main__":
    sys.exit(cli())
