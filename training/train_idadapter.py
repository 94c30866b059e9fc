"""Train IDAdapter weights for the ComfyUI nodes (idadapter/1 safetensors).

    python training/train_idadapter.py --preset tiny                  # minutes on a CPU: tiny random models
    accelerate launch training/train_idadapter.py --base_model path/to/sd21 --clip_vision path/to/clip-vit-h \\
        --insightface_pack ComfyUI/models/insightface/models/antelopev2 --dataset path/to/identities \\
        --mixed_precision bf16 --gradient_checkpointing true

Every option: --help. The dataset layout is in the README ("Training data"). The export,
<output_dir>/idadapter.safetensors, goes into ComfyUI/models/idadapter/.
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

from comfyui_idadapter.training.config import IDAdapterTrainConfig  # noqa: E402
from comfyui_idadapter.training.loop import trainer_command_line  # noqa: E402

main, cli = trainer_command_line(IDAdapterTrainConfig, "idadapter_task", "IDAdapterTask", __doc__)

if __name__ == "__main__":
    sys.exit(cli())
