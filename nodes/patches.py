"""ComfyUI-side patch objects: the only module that knows ComfyUI's patch call signatures.

The adapter nodes (IDAdapter, W+) put their patch objects here; the face foundation needs none yet.
"""
