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


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The trainer's tiny preset: models, face pack, synthetic dataset and held-out set, built once per test run
    (base UNet pretraining included); copy it into a run's output folder as ``tiny_assets``."""
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training.cli import parse_args
    from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    out = tmp_path_factory.mktemp("assets")
    IDAdapterTask(parse_args(IDAdapterTrainConfig, ["--preset", "tiny", "--output_dir", str(out)]), log=lambda *a: None)
    return out / "tiny_assets"
