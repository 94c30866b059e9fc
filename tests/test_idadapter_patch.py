"""The ComfyUI-side IDAdapter patches, driven the way ComfyUI calls them (signatures: reference/comfyui-api.md)."""

import copy
import gc
import threading
import time

import pytest
import torch

from idadapter_helpers import StandInPatcher, tiny_adapter
from comfyui_idadapter.nodes.arch.unet_blocks import sdpa_attention
from comfyui_idadapter.nodes.errors import ConfigError, ImageInputError, PackError
from comfyui_idadapter.nodes.patches import idadapter_patch, identity_words, memory, shared, unet_layout


def options(block=("input", 1), sigma=5.0, cond_or_uncond=(1, 0), latent=(8, 8), batch=1):
    return {
        "block": block,
        "block_index": 0,
        "sigmas": torch.tensor([sigma]),
        "cond_or_uncond": list(cond_or_uncond),
        "original_shape": [batch * len(cond_or_uncond), 4, *latent],
        "transformer_index": 0,
    }


def make_patch(gamma=0.5, weight=1.0, **kwargs):
    weights = tiny_adapter(gamma=gamma)
    tokens = torch.randn(1, 4, 24)
    patcher = StandInPatcher(weights.adapter.adapters)
    return idadapter_patch.IDAdapterMiddlePatch(patcher, tokens, weight, attention=sdpa_attention, **kwargs), weights


def test_gamma_zero_is_bit_identical():
    patch, _ = make_patch(gamma=0.0)
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options()), x)


def test_only_conditional_chunks_change_and_match_cond_alone():
    patch, _ = make_patch()
    x = torch.randn(4, 64, 32)  # batch 2, chunks [uncond, cond]
    out = patch(x, options(cond_or_uncond=(1, 0), batch=2))
    assert torch.equal(out[:2], x[:2])
    assert (out[2:] - x[2:]).abs().max() > 1e-3
    cond_only = patch(x[2:], options(cond_or_uncond=(0,), batch=2))
    torch.testing.assert_close(out[2:], cond_only)
    unconditional = patch(x[:2], options(cond_or_uncond=(1,), batch=2))
    assert torch.equal(unconditional, x[:2])


def test_weight_scales_the_residual():
    one, _ = make_patch(weight=1.0)
    two = idadapter_patch.IDAdapterMiddlePatch(one.identities[0].patcher, one.identities[0].tokens, 2.5,
                                               attention=sdpa_attention)
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(two(x, options()) - x, 2.5 * (one(x, options()) - x), rtol=1e-5, atol=1e-6)


def test_sigma_window():
    patch, _ = make_patch(sigma_start=10.0, sigma_end=2.0)
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options(sigma=14.6)), x)  # before start_percent
    assert torch.equal(patch(x, options(sigma=0.5)), x)  # after end_percent
    for sigma in (10.0, 5.0, 2.0):
        assert not torch.equal(patch(x, options(sigma=sigma)), x)


def test_mask_restricts_change_to_masked_region():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half of the image
    patch, _ = make_patch(mask=mask)
    x = torch.randn(2, 64, 32)  # 8x8 latent, this block at full latent resolution
    change = (patch(x, options()) - x)[1].abs().sum(-1).reshape(8, 8)
    assert change[:, :4].min() > 1e-4
    assert change[:, 4:].max() == 0
    small = torch.randn(2, 16, 32)  # a block at half resolution (4x4 tokens)
    change = (patch(small, options()) - small)[1].abs().sum(-1).reshape(4, 4)
    assert change[:, :2].min() > 1e-4 and change[:, 2:].max() == 0


def test_unknown_blocks_pass_through():
    patch, _ = make_patch()
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options(block=("output", 11))), x)
    assert torch.equal(patch(x, {}), x)


def test_clone_shares_patch_and_weights():
    patch, weights = make_patch()
    model_options = {"transformer_options": {"patches": {"middle_patch": [patch]}}}
    cloned = copy.deepcopy(model_options)  # what ModelPatcher.clone() does in ComfyUI 0.3.x
    assert cloned["transformer_options"]["patches"]["middle_patch"][0] is patch
    (identity,) = patch.identities
    assert patch.models() == [identity.patcher] and identity.patcher.model is weights.adapter.adapters
    assert patch.to(torch.device("cpu")) is patch and patch.to(torch.float16) is patch


