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

from comfyui_idadapter.nodes.errors import PackError  # noqa: E402
from comfyui_idadapter.training.config import IDAdapterTrainConfig, parse_args  # noqa: E402


def main(argv=None) -> str:
    config = parse_args(IDAdapterTrainConfig, argv, description=__doc__)  # every option checked, before heavy imports
    from comfyui_idadapter.training import loop, outdir
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    accelerator = loop.make_accelerator(config)
    say = loop.main_print(accelerator)
    # one run per output folder, and a writable one: checked before anything heavy is built or loaded
    with outdir.hold(config.output_dir, accelerator, log=say):
        # the main process builds what the others then read (tiny assets, the face cache), and reports the dataset once
        with accelerator.main_process_first():
            task = IDAdapterTask(config, log=say)
        return loop.run(task, config, accelerator)


def cli(argv=None) -> int:
    try:
        main(argv)
    except PackError as exc:  # a bad config, dataset or model file: the message says what to fix
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
