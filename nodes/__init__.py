"""comfyui-idadapter's graph-facing code.

Deliberately empty: ComfyUI reaches the node classes through the pack's top-level ``__init__`` (relative
imports), and trainers, benches and tests import ``comfyui_idadapter.nodes.arch`` without ComfyUI.
"""
