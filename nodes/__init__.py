"""comfyui-idadapter's graph-facing code.

Deliberately empty: trainers import ``nodes.arch`` and ``nodes.face`` without ComfyUI, and ComfyUI
reaches the node classes only through the pack's top-level ``__init__`` (relative imports).
"""
