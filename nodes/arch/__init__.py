"""Pure torch: the adapters' math, ArcFace, file formats. Never imports comfy, folder_paths or diffusers."""
