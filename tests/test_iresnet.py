import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from comfyui_idadapter.nodes.arch import iresnet
from comfyui_idadapter.nodes.errors import ImageInputError, ModelFileError
from tiny_face_models import make_recognizer, random_iresnet


def test_published_layouts_have_arcface_torch_parameter_names():
    net = iresnet.IResNet(iresnet.IRESNET_LAYERS["r50"])
    names = set(net.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight",
                "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight", "layer1.0.conv2.weight",
                "layer1.0.bn3.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
                "layer3.13.conv2.weight", "bn2.weight", "fc.weight", "fc.bias", "features.running_mean"):
        assert key in names, key
    assert "layer3.14.conv1.weight" not in names
    assert net.fc.weight.shape == (512, 512 * 7 * 7)
    assert net.layer2[0].conv1.weight.shape == (128, 64, 3, 3)
    assert sum(p.numel() for p in net.parameters()) > 40e6  # r50 is ~43.6M parameters


def test_pth_backbone_loads_with_prefixes_and_gives_same_output(tmp_path):
    net = random_iresnet(1)
    path = tmp_path / "backbone.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)  # DDP-style prefix
    loaded = iresnet.load_arcface(str(path))
    assert loaded.arch == {"layers": [1, 1, 1, 1], "widths": [8, 16, 16, 32], "num_features": 512, "fused": False}
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_pth_that_is_not_a_backbone_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError, match="not an arcface_torch IResNet"):
        iresnet.load_arcface(str(path))
    truncated = tmp_path / "truncated.pth"
    torch.save(random_iresnet(0).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="tensors-only PyTorch file"):
        iresnet.load_arcface(str(truncated))


def test_pth_with_code_is_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelFileError, match="tensors-only"):
        iresnet.load_arcface(str(path))


def test_onnx_import_matches_onnxruntime(tmp_path):
    path = make_recognizer(str(tmp_path / "rec.onnx"), seed=3)
    net = iresnet.load_arcface(path)
    assert net.fused and net.arch["layers"] == [1, 1, 1, 1]
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    reference = torch.from_numpy(session.run(None, {"data": x.numpy()})[0])
    with torch.no_grad():
        ours = net(x)
    cos = F.cosine_similarity(ours, reference)
    assert cos.min() > 0.9999, cos
    assert ((ours - reference).norm() / reference.norm()) < 1e-5
    # and the fused module equals the unfused one it was exported from
    with torch.no_grad():
        unfused = random_iresnet(3)(x)
    assert ((ours - unfused).norm() / unfused.norm()) < 1e-5


def test_onnx_import_infers_deeper_stages(tmp_path):
    from tiny_face_models import export_onnx

    net = random_iresnet(5, layers=(2, 3, 1, 2), widths=(8, 8, 16, 16))
    path = export_onnx(net, str(tmp_path / "deep.onnx"), torch.zeros(1, 3, 112, 112))
    imported = iresnet.load_arcface(path)
    assert imported.arch["layers"] == [2, 3, 1, 2] and imported.arch["widths"] == [8, 8, 16, 16]
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert F.cosine_similarity(imported(x), net(x)).item() > 0.9999


def test_gradient_reaches_the_input(tmp_path):
    net = iresnet.load_arcface(make_recognizer(str(tmp_path / "rec.onnx")))
    for p in net.parameters():
        p.requires_grad_(False)
    faces = torch.rand(2, 3, 112, 112, requires_grad=True)
    target = F.normalize(torch.randn(2, 512), dim=-1)
    loss = (1 - F.cosine_similarity(net(iresnet.to_arcface_input(faces)), target)).mean()
    loss.backward()
    assert faces.grad is not None and torch.isfinite(faces.grad).all()
    assert faces.grad.abs().sum() > 0


def test_corrupt_and_foreign_onnx_files_are_rejected(tmp_path):
    corrupt = tmp_path / "rec.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ModelFileError, match="not a readable ONNX file"):
        iresnet.load_arcface(str(corrupt))
    from tiny_face_models import make_detector

    detector = make_detector(str(tmp_path / "det.onnx"))
    with pytest.raises(ModelFileError, match="does not look like an ArcFace IResNet"):
        iresnet.load_arcface(detector)
    with pytest.raises(ModelFileError, match="not found"):
        iresnet.load_arcface(str(tmp_path / "missing.onnx"))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ImageInputError, match=r"\[B, 3, 112, 112\]"):
        random_iresnet(0)(torch.zeros(1, 3, 128, 128))
