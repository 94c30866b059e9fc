import pytest
import torch

from idadapter_helpers import tiny_adapter, tiny_config
from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.arch.unet_blocks import BlockSpec
from comfyui_idadapter.nodes.errors import ModelFileError


def test_untrained_adapter_is_identity_and_beta_scales_residual():
    weights = tiny_adapter(gamma=0.0)
    block = weights.adapter.adapters["input_1_0"]
    y = torch.randn(2, 16, 32)
    tokens = torch.randn(2, 4, 24)
    assert torch.equal(block(y, tokens, beta=1.0), y)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    r1 = block(y, tokens, beta=1.0) - y
    r3 = block(y, tokens, beta=3.0) - y
    assert r1.abs().max() > 1e-3
    torch.testing.assert_close(r3, 3 * r1, rtol=1e-5, atol=1e-6)


def test_residual_is_self_attention_over_y_and_tokens():
    weights = tiny_adapter(gamma=0.5)
    block = weights.adapter.adapters["input_1_0"]
    y, tokens = torch.randn(1, 9, 32), torch.randn(1, 4, 24)
    # reference: full self-attention over [y, proj(E_r)] with a plain softmax, first len(y) rows kept
    h = block.norm(torch.cat([y, block.proj(tokens)], 1))
    q, k, v = block.attn.to_q(h), block.attn.to_k(h), block.attn.to_v(h)
    heads, d = block.attn.heads, 16
    split = lambda t: t.reshape(1, -1, heads, d).transpose(1, 2)
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, -1) @ split(v)
    full = block.attn.to_out(attn.transpose(1, 2).reshape(1, -1, 32))[:, :9]
    torch.testing.assert_close(block.residual(y, tokens), torch.tanh(block.gamma) * full, rtol=1e-5, atol=1e-6)


def test_mff_token_count_does_not_grow_with_references():
    adapter = tiny_adapter().adapter
    for n in (1, 4, 6):
        e_r, e_c = adapter.encode(torch.randn(2, n, 10, 48), torch.randn(2, 512), torch.randn(2, 48))
        assert e_r.shape == (2, 4, 24)
        assert set(e_c) == {"l"} and e_c["l"].shape == (2, 768)
    # the ArcFace token matters
    patches = torch.randn(1, 4, 10, 48)
    a, _ = adapter.encode(patches, torch.randn(1, 512), torch.randn(1, 48))
    b, _ = adapter.encode(patches, torch.randn(1, 512), torch.randn(1, 48))
    assert (a - b).abs().max() > 1e-4


def test_text_dims_per_family():
    assert ida.IDAdapter(tiny_config("sd21")).textual(torch.randn(1, 48))["h"].shape == (1, 1024)
    sdxl = ida.IDAdapter(tiny_config("sdxl")).textual(torch.randn(1, 48))
    assert sdxl["g"].shape == (1, 1280) and sdxl["l"].shape == (1, 768)


def test_round_trip_gives_identical_outputs(tmp_path):
    weights = tiny_adapter(gamma=0.3)
    path = str(tmp_path / "ida.safetensors")
    ida.save_idadapter(weights, path)
    loaded = ida.load_idadapter(path)
    assert loaded.config == weights.config
    inputs = (torch.randn(1, 4, 10, 48), torch.randn(1, 512), torch.randn(1, 48))
    e_r, e_c = weights.adapter.encode(*inputs)
    e_r2, e_c2 = loaded.adapter.encode(*inputs)
    assert torch.equal(e_r, e_r2) and torch.equal(e_c["l"], e_c2["l"])
    y = torch.randn(1, 16, 32)
    assert torch.equal(weights.adapter.adapters["input_1_0"](y, e_r), loaded.adapter.adapters["input_1_0"](y, e_r))
    for name, deltas in weights.kv_deltas.items():
        for proj, delta in deltas.items():
            assert torch.equal(loaded.kv_deltas[name][proj], delta)
    assert not list(tmp_path.glob("*.tmp*"))


def test_loader_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelFileError, match=r"format None, expected 'idadapter/1' \(IDAdapter file"):
        ida.load_idadapter(str(other))
    path = str(tmp_path / "ida.safetensors")
    weights = tiny_adapter()
    ida.save_idadapter(weights, path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["mff.proj_out.weight"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match=r"missing \['mff.proj_out.weight'\]"):
        ida.load_idadapter(str(tmp_path / "cut.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        ida.load_idadapter(str(tmp_path / "corrupt.safetensors"))


def test_unet_compatibility_errors_name_both_sides():
    cfg = tiny_config("sd21")
    sd15_unet = {k: BlockSpec(v.channels, v.heads, 768) for k, v in cfg.blocks.items()}
    with pytest.raises(ModelFileError, match=r"trained for sd21 \(context 1024\); the MODEL is sd15 \(context 768\)"):
        ida.check_unet_compatible(cfg, sd15_unet)
    sd21_small = {"input_1_0": BlockSpec(32, 2, 1024)}
    with pytest.raises(ModelFileError, match="does not have"):
        ida.check_unet_compatible(cfg, sd21_small)
    wide = {k: BlockSpec(v.channels * 2, v.heads, 1024) for k, v in cfg.blocks.items()}
    with pytest.raises(ModelFileError, match="the adapter has 32 channels, the MODEL has 64"):
        ida.check_unet_compatible(cfg, wide)
    ida.check_unet_compatible(cfg, {k: BlockSpec(v.channels, v.heads, 1024) for k, v in cfg.blocks.items()})


def test_augmentation_is_seeded_and_keeps_originals():
    refs = torch.rand(1, 3, 32, 32)
    a = ida.augment_references(refs, 4, seed=1)
    b = ida.augment_references(refs, 4, seed=1)
    c = ida.augment_references(refs, 4, seed=2)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], refs[0])
    assert all((a[i] - refs[0]).abs().mean() > 1e-3 for i in range(1, 4))
    assert a.min() >= 0 and a.max() <= 1
    five = torch.rand(5, 3, 8, 8)
    assert torch.equal(ida.augment_references(five, 4, 0), five[:4])


def test_reference_crop_is_a_square_around_the_face_inside_the_photo():
    image = torch.zeros(3, 100, 160)
    image[:, 40:60, 100:120] = 1.0  # a 20 x 20 "face"
    box = torch.tensor([100.0, 40.0, 120.0, 60.0])
    crop = ida.reference_crop(image, box, 0.5, 40)  # side 20 x (1 + 2 x 0.5) = 40: no resize
    assert crop.shape == (3, 40, 40) and torch.equal(crop, image[:, 30:70, 90:130])
    edge = ida.reference_crop(image, torch.tensor([140.0, 0.0, 160.0, 20.0]), 0.5, 40)  # would stick out: moved in
    assert torch.equal(edge, image[:, 0:40, 120:160])
    whole = ida.reference_crop(image, box, 4.0, 100)  # 180 px wanted, the photo's short side is 100
    assert torch.equal(whole, image[:, :, 60:160])  # centred on the face (x 110), inside the photo
    resized = ida.reference_crop(image, box, 0.5, 224)
    assert resized.shape == (3, 224, 224) and resized[:, 112, 112].min() > 0.9 and resized[:, 5, 5].abs().max() < 0.05
    # no margin: the whole photo's centre square, exactly what clip_vision_preprocess shows CLIP
    photo = torch.rand(3, 100, 160, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ida.clip_vision_preprocess(ida.reference_crop(photo, None, None, 64)[None], 64),
                               ida.clip_vision_preprocess(photo[None], 64), rtol=0, atol=0)