def test_weights_are_cast_per_call_and_never_copied():
    """The module ComfyUI's patcher owns is the one that runs: no converted copy outlives a call."""
    patch, weights = make_patch()
    proj = weights.adapter.adapters["input_1_0"].proj.weight
    before = _tensors_like(proj)
    patch(torch.randn(2, 64, 32), options())
    patch(torch.randn(2, 64, 32, dtype=torch.bfloat16), options())
    assert _tensors_like(proj) == before


def _tensors_like(param: torch.Tensor) -> int:
    """How many live tensors hold ``param``'s values in their own storage (any dtype)."""
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.shape == param.shape and obj.device.type == "cpu":
            if torch.equal(obj.detach().float(), param.detach().float().to(obj.dtype).float()):
                count += 1
    return count


def test_runs_in_half_precision():
    patch, _ = make_patch()
    x = torch.randn(2, 64, 32)
    full = patch(x, options())
    half = patch(x.to(torch.bfloat16), options())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1


def test_token_grid_and_bad_shapes():
    assert shared.token_grid({"original_shape": [2, 4, 9, 7]}, 63) == (9, 7)
    assert shared.token_grid({"original_shape": [2, 4, 9, 7]}, 20) == (5, 4)
    with pytest.raises(PackError, match="cannot place 17 tokens"):
        shared.token_grid({"original_shape": [2, 4, 8, 8]}, 17)
    with pytest.raises(PackError, match="neither activations_shape nor original_shape"):
        shared.token_grid({}, 16)


def test_token_grid_reads_the_blocks_activations_shape():
    # a grid no power-of-two downscale of the latent gives: only the block knows it
    assert shared.token_grid({"activations_shape": [2, 32, 3, 5], "original_shape": [2, 4, 9, 7]}, 15) == (3, 5)
    assert shared.token_grid({"activations_shape": [2, 32, 3, 5]}, 15) == (3, 5)
    # a shape that does not hold these tokens (not this block's) falls back to the latent size
    assert shared.token_grid({"activations_shape": [2, 32, 4, 4], "original_shape": [2, 4, 9, 7]}, 20) == (5, 4)


def test_mask_follows_activations_shape_without_original_shape():
    mask = torch.zeros(1, 64, 128)
    mask[:, :, :64] = 1.0  # left half
    patch, _ = make_patch(mask=mask)
    x = torch.randn(2, 32, 32)  # a 4x8 block
    opts = dict(options(), activations_shape=[2, 32, 4, 8])
    del opts["original_shape"]
    change = (patch(x, opts) - x)[1].abs().sum(-1).reshape(4, 8)
    assert change[:, :4].min() > 1e-4 and change[:, 4:].max() == 0


def image_masks(values, side=64):
    """A MASK batch of constant masks, one value per image."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, side, side).clone()


def masked_like(patch, mask):
    """A patch on ``patch``'s adapter and tokens with ``mask``, the way Apply IDAdapter passes it."""
    (identity,) = patch.identities
    return idadapter_patch.IDAdapterMiddlePatch(identity.patcher, identity.tokens, 1.0, attention=sdpa_attention,
                                                mask=shared.check_attn_mask(mask))


@pytest.mark.parametrize("masks, images, cond_or_uncond", [
    (2, 3, (1, 0)), (3, 2, (1, 0)),  # were a raw size-mismatch error at sampling
    (2, 3, (0,)),  # cond-only rows
    (2, 4, (0,)),  # was used silently, the masks cycling over the images
    (2, 1, (1, 0)),  # dropped the conditional row from the output
])
def test_a_mask_batch_neither_one_nor_one_per_image_is_refused_at_sampling(masks, images, cond_or_uncond):
    patch, _ = make_patch(mask=torch.ones(masks, 64, 64))
    x = torch.randn(images * len(cond_or_uncond), 64, 32)
    with pytest.raises(ImageInputError, match=f"attn_mask is a batch of {masks} masks and the latent batch has "
                       f"{images} images?: give one mask for all images, or one per image"):
        patch(x, options(cond_or_uncond=cond_or_uncond, batch=images))


