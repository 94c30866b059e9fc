"""W+ adapter modules and files (nodes/arch/wplus.py) against the official layout (official-checkpoints.md §3)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from comfyui_idadapter.nodes.arch import wplus
from comfyui_idadapter.nodes.arch.unet_blocks import BlockSpec, sdpa_attention
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError

SD15_CHANNELS = (320, 640, 1280, 1280)
CONTEXT = 768


def official_state(seed=0, dtype=torch.float32):
    """An official-layout file's content built from §3.2: w_proj (proj_0..3 bias-free, LayerNorm 768) and
    to_q/k/v_wplus for the odd processor indices 1..31 with SD1.5's per-layer widths."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.02: (torch.randn(*shape, generator=gen) * std).to(dtype)
    w_proj = {f"proj_{k}.weight": rand(CONTEXT, 512 * n) for k, n in enumerate((4, 4, 4, 6))}
    w_proj["norm.weight"] = (1 + rand(CONTEXT, std=0.1)).to(dtype)
    w_proj["norm.bias"] = rand(CONTEXT, std=0.1)
    widths = {1: 320, 3: 320, 5: 640, 7: 640, 9: 1280, 11: 1280, 13: 1280, 15: 1280, 17: 1280,
              19: 640, 21: 640, 23: 640, 25: 320, 27: 320, 29: 320, 31: 1280}  # §3.2's table
    adapter = {}
    for index, c in widths.items():
        adapter[f"{index}.to_q_wplus.weight"] = rand(c, c, std=c ** -0.5)
        adapter[f"{index}.to_k_wplus.weight"] = rand(c, CONTEXT, std=CONTEXT ** -0.5)
        adapter[f"{index}.to_v_wplus.weight"] = rand(c, CONTEXT, std=CONTEXT ** -0.5)
    return {"w_proj": w_proj, "wplus_adapter": adapter}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    state = official_state()
    path = str(tmp_path_factory.mktemp("official") / "wplus_adapter.bin")
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def loaded(official):
    return wplus.load_official_wplus(official[1])


def reference_w_proj(state, w):
    """The official WProjModel.forward, written out."""
    b = w.shape[0]
    ends = [0, 4, 8, 12, 18]
    tokens = [F.linear(w[:, ends[k]:ends[k + 1], :].reshape(b, -1), state[f"proj_{k}.weight"]).unsqueeze(1)
              for k in range(4)]
    return F.layer_norm(torch.cat(tokens, 1), (CONTEXT,), state["norm.weight"], state["norm.bias"])


def reference_processor(x, text, w_tokens, base, wq, wk, wv, heads, scale):
    """The official WPlusAttnProcessor (the non-SDPA variant): head_to_batch_dim, softmax(QK^T * d^-0.5), bmm;
    the W+ query from the text attention's output h; to_out applied to h + scale * hw."""
    b, _, c = x.shape
    d = c // heads

    def to_batch(t):
        return t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)

    def to_heads(t):
        return t.reshape(b, heads, -1, d).permute(0, 2, 1, 3).reshape(b, -1, c)

    def attend(q, k, v):
        probs = torch.softmax(torch.bmm(to_batch(q), to_batch(k).transpose(1, 2)) * d ** -0.5, dim=-1)
        return to_heads(torch.bmm(probs, to_batch(v)))

    h = attend(F.linear(x, base["to_q"]), F.linear(text, base["to_k"]), F.linear(text, base["to_v"]))
    hw = attend(F.linear(h, wq), F.linear(w_tokens, wk), F.linear(w_tokens, wv))
    return F.linear(h + scale * hw, base["to_out"], base["to_out_bias"])


