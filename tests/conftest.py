import os

import pytest

import pack_import  # noqa: F401  (first: the pack as `comfyui_idadapter`)
import tiny_face_models


@pytest.fixture(scope="session")
def insightface_root(tmp_path_factory):
    """A ``models/insightface`` folder holding one tiny pack, ``models/tinypack``."""
    root = str(tmp_path_factory.mktemp("insightface"))
    tiny_face_models.make_pack(root, "tinypack")
    return root


@pytest.fixture(scope="session")
def analyzer(insightface_root):
    from comfyui_idadapter.nodes.face import insightface_backend as backend

    return backend.load_analyzer(os.path.join(insightface_root, "models", "tinypack"), "CPU", 640)
