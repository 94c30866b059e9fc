"""The e4e encoder (nodes/arch/e4e.py): the official layout and forward, the official checkpoint, the e4e/1 format.

The full encoder (267 M parameters, 1.07 GB in float32) is built once per module with random weights; the forward at
its real input size (1 x 3 x 256 x 256) takes about a second on one core. Files that only need the official layout
(hostile files, latent_avg variants) are written with every tensor a zero-stride view of one number: torch.save
stores the one-element storage, so such a file of the full layout takes a few kilobytes.
"""

import json
import os
import struct

import pytest
import torch
import torch.nn.functional as F

from comfyui_idadapter.nodes.arch import e4e
from comfyui_idadapter.nodes.errors import ConfigError, ImageInputError, ModelFileError

OPTS = {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True,
        "dataset_type": "ffhq_encode", "lpips_lambda": 0.8, "device": "cuda:0", "progressive_steps": [0, 20000],
        "checkpoint_path": None}
# a few rosinality StyleGAN2 decoder entries, as pSp.state_dict() holds them next to the encoder's
DECODER = {"decoder.style.1.weight": (512, 512), "decoder.input.input": (1, 512, 4, 4),
           "decoder.conv1.conv.weight": (1, 512, 512, 3, 3), "decoder.noises.noise_0": (1, 1, 4, 4),
           "decoder.to_rgbs.0.bias": (1, 3, 1, 1)}


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    """The full encoder with random weights, BatchNorm statistics and PReLU slopes included."""
    torch.manual_seed(0)
    module = e4e.Encoder4Editing()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.BatchNorm2d):
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.normal_(0, 0.1)
                sub.running_mean.normal_(0, 0.1)
                sub.running_var.uniform_(0.5, 1.5)
            elif isinstance(sub, torch.nn.PReLU):
                sub.weight.uniform_(0.0, 0.5)
            elif isinstance(sub, e4e.EqualLinear):
                sub.bias.normal_(0, 0.1)
    return module.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def latent_avg():
    return torch.randn(18, 512, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def images01():
    return torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def reference(encoder, latent_avg, images01):
    """The module run directly: W+ = encoder((x - 0.5) / 0.5) + latent_avg."""
    with torch.no_grad():
        return encoder((images01 - 0.5) / 0.5) + latent_avg


@pytest.fixture(scope="module")
def layout():
    """The official encoder layout (module names -> shapes), from a meta-device module."""
    with torch.device("meta"):
        module = e4e.Encoder4Editing()
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def official_dict(state: dict, latent=None, opts=OPTS, decoder=True) -> dict:
    """A checkpoint as e4e's coach saves it: pSp.state_dict() (encoder.* + decoder.*), opts, latent_avg."""
    full = {f"encoder.{k}": v for k, v in state.items()}
    if decoder:
        one = torch.full((1,), 0.5)
        full.update({k: one.expand(shape) for k, shape in DECODER.items()})
    checkpoint = {"state_dict": full, "opts": dict(opts) if opts is not None else None}
    if opts is None:
        del checkpoint["opts"]
    if latent is not None:
        checkpoint["latent_avg"] = latent
    return checkpoint


def cheap_state(layout) -> dict:
    """The full encoder layout, every tensor a zero-stride view of one number (a few bytes on disk)."""
    one = torch.full((1,), 0.25)
    return {k: torch.zeros((), dtype=dtype) if k.endswith("num_batches_tracked") else one.expand(shape)
            for k, (shape, dtype) in layout.items()}


@pytest.fixture
def no_allocation(monkeypatch):
    """Makes building the real encoder fail: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was allocated before the file was refused")
    monkeypatch.setattr(e4e, "materialized", refuse)


# --- the network -------------------------------------------------------------------------------------------------


def test_layout_has_the_official_names_and_shapes(layout):
    shapes = {k: shape for k, (shape, _) in layout.items()}
    # written by hand from psp_encoders.py / helpers.py (reference §4.1)
    expected = {
        "input_layer.0.weight": (64, 3, 3, 3), "input_layer.1.weight": (64,), "input_layer.1.running_var": (64,),
        "input_layer.2.weight": (64,),
        # body.0: 64 -> 64, stride 2, MaxPool2d(1, 2) shortcut without parameters
        "body.0.res_layer.0.weight": (64,), "body.0.res_layer.0.running_mean": (64,),
        "body.0.res_layer.1.weight": (64, 64, 3, 3), "body.0.res_layer.2.weight": (64,),
        "body.0.res_layer.3.weight": (64, 64, 3, 3), "body.0.res_layer.4.bias": (64,),
        "body.0.res_layer.5.fc1.weight": (4, 64, 1, 1), "body.0.res_layer.5.fc2.weight": (64, 4, 1, 1),
        # body.3: 64 -> 128 with a conv shortcut
        "body.3.shortcut_layer.0.weight": (128, 64, 1, 1), "body.3.shortcut_layer.1.weight": (128,),
        "body.3.shortcut_layer.1.running_var": (128,), "body.3.res_layer.0.weight": (64,),
        "body.3.res_layer.1.weight": (128, 64, 3, 3), "body.3.res_layer.3.weight": (128, 128, 3, 3),
        "body.3.res_layer.5.fc1.weight": (8, 128, 1, 1),
        "body.7.shortcut_layer.0.weight": (256, 128, 1, 1), "body.20.res_layer.5.fc2.weight": (256, 16, 1, 1),
        "body.21.shortcut_layer.0.weight": (512, 256, 1, 1), "body.23.res_layer.3.weight": (512, 512, 3, 3),
        "body.23.res_layer.5.fc1.weight": (32, 512, 1, 1),
        # coarse (16x16: 4 stride-2 convs), middle (32x32: 5), fine (64x64: 6); convs at even indices
        "styles.0.convs.0.weight": (512, 512, 3, 3), "styles.0.convs.0.bias": (512,),
        "styles.2.convs.6.weight": (512, 512, 3, 3), "styles.3.convs.8.weight": (512, 512, 3, 3),
        "styles.6.convs.8.bias": (512,), "styles.7.convs.10.weight": (512, 512, 3, 3),
        "styles.17.convs.10.bias": (512,), "styles.0.linear.weight": (512, 512), "styles.17.linear.bias": (512,),
        "latlayer1.weight": (512, 256, 1, 1), "latlayer1.bias": (512,),
        "latlayer2.weight": (512, 128, 1, 1), "latlayer2.bias": (512,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    for absent in ("body.0.shortcut_layer.0.weight", "body.4.shortcut_layer.0.weight", "body.24.res_layer.1.weight",
                   "styles.2.convs.8.weight", "styles.6.convs.10.weight", "styles.17.convs.12.weight",
                   "styles.18.linear.weight", "input_layer.0.bias"):
        assert absent not in shapes, absent
    assert sorted({k.split(".")[1] for k in shapes if ".shortcut_layer." in k}, key=int) == ["3", "7", "21"]
    assert len({k.split(".")[1] for k in shapes if k.startswith("body.")}) == 24
    assert len({k.split(".")[1] for k in shapes if k.startswith("styles.")}) == 18
    # 52 BatchNorms: input layer, 2 per unit, 3 conv shortcuts
    assert sum(k.endswith("num_batches_tracked") for k in shapes) == 52
    assert len(shapes) == 621


def test_parameter_count(encoder):
    # computed from the layout (no count is published): IR-SE-50 body + input layer 30,950,080; the 18 style
    # heads 235,988,992 (98 convs of 2,359,808 + 18 EqualLinears of 262,656); the two lateral convs 197,632.
    # 267,136,704 float32 parameters = 1.07 GB, which with the ~30 M parameter StyleGAN2 decoder is the ~1.2 GB of
    # e4e_ffhq_encode.pt.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(encoder.input_layer) + count(encoder.body) == 30_950_080
    assert count(encoder.styles) == 98 * (512 * 512 * 9 + 512) + 18 * (512 * 512 + 512) == 235_988_992
    assert count(encoder.latlayer1) + count(encoder.latlayer2) == 197_632
    assert count(encoder) == 267_136_704


def test_forward_is_e4e(encoder, images01):
    """One forward at the real input size, checked against the reference's formulas through hooks: w_0 from the
    16x16 map repeated, offsets of styles 1-17, which map each style reads, the pyramid's upsample-add."""
    taps, inputs, outputs = {}, {}, {}
    hooks = [encoder.body[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out))
             for i in (6, 20, 23)]

    def record(k):
        def hook(module, args, out):
            inputs[k], outputs[k] = args[0], out.clone()
        return hook

    hooks += [style.register_forward_hook(record(k)) for k, style in enumerate(encoder.styles)]
    try:
        with torch.no_grad():
            w = encoder(images01 * 2 - 1)
    finally:
        for hook in hooks:
            hook.remove()
    assert w.shape == (1, 18, 512)
    c1, c2, c3 = taps[6], taps[20], taps[23]
    assert (c1.shape, c2.shape, c3.shape) == ((1, 128, 64, 64), (1, 256, 32, 32), (1, 512, 16, 16))
    assert [tuple(inputs[k].shape[2:]) for k in range(18)] == [(16, 16)] * 3 + [(32, 32)] * 4 + [(64, 64)] * 11
    with torch.no_grad():
        p2 = F.interpolate(c3, size=(32, 32), mode="bilinear", align_corners=True) + encoder.latlayer1(c2)
        p1 = F.interpolate(p2, size=(64, 64), mode="bilinear", align_corners=True) + encoder.latlayer2(c1)
    for k in range(3):
        assert inputs[k] is c3
    for k in range(3, 7):
        torch.testing.assert_close(inputs[k], p2, rtol=0, atol=0)
    for k in range(7, 18):
        torch.testing.assert_close(inputs[k], p1, rtol=0, atol=0)
    torch.testing.assert_close(w[:, 0], outputs[0], rtol=0, atol=0)
    for k in range(1, 18):
        torch.testing.assert_close(w[:, k], outputs[0] + outputs[k], rtol=0, atol=0)
    assert len(set(w[0, :, 0].tolist())) == 18  # every row got its own offset


