"""Generate images with an IDAdapter file and measure the paper's metrics: ID-Sim, the face-detection rate, Pose-Div
pitch and yaw, and CLIP-T with --clip_model.

    python training/evaluate_idadapter.py --preset tiny               # tiny random models, an untrained adapter
    python training/evaluate_idadapter.py --adapter runs/ida/idadapter.safetensors --base_model path/to/sd21 \\
        --clip_vision path/to/clip-vit-h --insightface_pack ComfyUI/models/insightface/models/antelopev2 \\
        --references photos/person1 --prompts prompts.txt --clip_model path/to/clip-vit-large-patch14

Writes <output_dir>/metrics.json, metrics.md and the images (images/). Every option: --help; what each metric
measures: docs/idadapter.md ("Evaluating an IDAdapter").
"""

import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

from comfyui_idadapter.training.cli import exit_code, parse_args  # noqa: E402
from comfyui_idadapter.training.idadapter_config import IDAdapterEvalConfig  # noqa: E402


def main(argv=None) -> dict:
    """Checks every option, then evaluates; returns metrics.json's content."""
    config = parse_args(IDAdapterEvalConfig, argv, description=__doc__)
    from comfyui_idadapter.training.idadapter_eval import evaluate  # the heavy imports, once the options are good

    return evaluate(config)


def cli(argv=None) -> int:
    return exit_code(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