@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0, 1, 0)], ids=["uncond-cond", "two-cond-chunks"])
def test_one_mask_for_all_images_or_one_per_image_scales_each_rows_residual(cond_or_uncond):
    plain, _ = make_patch()
    x = torch.randn(3 * len(cond_or_uncond), 64, 32)  # 3 images per chunk
    opts = options(cond_or_uncond=cond_or_uncond, batch=3)
    residual = plain(x, opts) - x
    per_row = torch.tensor([[0.25, 0.5, 1.0][i % 3] * (1 - c) for c in cond_or_uncond for i in range(3)])
    torch.testing.assert_close(masked_like(plain, image_masks([0.25, 0.5, 1.0]))(x, opts) - x,
                               residual * per_row[:, None, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_like(plain, image_masks([0.5]))(x, opts) - x, residual * 0.5, rtol=1e-5,
                               atol=1e-6)
    # the rows the block gets: one mask broadcasts, per-image masks repeat once per chunk
    block_mask = shared.BlockMask(image_masks([0.25, 0.5, 1.0]))
    assert block_mask.for_rows(opts, 3, 6, 64, x)[:, 0, 0].tolist() == [0.25, 0.5, 1.0, 0.25, 0.5, 1.0]
    assert shared.BlockMask(image_masks([0.5])).for_rows(opts, 3, 6, 64, x).shape == (1, 64, 1)


def test_mask_values_outside_0_1_are_clamped():
    checked = shared.check_attn_mask(torch.tensor([[1.5, -0.5], [0.25, 1.0]]))
    assert checked.tolist() == [[[1.0, 0.0], [0.25, 1.0]]]
    plain, _ = make_patch()
    x = torch.randn(2, 64, 32)
    above, one = masked_like(plain, image_masks([1.5])), masked_like(plain, image_masks([1.0]))
    assert torch.equal(above(x, options()), one(x, options()))
    assert torch.equal(masked_like(plain, image_masks([-0.5]))(x, options()), x)


def test_per_device_memo_gives_racing_threads_one_value():
    memo = memory.PerDeviceMemo()
    threads_ready = threading.Barrier(8)
    results = [None] * 8

    def slow_value():
        time.sleep(0.02)  # every thread is inside compute before any stores
        return object()

    def worker(i):
        threads_ready.wait()
        results[i] = memo.get((torch.device("cpu"), torch.float16), slow_value)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is results[0] for r in results)
    assert memo.get((torch.device("cpu"), torch.float16), object) is results[0]


def test_per_device_memo_releases_only_accelerator_values():
    memo = memory.PerDeviceMemo()
    on_cpu = memo.get((torch.device("cpu"), 1), object)
    on_gpu = memo.get((torch.device("cuda", 0), 1), object)
    memo.release_accelerator_values()
    assert memo.get((torch.device("cpu"), 1), object) is on_cpu
    assert memo.get((torch.device("cuda", 0), 1), object) is not on_gpu


def test_moving_the_patch_to_the_cpu_lets_go_of_other_devices_tensors():
    """ComfyUI calls .to(offload device) when it detaches the MODEL: the tokens and masks made for the
    accelerator (here the meta device stands in for one) go with it."""
    patch, _ = make_patch(mask=torch.ones(1, 64, 64))
    patch(torch.randn(2, 64, 32, device="meta"), options())
    assert _meta_tensors(patch.identities[0].tokens.shape) == 1
    assert patch.to(torch.device("cpu")) is patch
    assert _meta_tensors(patch.identities[0].tokens.shape) == 0


def _meta_tensors(shape) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "meta"
               and obj.shape == shape)


def test_threads_sharing_the_patch_match_one_thread():
    """ComfyUI 0.38 runs a step's cond batches in one thread per device, each with its own sigmas tensor, all
    calling the same patch (dtypes stand in for devices here: each gets its own tokens and masks)."""
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1.0
    patch, _ = make_patch(mask=mask, sigma_start=10.0, sigma_end=2.0)
    work = [(dtype, sigma, block, torch.randn(2, tokens, channels).to(dtype), latent)
            for dtype in (torch.float32, torch.float64, torch.bfloat16)
            for sigma in (5.0, 14.6)
            for block, tokens, channels, latent in ((("input", 1), 64, 32, (8, 8)), (("middle", 0), 16, 64, (8, 8)))]
    expected = [patch(x, options(block=block, sigma=sigma, latent=latent)) for _, sigma, block, x, latent in work]
    fresh, _ = make_patch(mask=mask, sigma_start=10.0, sigma_end=2.0)  # same seeded weights, empty caches
    outputs = {}
    threads_ready = threading.Barrier(len(work))

    def worker(i, sigma, block, x, latent):
        threads_ready.wait()
        outputs[i] = [fresh(x, options(block=block, sigma=sigma, latent=latent)) for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(i, sigma, block, x, latent))
               for i, (_, sigma, block, x, latent) in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == len(work)
    for i, want in enumerate(expected):
        for got in outputs[i]:
            assert torch.equal(got, want)


