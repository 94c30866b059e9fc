"""What a run shows its user besides the progress bar: the validation images (files and TensorBoard) and the closing
summary (what it made, the evidence that it learned, where everything is)."""

from __future__ import annotations

import os


def folder_names(folders: list[str]) -> str:
    return ", ".join(os.path.basename(f) for f in folders)


def save_validation(images: list, step: int, config, accelerator) -> None:
    """Writes a validation round's images to <output_dir>/validation/ and, with TensorBoard, to its log."""
    folder = os.path.join(config.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"step{step:07d}_{i}.png"))
    if config.report_to == "tensorboard":
        import numpy as np

        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def summary(task, config, export_path: str, steps: tuple[int, int], seconds: float, before, after) -> str:
    """What a finished run made, the evidence that it learned, and where everything is."""
    first, last = steps
    lines = [f"done: steps {first} to {last} in {seconds / 60:.1f} min",
             f"  export      {export_path}", f"              {task.describe_export()}"]
    if after is not None:
        when = "before training" if first == 0 else f"at step {first}"
        lines.append(f"  held-out    {task.heldout_line(before, after, when)}")
    else:
        lines.append("  held-out    not checked: pass --heldout_dataset (identities kept out of training, same layout)")
    folder = os.path.join(config.output_dir, "validation")
    if os.path.isdir(folder):
        count = len(os.listdir(folder))
        lines.append(f"  validation  {folder}{os.sep} ({count} image{'' if count == 1 else 's'})")
    if config.report_to == "tensorboard":
        lines.append(f"  logs        tensorboard --logdir {os.path.join(config.output_dir, 'logs')}")
    lines.append(f"  in ComfyUI  cp {export_path} ComfyUI/models/{task.comfyui_folder}/")
    return "\n".join(lines)
