"""Train IDAdapter weights for the ComfyUI nodes (idadapter/1 safetensors).

    python training/train_idadapter.py --preset tiny                  # minutes on a CPU: tiny random models
    accelerate launch training/train_idadapter.py --base_model path/to/sd21 --clip_vision path/to/clip-vit-h \\
        --insightface_pack ComfyUI/models/insightface/models/antelopev2 --dataset path/to/identities \\
        --mixed_precision bf16 --gradient_checkpointing true

Every option: --help. The dataset layout is in the README ("Training data"). The export,
<output_dir>/idadapter.safetensors, goes into ComfyUI/models/idadapter/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import loop  # noqa: E402
from training.config import ConfigError, IDAdapterTrainConfig, parse_args  # noqa: E402
from training.idadapter_task import IDAdapterTask  # noqa: E402


def main(argv=None) -> str:
    config = parse_args(IDAdapterTrainConfig, argv, description=__doc__)
    return loop.run(IDAdapterTask(config), config)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError) as exc:  # a bad config or dataset: the message says what to fix
        sys.exit(f"error: {exc}")
