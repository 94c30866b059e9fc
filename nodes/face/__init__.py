"""Face detection, alignment and ArcFace embedding (insightface + onnxruntime, imported lazily)."""