def test_units_and_heads_follow_the_reference():
    torch.manual_seed(3)
    # EqualLinear: weight scaled by lr_mul / sqrt(in) at run time, bias by lr_mul
    linear = e4e.EqualLinear(512, 512)
    linear.bias.data.normal_()
    x = torch.randn(2, 512)
    torch.testing.assert_close(linear(x), x @ (linear.weight / 512 ** 0.5).T + linear.bias)
    # a unit that keeps its width subsamples the input as its shortcut (MaxPool2d(1, 2))
    unit = e4e.BottleneckIRSE(32, 32, 2).eval()
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), unit.res_layer(x) + x[:, :, ::2, ::2])
    # SE: x * sigmoid(fc2(relu(fc1(spatial mean))))
    se = e4e.SEModule(32)
    x = torch.randn(2, 32, 5, 5)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)
    # a style head: log2(spatial) stride-2 convs with LeakyReLU(0.01), then the EqualLinear
    head = e4e.GradualStyleBlock(16, 16, 8)
    convs = [m for m in head.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(m.stride == (2, 2) for m in convs)
    assert all(m.negative_slope == 0.01 for m in head.convs if isinstance(m, torch.nn.LeakyReLU))
    assert head(torch.randn(3, 16, 8, 8)).shape == (3, 16)


def test_input_size_is_checked(encoder):
    with pytest.raises(ImageInputError, match=r"\[B, 3, 256, 256\].*normalize_for_e4e"):
        encoder(torch.zeros(1, 3, 128, 128))


def test_normalize_for_e4e():
    x = torch.rand(2, 3, 256, 256)
    torch.testing.assert_close(e4e.normalize_for_e4e(x), x * 2 - 1)
    assert e4e.normalize_for_e4e(torch.zeros(1, 3, 256, 256)).eq(-1).all()
    assert e4e.normalize_for_e4e(torch.ones(1, 3, 256, 256)).eq(1).all()
    big = torch.rand(1, 3, 512, 512)
    out = e4e.normalize_for_e4e(big)
    assert out.shape == (1, 3, 256, 256)
    expected = F.interpolate(big, size=(256, 256), mode="bilinear", antialias=True) * 2 - 1
    torch.testing.assert_close(out, expected)
    # antialiased: a 2x2 checkerboard at 512 averages to grey at 256
    checker = ((torch.arange(512)[:, None] + torch.arange(512)[None]) % 2).float().expand(1, 3, 512, 512)
    inner = e4e.normalize_for_e4e(checker)[:, :, 1:-1, 1:-1]  # the border rows see a cut-off filter
    torch.testing.assert_close(inner, torch.zeros_like(inner), atol=1e-6, rtol=0)
    for bad in (torch.rand(1, 256, 256, 3), torch.rand(3, 256, 256), torch.zeros(0, 3, 256, 256),
                torch.full((1, 3, 256, 256), float("nan")), torch.zeros(1, 3, 256, 256, dtype=torch.uint8)):
        with pytest.raises(ImageInputError):
            e4e.normalize_for_e4e(bad)


# --- the official checkpoint and our format ----------------------------------------------------------------------


def test_official_checkpoint_round_trip_and_conversion(tmp_path, encoder, latent_avg, images01, reference):
    """The official layout saved with torch.save -> load_official_e4e -> the module's own output; converted to
    e4e/1 -> load_e4e -> the same; the converter keeps an existing file; a damaged e4e/1 file is refused."""
    pt = tmp_path / "e4e_ffhq_encode.pt"
    torch.save(official_dict(encoder.state_dict(), latent_avg), pt)
    weights = e4e.load_official_e4e(str(pt))
    assert isinstance(weights.encoder, e4e.Encoder4Editing) and not weights.encoder.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in weights.encoder.parameters())
    torch.testing.assert_close(weights.latent_avg, latent_avg, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(e4e.encode_wplus(weights, images01), reference, rtol=1e-5, atol=1e-5)
    del weights

    out = tmp_path / "models" / "wplus" / "e4e_ffhq.safetensors"
    e4e.convert_official_e4e(str(pt), str(out))
    written = out.stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already exists"):
        e4e.convert_official_e4e(str(pt), str(out))
    assert out.stat().st_mtime_ns == written
    loaded = e4e.load_e4e(str(out))
    with torch.no_grad():
        torch.testing.assert_close(e4e.encode_wplus(loaded, images01), reference, rtol=1e-5, atol=1e-5)
    del loaded

    # damage the first tensor of the data section: the loader names it
    with open(out, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        f.seek(8 + header_len + header[first]["data_offsets"][0])
        f.write(struct.pack("<f", float("nan")))
    with pytest.raises(ModelFileError, match=f"'{first}' holds NaN"):
        e4e.load_e4e(str(out))


def test_save_load_float16_and_refusals(tmp_path, encoder, latent_avg):
    weights = e4e.E4EWeights(encoder=encoder, latent_avg=latent_avg)
    path = tmp_path / "e4e_fp16.safetensors"
    e4e.save_e4e(weights, str(path), torch.float16)
    loaded = e4e.load_e4e(str(path))
    original = encoder.state_dict()
    for name, tensor in loaded.encoder.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.float32
            torch.testing.assert_close(tensor, original[name].half().float(), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(loaded.latent_avg, latent_avg.half().float(), rtol=0, atol=0)
    del loaded
    with pytest.raises(ConfigError, match="float32"):
        e4e.save_e4e(weights, str(tmp_path / "x.safetensors"), torch.bfloat16)
    with pytest.raises(ConfigError, match="latent_avg holds NaN or infinite values in torch.float16"):
        e4e.save_e4e(e4e.E4EWeights(encoder, torch.full((18, 512), 1e6)), str(tmp_path / "x.safetensors"),
                     torch.float16)
    with pytest.raises(ConfigError, match="18 styles"):
        e4e.save_e4e(e4e.E4EWeights(encoder, torch.zeros(16, 512)), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("shape", [(18, 512), (1, 512), (512,)])
def test_official_latent_avg_shapes(tmp_path, layout, shape):
    """[1, 512] and [512] broadcast to the 18 rows (the official codes + latent_avg.repeat(B, 1, 1))."""
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    pt = tmp_path / "e4e.pt"
    # the last case also without the decoder and with only the one option that must be there
    opts = {"encoder_type": "Encoder4Editing"} if shape == (512,) else OPTS
    torch.save(official_dict(cheap_state(layout), latent, opts=opts, decoder=shape != (512,)), pt)
    assert pt.stat().st_size < 1_000_000  # the zero-stride views stay one number each
    weights = e4e.load_official_e4e(str(pt))
    assert weights.latent_avg.shape == (18, 512)
    torch.testing.assert_close(weights.latent_avg, latent.reshape(-1, 512).expand(18, 512), rtol=0, atol=0)
    assert weights.encoder.styles[17].linear.weight.eq(0.25).all()


def _edit(key, value):
    return lambda c: c["state_dict"].__setitem__(key, value)


def _nan_tensor():
    t = torch.zeros(512, 512)
    t[3, 4] = float("nan")
    return t


HOSTILE_OFFICIAL = {
    "nan": (_edit("encoder.styles.5.linear.weight", _nan_tensor()),
            r"'encoder.styles.5.linear.weight' holds NaN or infinite"),
    "inf_latent": (lambda c: c.__setitem__("latent_avg", torch.full((18, 512), float("inf"))),
                   "latent_avg is not finite"),
    "wrong_shape": (_edit("encoder.styles.3.convs.8.weight", torch.zeros(1).expand(512, 512, 1, 1)),
                    r"encoder.styles.3.convs.8.weight has shape \(512, 512, 1, 1\), expected \(512, 512, 3, 3\)"),
    "restyle_input": (_edit("encoder.input_layer.0.weight", torch.zeros(1).expand(64, 6, 3, 3)),
                      r"encoder.input_layer.0.weight has shape \(64, 6, 3, 3\), expected \(64, 3, 3, 3\)"),
    "missing": (lambda c: c["state_dict"].pop("encoder.styles.17.linear.bias"),
                r"missing \['encoder.styles.17.linear.bias'\]"),
    "unexpected": (_edit("encoder.styles.18.linear.weight", torch.zeros(1).expand(512, 512)),
                   r"unexpected tensors \['encoder.styles.18.linear.weight'\]"),
    "stray_counter": (_edit("encoder.styles.0.num_batches_tracked", torch.tensor(0)),
                      r"unexpected tensors \['encoder.styles.0.num_batches_tracked'\]"),
    "integers": (_edit("encoder.latlayer1.bias", torch.zeros(512, dtype=torch.int32)), "expected floating-point"),
    "no_latent_avg": (lambda c: c.pop("latent_avg"), "has no 'latent_avg'.*10,000 random samples"),
    "latent_avg_shape": (lambda c: c.__setitem__("latent_avg", torch.zeros(17, 512)),
                         r"latent_avg is \[17, 512\], expected"),
    "decoder_only": (lambda c: c.__setitem__("state_dict", {k: v for k, v in c["state_dict"].items()
                                                             if k.startswith("decoder.")}),
                     r"holds no encoder weights \('encoder.\*'\), only \['decoder'\]"),
    "psp": (lambda c: c["opts"].__setitem__("encoder_type", "GradualStyleEncoder"), "GradualStyleEncoder.*pSp"),
    "restyle": (lambda c: c["opts"].__setitem__("encoder_type", "ProgressiveBackboneEncoder"), "ReStyle"),
    "no_opts": (lambda c: c.pop("opts"), "has no 'opts' dict.*pSp"),
    "cars": (lambda c: c["opts"].__setitem__("stylegan_size", 512), r"opts\['stylegan_size'\] is 512, expected 1024"),
    "absolute_w": (lambda c: c["opts"].__setitem__("start_from_latent_avg", False), "start_from_latent_avg"),
    "bare_state_dict": (lambda c: (c.update(c.pop("state_dict")), c.pop("opts"), c.pop("latent_avg")),
                        "has no 'state_dict'"),
    "entry_not_tensor": (_edit("encoder.latlayer2.bias", [0.0] * 512), "'encoder.latlayer2.bias' is not a named"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_OFFICIAL))
def test_official_files_that_are_not_the_e4e_encoder_are_refused(tmp_path, layout, no_allocation, case):
    edit, message = HOSTILE_OFFICIAL[case]
    checkpoint = official_dict(cheap_state(layout), torch.zeros(18, 512))
    edit(checkpoint)
    pt = tmp_path / "e4e.pt"
    torch.save(checkpoint, pt)
    with pytest.raises(ModelFileError, match=message):
        e4e.load_official_e4e(str(pt))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_official_pickle_naming_code_is_refused_unread(tmp_path, layout, no_allocation):
    marker = tmp_path / "marker"
    checkpoint = official_dict(cheap_state(layout), torch.zeros(18, 512))
    checkpoint["opts"]["hook"] = RunsACommand(marker)
    pt = tmp_path / "e4e.pt"
    torch.save(checkpoint, pt)
    with pytest.raises(ModelFileError, match=r"refused unread: the pickle names \w+\.system.*refused on purpose"):
        e4e.load_official_e4e(str(pt))
    assert not marker.exists()


def test_truncated_legacy_missing_and_foreign_official_files(tmp_path, layout, no_allocation):
    good = tmp_path / "e4e.pt"
    torch.save(official_dict(cheap_state(layout), torch.zeros(18, 512)), good)
    data = good.read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("empty.pt", b""),
                          ("text.pt", b"not a checkpoint\n" * 10)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError, match="not a PyTorch zip checkpoint: a truncated or damaged download"):
            e4e.load_official_e4e(str(tmp_path / name))
    # the zip's directory intact, bytes of a stored record overwritten
    damaged = bytearray(data)
    start = data.index(b"data.pkl") + 40
    damaged[start:start + 64] = b"\xff" * 64
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(ModelFileError, match="cannot be read as a tensors-only PyTorch file.*damaged download"):
        e4e.load_official_e4e(str(tmp_path / "damaged.pt"))
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(good, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match=r"legacy format.*torch.save\(torch.load\(old, weights_only=True\)"):
        e4e.load_official_e4e(str(legacy))
    with pytest.raises(ModelFileError, match="not found"):
        e4e.load_official_e4e(str(tmp_path / "absent.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ModelFileError, match="holds a Tensor"):
        e4e.load_official_e4e(str(tmp_path / "tensor.pt"))


def test_legacy_resave_recipe_works(tmp_path, layout):
    legacy = tmp_path / "legacy.pt"
    torch.save(official_dict(cheap_state(layout), torch.zeros(512)), legacy, _use_new_zipfile_serialization=False)
    resaved = tmp_path / "resaved.pt"
    torch.save(torch.load(legacy, weights_only=True), resaved)  # the message's recipe
    assert e4e.load_official_e4e(str(resaved)).latent_avg.shape == (18, 512)


def _our_file(path, tensors=None, **metadata):
    from safetensors.torch import save_file

    meta = {"format": "e4e/1", "family": "ffhq", "config": e4e.E4EConfig().to_json()}
    meta.update(metadata)
    save_file(tensors or {"latent_avg": torch.zeros(18, 512)}, str(path),
              metadata={k: v for k, v in meta.items() if v is not None})
    return str(path)


def _config(**changes):
    raw = json.loads(e4e.E4EConfig().to_json())
    raw.update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize("kwargs, tensors, message", [
    ({"format": "adaface/1"}, None, "has format 'adaface/1', expected 'e4e/1'"),
    ({"format": None}, None, "has format None, expected 'e4e/1'"),
    ({"family": "sd15"}, None, "family 'sd15', expected 'ffhq'"),
    ({"config": None}, None, "no 'config' field"),
    ({"config": "{"}, None, "'config' is not JSON"),
    ({"config": "[]"}, None, "expected a JSON object with exactly"),
    ({"config": _config(style_count=16)}, None, "'style_count' is 16, expected 18"),
    ({"config": _config(stylegan_size=1024.0)}, None, "'stylegan_size' is 1024.0, expected 1024"),
    ({"config": _config(extra=1)}, None, "expected a JSON object with exactly"),
    ({}, {"latent_avg": torch.zeros(18, 512, dtype=torch.int32)}, r"\['latent_avg'\] are not floating point"),
    ({}, None, r"missing \['encoder.body.0.res_layer.0.bias'"),
    ({}, {"latent_avg": torch.zeros(18, 512), "encoder.styles.18.linear.weight": torch.zeros(2)},
     r"unexpected tensors \['encoder.styles.18.linear.weight'\]"),
], ids=["format", "no_format", "family", "no_config", "bad_json", "json_list", "styles", "float_size", "extra_field",
        "integers", "missing", "unexpected"])
def test_our_files_are_checked_before_allocation(tmp_path, no_allocation, kwargs, tensors, message):
    path = _our_file(tmp_path / "e4e.safetensors", tensors, **kwargs)
    with pytest.raises(ModelFileError, match=message):
        e4e.load_e4e(path)


def test_our_loader_names_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        e4e.load_e4e(str(tmp_path / "absent.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        e4e.load_e4e(str(tmp_path / "cut.safetensors"))