def test_official_file_loads_into_our_modules_with_the_same_numbers(official, loaded):
    state, _ = official
    assert loaded.source == "official" and loaded.config.family == "sd15"
    adapter = loaded.adapter
    assert next(adapter.parameters()).dtype == torch.float32 and not next(adapter.parameters()).requires_grad
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 18, 512, generator=gen) * 0.5
    torch.testing.assert_close(adapter.tokens(w), reference_w_proj(state["w_proj"], w), rtol=1e-5, atol=1e-5)
    # the unconditional tokens (projection of a zero W+) are norm.bias repeated
    torch.testing.assert_close(adapter.uncond_tokens(w), state["w_proj"]["norm.bias"].expand(2, 4, -1))
    tokens = adapter.tokens(w)
    assert len(adapter.layers) == 16
    for index, name, channels in wplus.OFFICIAL_SD15_LAYERS:
        layer = adapter.layers[name]
        for projection in wplus.PROJECTIONS:
            official_weight = state["wplus_adapter"][f"{index}.{projection}.weight"]
            assert torch.equal(getattr(layer, projection).weight, official_weight)
        assert layer.heads == 8 and layer.to_q_wplus.weight.shape == (channels, channels)
        base = {"to_q": torch.randn(channels, channels, generator=gen) * channels ** -0.5,
                "to_k": torch.randn(channels, CONTEXT, generator=gen) * CONTEXT ** -0.5,
                "to_v": torch.randn(channels, CONTEXT, generator=gen) * CONTEXT ** -0.5,
                "to_out": torch.randn(channels, channels, generator=gen) * channels ** -0.5,
                "to_out_bias": torch.randn(channels, generator=gen) * 0.1}
        x = torch.randn(2, 16, channels, generator=gen)
        text = torch.randn(2, 77, CONTEXT, generator=gen)
        wq, wk, wv = (state["wplus_adapter"][f"{index}.{p}.weight"] for p in wplus.PROJECTIONS)
        expected = reference_processor(x, text, tokens, base, wq, wk, wv, heads=8, scale=0.7)
        q, k, v = F.linear(x, base["to_q"]), F.linear(text, base["to_k"]), F.linear(text, base["to_v"])
        ours = F.linear(layer.after_text_attention(q, k, v, tokens, scale=0.7), base["to_out"], base["to_out_bias"])
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        # one set of W+ tokens serves the whole batch
        one = layer(sdpa_attention(q, k, v, 8), tokens[:1], 0.7)
        torch.testing.assert_close(one[:1], layer(sdpa_attention(q, k, v, 8), tokens, 0.7)[:1])


def test_scale_zero_is_exactly_the_text_attention_and_scale_is_linear(loaded):
    layer = loaded.adapter.layers["input_4_0"]
    h, tokens = torch.randn(2, 9, 640), torch.randn(1, 4, CONTEXT)
    assert layer(h, tokens, 0.0) is h
    q, k, v = torch.randn(2, 9, 640), torch.randn(2, 77, 640), torch.randn(2, 77, 640)
    assert torch.equal(layer.after_text_attention(q, k, v, tokens, scale=0.0), sdpa_attention(q, k, v, 8))
    r1, r3 = layer(h, tokens, 1.0) - h, layer(h, tokens, 3.0) - h
    assert r1.abs().max() > 1e-3
    torch.testing.assert_close(r3, 3 * r1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r1, layer.residual(h, tokens), rtol=1e-4, atol=1e-5)
    # a caller's attention kernel and head count are used (ComfyUI passes optimized_attention and n_heads)
    seen = []
    layer.residual(h, tokens, attention=lambda q, k, v, heads: seen.append(heads) or q, heads=5)
    assert seen == [5]
    with pytest.raises(ConfigError, match="3 sets of W\\+ tokens for a batch of 2"):
        layer.residual(h, torch.randn(3, 4, CONTEXT))