def test_kv_weight_patch_keys():
    weights = tiny_adapter()
    entries = unet_layout.kv_weight_patches(weights.kv_deltas)
    assert set(entries) == {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight",
    }
    entry = entries["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]
    assert len(entry) == 1 and entry[0] is weights.kv_deltas["middle_0_0"]["to_v"]


class WordClip:
    """What tokenize_with_identities uses of a ComfyUI CLIP: ``tokenize`` per text encoder key, one token per
    space-separated word (a word in VOCAB; "xyzw" is two tokens), rows of 77 with (token, weight[, word id])."""

    VOCAB = {"a": 320, "photo": 1125, "of": 539, "sks": 48136, "and": 537, "xyz": 23147, "z": 329, "y": 344,
             "at": 536, "cafe": 4979, "person": 2533, "is": 533, ",": 267}

    def __init__(self, keys):
        self.keys = keys

    def tokenize(self, text, return_word_ids=False):
        ids = []
        for number, word in enumerate(text.replace(",", " , ").split(), start=1):
            pieces = [self.VOCAB[word]] if word in self.VOCAB else [1, 2] if word == "xyzw" else [999]
            ids += [(t, 1.0, number) if return_word_ids else (t, 1.0) for t in pieces]
        start, end = ((49406, 1.0, 0), (49407, 1.0, 0)) if return_word_ids else ((49406, 1.0), (49407, 1.0))
        row = [start, *ids, end]
        return {key: [row + [end] * (77 - len(row))] for key in self.keys}


@pytest.mark.parametrize("layout", [{"l": 768}, {"h": 1024}, {"g": 1280, "l": 768}], ids=["sd15", "sd21", "sdxl"])
def test_several_identity_words_in_one_prompt(layout):
    clip = WordClip(list(layout))
    sks = identity_words.IdentityWord("sks", {k: torch.randn(1, d) for k, d in layout.items()}, "IDAdapter")
    z = identity_words.IdentityWord("z", {k: torch.randn(3, d) for k, d in layout.items()}, "AdaFace")
    tokens = identity_words.tokenize_with_identities(clip, "a photo of sks and z at a cafe , sks", [sks, z])
    plain = clip.tokenize("a photo of sks and z z z at a cafe , sks")  # z written out 3 times
    for key in layout:
        row, before = tokens[key][0], plain[key][0]
        assert len(row) == 77
        vectors = [entry[0] for entry in row if isinstance(entry[0], torch.Tensor)]
        assert len(vectors) == 5
        assert torch.equal(vectors[0], sks.vectors[key][0]) and torch.equal(vectors[4], sks.vectors[key][0])
        for i in range(3):
            assert torch.equal(vectors[1 + i], z.vectors[key][i])
        assert [e[1:] for e in row] == [e[1:] for e in before]  # weights (and word ids) kept
        assert [e for e in row if not isinstance(e[0], torch.Tensor)] == [e for e in before if e[0] not in (48136, 329)]


def test_identity_word_refusals():
    clip = WordClip(["l"])
    sks = identity_words.IdentityWord("sks", {"l": torch.zeros(1, 768)}, "IDAdapter")
    with pytest.raises(PackError, match="does not contain 'sks'"):
        identity_words.tokenize_with_identities(clip, "a photo of z", [sks])
    with pytest.raises(ConfigError, match="several identities use the word 'sks'"):
        identity_words.tokenize_with_identities(clip, "sks and sks", [sks, sks])
    with pytest.raises(ConfigError, match="'xyzw' is 2 tokens"):
        identity_words.tokenize_with_identities(clip, "a photo of xyzw",
                                                [identity_words.IdentityWord("xyzw", sks.vectors, "IDAdapter")])
    with pytest.raises(PackError, match=r"CLIP has text encoders \['g', 'l'\].*vectors for \['l'\]"):
        identity_words.tokenize_with_identities(WordClip(["g", "l"]), "a photo of sks", [sks])
    y = identity_words.IdentityWord("y", {"l": torch.zeros(16, 768)}, "AdaFace")
    with pytest.raises(PackError, match="does not contain 'y'"):
        identity_words.tokenize_with_identities(clip, "a photo of sks", [sks, y])
    # AdaFace Encode's own placeholder is appended when the text lacks it, as the official wrapper does
    own = identity_words.IdentityWord("z", {"l": torch.ones(16, 768)}, "AdaFace", append_if_missing=True)
    tokens = identity_words.tokenize_with_identities(clip, "a photo of sks", [own, sks])
    row = tokens["l"][0]
    assert sum(isinstance(e[0], torch.Tensor) and e[0].eq(1).all() for e in row) == 16
    assert isinstance(row[20][0], torch.Tensor) and row[21][0] == 49407  # the 16 come last, before the end token


def test_non_contiguous_conditional_rows():
    patch, _ = make_patch()
    x = torch.randn(3, 64, 32)  # chunks [cond, uncond, cond], batch 1
    out = patch(x, options(cond_or_uncond=(0, 1, 0)))
    assert torch.equal(out[1], x[1])
    for row in (0, 2):
        torch.testing.assert_close(out[row:row + 1], patch(x[row:row + 1], options(cond_or_uncond=(0,))))


# ---- several identities in one MODEL


def halves():
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    return left, 1.0 - left


def two_identities(**kwargs):
    """Two one-identity patches on one adapter (other tokens, left and right masks) and their join."""
    left, right = halves()
    first, weights = make_patch(mask=left, **kwargs)
    (identity,) = first.identities
    second = idadapter_patch.IDAdapterMiddlePatch(identity.patcher, torch.randn(1, 4, 24), 0.6,
                                                  attention=sdpa_attention, mask=right)
    return first, second, first.joined(second), weights


def test_joined_identities_add_their_own_residuals_each_inside_its_mask():
    first, second, both, _ = two_identities()
    x = torch.randn(2, 64, 32)
    r1, r2, r12 = first(x, options()) - x, second(x, options()) - x, both(x, options()) - x
    torch.testing.assert_close(r12, r1 + r2, rtol=0, atol=1e-6)
    grid = lambda r: r[1].abs().sum(-1).reshape(8, 8)  # noqa: E731  (the conditional row on the 8x8 grid)
    assert grid(r1)[:, 4:].max() == 0 and grid(r1)[:, :4].min() > 1e-4
    assert grid(r2)[:, :4].max() == 0 and grid(r2)[:, 4:].min() > 1e-4
    assert torch.equal(r12[0], torch.zeros_like(r12[0]))  # the unconditional row stays plain
    # chaining the two patches instead would feed the first's output to the second: not the same
    chained = second(first(x, options()), options()) - x
    assert (chained - (r1 + r2)).abs().max() > 1e-4


def test_joining_leaves_both_patches_as_they_were():
    first, second, both, _ = two_identities()
    assert len(first.identities) == 1 and len(second.identities) == 1 and len(both.identities) == 2
    assert both.identities == first.identities + second.identities
    assert both.models() == [first.identities[0].patcher]  # one adapter file: one patcher for the manager


class StandInModel:
    """What add_idadapter uses of a ModelPatcher: model_options, set_model_patch, add_patches, clone. As ComfyUI's,
    ``add_patches`` keeps only the keys its model's state dict has (by default every key) and returns those."""

    def __init__(self, model_options=None, calls=(), weight_keys=None):
        self.model_options = model_options or {"transformer_options": {}}
        self.kv_calls = list(calls)
        self.weight_keys = weight_keys

    def clone(self):  # as ModelPatcher.clone in 0.3.x
        return StandInModel(copy.deepcopy(self.model_options), self.kv_calls, self.weight_keys)

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"].setdefault("patches", {})
        to[name] = to.get(name, []) + [patch]

    def add_patches(self, entries, strength_patch=1.0, strength_model=1.0):
        applied = [key for key in entries if self.weight_keys is None or key in self.weight_keys]
        self.kv_calls.append((sorted(applied), strength_patch))
        return applied


def test_an_adapter_files_kv_deltas_are_added_once_at_the_first_applys_weight():
    first, second, _, weights = two_identities()
    other_file, _ = make_patch()  # another adapter file (its own patcher)
    base = StandInModel()
    base.set_model_patch("another pack's patch", "middle_patch")
    one = base.clone()
    idadapter_patch.add_idadapter(one, first, weights.kv_deltas, 0.9)
    two = one.clone()
    idadapter_patch.add_idadapter(two, second, weights.kv_deltas, 0.6)
    three = two.clone()
    idadapter_patch.add_idadapter(three, other_file, weights.kv_deltas, 0.3)
    assert [strength for _, strength in three.kv_calls] == [0.9, 0.3]  # the second apply of the file adds none
    # per apply: the first adds the file's deltas, the second (same file) none, the third (another file) its own
    assert [len(m.kv_calls) for m in (one, two, three)] == [1, 1, 2]
    # one IDAdapter patch per MODEL, in its place after the other pack's; the earlier MODELs keep theirs
    middle = lambda m: m.model_options["transformer_options"]["patches"]["middle_patch"]  # noqa: E731
    assert middle(base) == ["another pack's patch"]
    assert middle(one) == ["another pack's patch", first]
    assert middle(two)[0] == "another pack's patch" and middle(two)[1].identities == first.identities + second.identities
    assert middle(three)[1].identities == middle(two)[1].identities + other_file.identities
    assert len(middle(one)[1].identities) == 1


def test_kv_deltas_that_do_not_land_on_the_model_are_an_error():
    """ComfyUI's add_patches skips keys its model lacks without a word: a UNet laid out otherwise would sample with
    the gated attention and without the K/V deltas."""
    patch, weights = make_patch()
    keys = sorted(unet_layout.kv_weight_patches(weights.kv_deltas))
    idadapter_patch.add_idadapter(StandInModel(weight_keys=set(keys)), patch, weights.kv_deltas, 0.8)  # all land: fine
    with pytest.raises(PackError, match=r"the MODEL has no weights \['diffusion_model.input_blocks.1.1.transformer_"
                       r"blocks.0.attn2.to_k.weight', .* \(2 of the adapter's 6 cross-attention weights\): its UNet "
                       "is not laid out as the SD1.5/SD2.x/SDXL UNet"):
        idadapter_patch.add_idadapter(StandInModel(weight_keys=set(keys[2:])), patch, weights.kv_deltas, 0.8)


def test_tiled_sampling_gets_each_tiles_part_of_the_mask():
    """ComfyUI's spatial_crop_inputs: the left and right halves of a 64x64 image sampled as a batch of two 32x64
    tiles; the left-half mask becomes all ones on tile 0 and all zeros on tile 1, and the cropped patch gives tile 0
    the whole residual and tile 1 none. The attached patch stays as it was."""
    plain, _ = make_patch()
    patch = masked_like(plain, halves()[0])
    (identity,) = patch.identities
    tiled = patch.spatial_crop_inputs(regions=[(0, 0, 32, 64), (32, 0, 64, 64)], source_width=64, source_height=64,
                                      target_width=32, target_height=64)
    assert tiled is not patch and patch.identities == (identity,) and identity.mask.mask.shape == (1, 64, 64)
    assert tiled.identities[0].mask.mask.tolist() == [[[1.0] * 32] * 64, [[0.0] * 32] * 64]
    x = torch.randn(4, 32, 32)  # [uncond, cond] x 2 tiles of a 4x8 token grid
    opts = options(cond_or_uncond=(1, 0), latent=(8, 4), batch=2)
    residual = plain(x, opts) - x
    out = tiled(x, opts) - x
    torch.testing.assert_close(out[2], residual[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(out[:2], torch.zeros_like(out[:2]))
    # a region partly outside the image is 0 there; a tile with no mask comes back as the same patch
    (outside,) = patch.spatial_crop_inputs(regions=[(-32, 0, 32, 64)], source_width=64, source_height=64,
                                           target_width=64, target_height=64).identities[0].mask.mask
    assert outside[:, :32].abs().max() == 0 and outside[:, 32:].min() == 1
    assert plain.spatial_crop_inputs(regions=[(0, 0, 32, 64)], source_width=64, source_height=64, target_width=32,
                                     target_height=64) is plain


def test_tiled_sampling_refuses_a_mask_batch_and_bad_regions():
    plain, _ = make_patch()
    crop = dict(source_width=64, source_height=64, target_width=32, target_height=64)
    with pytest.raises(ImageInputError, match="attn_mask is a batch of 2 masks and the sampler tiles the image"):
        masked_like(plain, image_masks([0.5, 1.0])).spatial_crop_inputs(regions=[(0, 0, 32, 64)], **crop)
    for regions in ([], [(32, 0, 0, 64)], [(0, 0, 32)], [(0.5, 0, 32, 64)]):
        with pytest.raises(PackError, match="expected \\(left, top, right, bottom\\) pixel rectangles"):
            masked_like(plain, halves()[0]).spatial_crop_inputs(regions=regions, **crop)
