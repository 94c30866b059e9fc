"""The trainers' shared pieces. Imported as ``comfyui_idadapter.training`` (see the trainers' entry scripts), so
that they can share one process with ComfyUI, whose own top-level module is called ``nodes``."""