def diffusers_sd15_layout_unet():
    """A diffusers UNet with SD1.5's block layout (3 cross-attention down blocks, a plain one, a plain up block,
    3 cross-attention up blocks, 2 layers per block, 8 heads, context 768) at 1/20 of its widths."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=tuple(c // 20 for c in SD15_CHANNELS), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8)


def official_hidden_size(name):
    """The official set_wplus_adapter's hidden size for a processor name, with SD1.5's block_out_channels."""
    if name.startswith("mid_block"):
        return SD15_CHANNELS[-1]
    if name.startswith("up_blocks"):
        return list(reversed(SD15_CHANNELS))[int(name[len("up_blocks.")])]
    return SD15_CHANNELS[int(name[len("down_blocks.")])]


def test_index_table_matches_diffusers_attn_processor_order():
    from comfyui_idadapter.training.diffusers_binding import transformer_blocks

    unet = diffusers_sd15_layout_unet()
    pack_name_of_attn2 = {id(block.attn2): name for name, block in transformer_blocks(unet).items()}
    names = list(unet.attn_processors)
    assert len(names) == 32
    for position, processor_name in enumerate(names):
        attention = unet.get_submodule(processor_name[: -len(".processor")])
        if position % 2 == 0:
            assert processor_name.endswith("attn1.processor") and position not in wplus.OFFICIAL_INDEX_TO_BLOCK
            continue
        assert processor_name.endswith("attn2.processor"), processor_name
        block = wplus.OFFICIAL_INDEX_TO_BLOCK[position]
        assert pack_name_of_attn2[id(attention)] == block, (position, processor_name)
        channels = dict((n, c) for _, n, c in wplus.OFFICIAL_SD15_LAYERS)[block]
        assert attention.to_q.in_features * 20 == channels == official_hidden_size(processor_name)
        assert attention.heads == wplus.SD15_HEADS and attention.to_k.in_features == CONTEXT
    assert {wplus.BLOCK_TO_OFFICIAL_INDEX[b]: b for b in wplus.BLOCK_TO_OFFICIAL_INDEX} == wplus.OFFICIAL_INDEX_TO_BLOCK
    assert "mid_block" in names[31] and names[13].startswith("up_blocks.1.")

    # the official loader's own indexing: ModuleList(unet.attn_processors.values()) with a W+ processor on every
    # attn2 and a parameter-free one on every attn1 gives the keys "<index>.to_q_wplus.weight"... of the file
    class Plain(torch.nn.Module):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            raise AssertionError("not run")

    class WPlusProcessor(Plain):
        def __init__(self, hidden, context):
            super().__init__()
            self.to_k_wplus = torch.nn.Linear(context, hidden, bias=False)
            self.to_v_wplus = torch.nn.Linear(context, hidden, bias=False)
            self.to_q_wplus = torch.nn.Linear(hidden, hidden, bias=False)

    unet.set_attn_processor({
        name: Plain() if name.endswith("attn1.processor")
        else WPlusProcessor(unet.get_submodule(name[: -len(".processor")]).to_q.in_features, CONTEXT)
        for name in names})
    keys = torch.nn.ModuleList(unet.attn_processors.values()).state_dict()
    tiny = {index: channels // 20 for index, _, channels in wplus.OFFICIAL_SD15_LAYERS}
    assert {k: tuple(v.shape) for k, v in keys.items()} == {
        f"{i}.{p}.weight": (c, c) if p == "to_q_wplus" else (c, CONTEXT) for i, c in tiny.items()
        for p in wplus.PROJECTIONS}


def test_wplus1_save_load_and_convert_are_identical(official, loaded, tmp_path):
    state, bin_path = official
    path = str(tmp_path / "wplus.safetensors")
    wplus.save_wplus_adapter(loaded, path)
    again = wplus.load_wplus_adapter(path)
    assert again.source == "wplus/1"
    ours, theirs = loaded.adapter.state_dict(), again.adapter.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    w = torch.randn(1, 18, 512)
    assert torch.equal(again.adapter.tokens(w), loaded.adapter.tokens(w))
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "wplus/1" and meta["family"] == "sd15"
    assert json.loads(meta["config"])["blocks"]["output_3_0"] == {"channels": 1280, "heads": 8, "context_dim": 768}
    # back to the official layout: the very tensors of the file
    back = wplus.to_official_state(again)
    assert all(torch.equal(back[g][k], state[g][k]) for g in state for k in state[g])
    assert all(back[g].keys() == state[g].keys() for g in ("w_proj", "wplus_adapter"))
    # the converter; it does not overwrite unless told to
    out = str(tmp_path / "converted.safetensors")
    wplus.convert_official_wplus(bin_path, out)
    converted = wplus.load_wplus_file(out).adapter.state_dict()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    with pytest.raises(ConfigError, match="already exists"):
        wplus.convert_official_wplus(bin_path, out)
    wplus.convert_official_wplus(bin_path, out, overwrite=True, dtype=torch.float16)
    half = wplus.load_wplus_adapter(out).adapter.state_dict()
    key = "layers.middle_0_0.to_v_wplus.weight"
    torch.testing.assert_close(half[key], ours[key], rtol=1e-3, atol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ---- hostile official files


def save(tmp_path, name, obj):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def never_materialized(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("memory was allocated before the check")
    monkeypatch.setattr(wplus, "materialized", fail)


@pytest.fixture(scope="module")
def half_state():
    return official_state(seed=3, dtype=torch.float16)


def test_official_nan_and_wrong_width_are_named_before_anything_is_allocated(tmp_path, half_state, monkeypatch):
    # float16 files load too (the released adapter is run in float16)
    ok = wplus.load_official_wplus(save(tmp_path, "half.bin", half_state))
    assert torch.equal(ok.adapter.layers["output_11_0"].to_k_wplus.weight,
                       half_state["wplus_adapter"]["29.to_k_wplus.weight"].float())
    nan = {"w_proj": half_state["w_proj"], "wplus_adapter": dict(half_state["wplus_adapter"])}
    nan["wplus_adapter"]["9.to_k_wplus.weight"] = nan["wplus_adapter"]["9.to_k_wplus.weight"].clone()
    nan["wplus_adapter"]["9.to_k_wplus.weight"][3, 5] = float("nan")
    with pytest.raises(ModelFileError, match=r"'wplus_adapter\.9\.to_k_wplus\.weight' holds NaN"):
        wplus.load_official_wplus(save(tmp_path, "nan.bin", nan))
    never_materialized(monkeypatch)
    wrong = {"w_proj": half_state["w_proj"], "wplus_adapter": dict(half_state["wplus_adapter"])}
    wrong["wplus_adapter"]["9.to_k_wplus.weight"] = torch.zeros(640, 768, dtype=torch.float16)  # index 9 is 1280 wide
    with pytest.raises(ModelFileError, match=r"wplus_adapter\.9\.to_k_wplus\.weight has shape \(640, 768\), "
                                             r"expected \(1280, 768\)"):
        wplus.load_official_wplus(save(tmp_path, "wrong.bin", wrong))
    proj = {"w_proj": dict(half_state["w_proj"]), "wplus_adapter": half_state["wplus_adapter"]}
    proj["w_proj"]["proj_3.weight"] = torch.zeros(768, 2048, dtype=torch.float16)
    with pytest.raises(ModelFileError, match=r"w_proj\.proj_3\.weight has shape \(768, 2048\), expected \(768, 3072\)"):
        wplus.load_official_wplus(save(tmp_path, "proj.bin", proj))
    ints = {"w_proj": dict(half_state["w_proj"]), "wplus_adapter": half_state["wplus_adapter"]}
    ints["w_proj"]["norm.bias"] = torch.zeros(768, dtype=torch.int64)
    with pytest.raises(ModelFileError, match=r"'w_proj\.norm\.bias' is torch\.int64"):
        wplus.load_official_wplus(save(tmp_path, "ints.bin", ints))


def small(keys, shape=(2, 2)):
    return {k: torch.zeros(shape) for k in keys}


@pytest.mark.parametrize("content, message", [
    ({"image_proj": small(["proj.weight"]), "ip_adapter": small(["1.to_k_ip.weight", "1.to_v_ip.weight"])},
     r"is an IP-Adapter file \(keys \['image_proj', 'ip_adapter'\]\)"),
    ({"w_proj": small(["proj_0.weight"]), "wplus_adapter": small(["1.to_k_ip.weight", "1.to_v_ip.weight"])},
     r"'wplus_adapter' holds IP-Adapter keys"),
    ({"wplus_adapter": small(["1.to_q_wplus.weight"])}, r"expected exactly \['w_proj', 'wplus_adapter'\] "
                                                        r"\(missing \['w_proj'\]\)"),
    ({"w_proj": small(["proj_0.weight"]), "wplus_adapter": small([f"{i}.to_q_wplus.weight" for i in range(16)])},
     r"processor indices \[0, 1, 2, 3\] and 12 more \(16 layers\); an SD1\.5 W\+ adapter has the 16 "
     r"cross-attention layers \[1, 3, 5"),
    ({"w_proj": small(["proj_0.weight"]),
      "wplus_adapter": small([f"{i}.to_q_wplus.weight" for i in range(1, 141, 2)])},
     r"processor indices \[1, 3, 5, 7\] and 66 more \(70 layers\)"),
    ({"w_proj": small(["proj_0.weight"]), "wplus_adapter": small(["1.to_q_wplus.bias"])},
     r"holds keys \['1\.to_q_wplus\.bias'\]"),
    ({"w_proj": [1, 2], "wplus_adapter": {}}, r"'w_proj' holds a list that is not a state dict"),
    ({"unet.conv_in.weight": torch.zeros(1), "w_proj_model.proj_0.weight": torch.zeros(1)},
     "training\\* checkpoint.*transfer_pytorchmodel_to_wplus"),
    (torch.zeros(3), "holds a Tensor, expected the W\\+ adapter's dict"),
])
def test_official_loader_names_the_files_people_mix_up(tmp_path, content, message):
    with pytest.raises(ModelFileError, match=message):
        wplus.load_official_wplus(save(tmp_path, "file.bin", content))


def test_official_missing_tensors_are_listed(tmp_path, half_state):
    cut = {"w_proj": dict(half_state["w_proj"]), "wplus_adapter": dict(half_state["wplus_adapter"])}
    del cut["w_proj"]["norm.bias"]
    with pytest.raises(ModelFileError, match=r"missing \['w_proj\.norm\.bias'\]"):
        wplus.load_official_wplus(save(tmp_path, "cut.bin", cut))


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_naming_other_globals_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    path = save(tmp_path, "evil.bin", {"w_proj": WritesMarker(marker), "wplus_adapter": {}})
    with pytest.raises(ModelFileError, match=r"refused unread: the pickle names posix\.system, which is neither a "
                                             r"tensor nor plain data.*refused on purpose"):
        wplus.load_official_wplus(path)
    assert not marker.exists()


def test_truncated_missing_and_legacy_files_are_refused(tmp_path, official):
    data = open(official[1], "rb").read(4 << 20)
    (tmp_path / "truncated.bin").write_bytes(data)
    with pytest.raises(ModelFileError, match="not a PyTorch zip checkpoint: a truncated or damaged download"):
        wplus.load_official_wplus(str(tmp_path / "truncated.bin"))
    with pytest.raises(ModelFileError, match="W\\+ adapter file not found"):
        wplus.load_official_wplus(str(tmp_path / "absent.bin"))
    legacy = str(tmp_path / "legacy.bin")
    torch.save({"w_proj": {}, "wplus_adapter": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="legacy format of PyTorch < 1.6"):
        wplus.load_official_wplus(legacy)


# ---- hostile wplus/1 files


def tiny_weights(seed=0):
    torch.manual_seed(seed)
    cfg = wplus.WPlusAdapterConfig("sd15", {"input_1_0": BlockSpec(32, 2, CONTEXT),
                                            "middle_0_0": BlockSpec(64, 4, CONTEXT)})
    return wplus.WPlusAdapterWeights(wplus.WPlusAdapter(cfg).eval().requires_grad_(False))


def rewrite(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta, content = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors(content) if tensors else content, out, metadata=meta)
    return out


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    wplus.save_wplus_adapter(tiny_weights(), path)
    return path


def test_tiny_config_round_trip(tiny_file):
    weights = tiny_weights()
    loaded = wplus.load_wplus_adapter(tiny_file)
    assert loaded.config.blocks == weights.config.blocks
    h, w = torch.randn(1, 5, 64), torch.randn(1, 18, 512)
    layer, again = weights.adapter.layers["middle_0_0"], loaded.adapter.layers["middle_0_0"]
    assert torch.equal(again(h, again_tokens := loaded.adapter.tokens(w)), layer(h, weights.adapter.tokens(w)))
    assert again_tokens.shape == (1, 4, CONTEXT)
    assert loaded.adapter.layer_for(("middle", 0, 0)) is again and loaded.adapter.layer_for(("input", 4, 0)) is None


@pytest.mark.parametrize("config, message", [
    ({"family": "sd15", "blocks": {"input_1_0": {"channels": 10 ** 7, "heads": 2, "context_dim": 768}}},
     r"'blocks\.input_1_0\.channels' is 10000000, expected an integer from 1 to 8192"),
    ({"family": "sd15", "blocks": {"input_1_0": {"channels": 32, "heads": 3, "context_dim": 768}}},
     r"'blocks\.input_1_0\.heads' is 3, expected a divisor of channels \(32\)"),
    ({"family": "sd15", "blocks": {"input_1_0": {"channels": 32, "heads": 2, "context_dim": 1024}}},
     r"expected sd15's text width 768"),
    ({"family": "sd3", "blocks": {}}, r"'family' is 'sd3'"),
    ({"family": "sd15", "blocks": {"../x": {"channels": 32, "heads": 2, "context_dim": 768}}},
     r"named like 'input_4_0'"),
    ({"family": "sd15", "blocks": {}, "extra": 1}, r"expected a JSON object with exactly \['blocks', 'family'\]"),
    ({"family": "sd15", "blocks": {"input_1_0": {"channels": True, "heads": 2, "context_dim": 768}}},
     "channels' is True"),
])
def test_wplus1_config_is_bounded_before_building(tmp_path, tiny_file, monkeypatch, config, message):
    never_materialized(monkeypatch)
    monkeypatch.setattr(wplus, "WPlusAdapter", lambda cfg: pytest.fail("built before the config was checked"))
    out = rewrite(tiny_file, str(tmp_path / "bad.safetensors"), config=json.dumps(config))
    with pytest.raises(ModelFileError, match=message):
        wplus.load_wplus_adapter(out)


def test_wplus1_shapes_family_format_and_nan(tmp_path, tiny_file, monkeypatch):
    out = str(tmp_path / "bad.safetensors")

    def nan(content):
        content["layers.input_1_0.to_q_wplus.weight"][0, 0] = float("nan")
        return content

    with pytest.raises(ModelFileError, match=r"'layers\.input_1_0\.to_q_wplus\.weight' holds NaN"):
        wplus.load_wplus_adapter(rewrite(tiny_file, out, nan))
    with pytest.raises(ModelFileError, match=r"metadata says family 'sd21', its config says 'sd15'"):
        wplus.load_wplus_adapter(rewrite(tiny_file, out, family="sd21"))
    with pytest.raises(ModelFileError, match=r"format 'idadapter/1', expected 'wplus/1'"):
        wplus.load_wplus_adapter(rewrite(tiny_file, out, format="idadapter/1"))
    never_materialized(monkeypatch)

    def wider(content):
        content["layers.middle_0_0.to_k_wplus.weight"] = torch.zeros(32, CONTEXT)
        del content["w_proj.norm.bias"]
        return content

    with pytest.raises(ModelFileError, match=r"missing \['w_proj\.norm\.bias'\]; layers\.middle_0_0\.to_k_wplus"
                                             r"\.weight has shape \(32, 768\), expected \(64, 768\)"):
        wplus.load_wplus_adapter(rewrite(tiny_file, out, wider))


def test_saving_refuses_weights_that_overflow_float16(tmp_path):
    weights = tiny_weights()
    with torch.no_grad():
        weights.adapter.layers["input_1_0"].to_q_wplus.weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match="write the file in float32"):
        wplus.save_wplus_adapter(weights, str(tmp_path / "x.safetensors"), dtype=torch.float16)



def test_the_converter_script_writes_wplus_1_and_keeps_existing_files(official, tmp_path):
    import subprocess
    import sys

    official = official[1]
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_wplus.py")
    out = tmp_path / "converted.safetensors"
    done = subprocess.run([sys.executable, script, "--adapter", official, "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wplus/1" in done.stdout and "16 cross-attention layers" in done.stdout
    assert wplus.load_wplus_adapter(str(out)).config.blocks.keys() == wplus.official_sd15_config().blocks.keys()
    again = subprocess.run([sys.executable, script, "--adapter", official, "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and "error:" in again.stderr


def test_a_wplus1_file_under_the_official_name_goes_to_our_reader(official, tiny_file, tmp_path):
    import shutil

    renamed = tmp_path / "wplus_adapter.bin"  # a wplus/1 file under the official name
    shutil.copy(tiny_file, renamed)
    assert wplus.load_wplus_file(str(renamed)).config.blocks.keys() == wplus.load_wplus_adapter(tiny_file).config.blocks.keys()
    assert len(wplus.load_wplus_file(official[1]).config.blocks) == 16
    with pytest.raises(ModelFileError):
        wplus.load_wplus_file(str(tmp_path / "missing.bin"))
