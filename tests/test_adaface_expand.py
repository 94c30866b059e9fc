"""Dynamic model expansion of the AdaFace inverter: expand_kv, expand_to_multipliers, expand_optimizer_state."""

import pytest
import torch

from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.nodes.errors import ConfigError
from comfyui_idadapter.training import adaface_expansion as expansion
from comfyui_idadapter.training.loop import expand_optimizer_state
from test_adaface_arch import HIDDEN, POSITIONS, random_ids, random_model, tiny_text_config

MULTIPLIERS = [1, 2, 1, 4]
LAYER_WEIGHTS = torch.tensor([[0.9163], [0.9483], [2.0762]])


def inverter(seed: int = 0, dtype=torch.float32) -> ada.CLIPTextTransformer:
    return random_model(tiny_text_config(layers=4, multipliers=MULTIPLIERS), seed=seed).to(dtype)


def inputs(dtype=torch.float32):
    faces = torch.randn(2, ada.NUM_ID_VECS, HIDDEN, generator=torch.Generator().manual_seed(9)).to(dtype)
    return faces, random_ids(batch=1, length=POSITIONS)[0], LAYER_WEIGHTS.to(dtype)


def outputs(model, dtype=torch.float32):
    faces, template, weights = inputs(dtype)
    with torch.no_grad():
        return ada.invert(model, faces, template, weights), model(random_ids())


def kv_params(model, layer: int):
    attn = model.text_model.encoder.layers[layer].self_attn
    return {name: getattr(getattr(attn, proj), kind) for proj in ("k_proj", "v_proj") for kind in ("weight", "bias")
            for name in [f"{proj}.{kind}"]}


def test_zero_noise_expansion_leaves_the_outputs_unchanged():
    """Exact in arithmetic (float64: ~1e-15); in float32 the longer softmax sums round differently (measured up to
    ~3e-6 on these random weights, outputs of magnitude ~4), as in test_adaface_arch's repeated-K/V test."""
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 5e-6)):
        model = inverter(dtype=dtype)
        before = outputs(model, dtype)
        expansion.expand_kv(model, {0: 2, 1: 2, 3: 2})
        for after, expected in zip(outputs(model, dtype), before):
            torch.testing.assert_close(after, expected, rtol=0, atol=tolerance)


def test_expansion_updates_shapes_and_config_and_keeps_the_parameter_objects():
    model = inverter()
    params_before = dict(model.named_parameters())
    old = {i: {k: v.detach().clone() for k, v in kv_params(model, i).items()} for i in range(4)}
    mapping = expansion.expand_kv(model, {0: 3, 1: 2, 2: 1})

    assert model.config.kv_multipliers == [3, 4, 1, 4]
    for i, m in enumerate([3, 4, 1, 4]):
        attn = model.text_model.encoder.layers[i].self_attn
        assert attn.kv_multiplier == m
        assert attn.k_proj.out_features == attn.v_proj.out_features == HIDDEN * m
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (HIDDEN * m, HIDDEN)
        assert attn.k_proj.bias.shape == attn.v_proj.bias.shape == (HIDDEN * m,)
    # the same Parameter objects, so an optimizer holding them keeps them
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert set(dict(model.named_parameters())) == set(params_before)
    # every expanded parameter (and only those) has a map; layers 2 (factor 1) and 3 (not named) are untouched
    assert set(mapping) == {p for i in (0, 1) for p in kv_params(model, i).values()}
    for i in (2, 3):
        for name, p in kv_params(model, i).items():
            assert torch.equal(p, old[i][name])
    for i, f in ((0, 3), (1, 2)):
        for name, p in kv_params(model, i).items():
            assert mapping[p].old_shape == old[i][name].shape and mapping[p].new_shape == p.shape
            assert torch.equal(p, old[i][name].repeat(f, *[1] * (p.dim() - 1)))


def test_a_factor_of_one_everywhere_changes_nothing():
    model = inverter()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert expansion.expand_kv(model, {0: 1, 3: 1}) == {}
    assert expansion.expand_kv(model, {}) == {}
    assert model.config.kv_multipliers == MULTIPLIERS
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_block_layout_is_what_keeps_the_function_and_row_interleaving_would_not():
    """Why ``repeat(f, 1)``: the rows of a k/v weight are m blocks of D rows (one per sub-token). Tiling the blocks
    (repeat) or interleaving whole blocks keeps each token's keys/values a multiset of copies of its own sub-tokens,
    so attention is unchanged; interleaving single rows splices different dims into one sub-token and changes it."""
    model = inverter(dtype=torch.float64)
    reference = outputs(model, torch.float64)[1]
    attn = model.text_model.encoder.layers[1].self_attn  # m = 2

    def rebuilt(k_weight, k_bias, v_weight, v_bias):
        other = inverter(dtype=torch.float64)
        expansion.expand_kv(other, {1: 2})
        other_attn = other.text_model.encoder.layers[1].self_attn
        for p, value in zip((other_attn.k_proj.weight, other_attn.k_proj.bias, other_attn.v_proj.weight,
                             other_attn.v_proj.bias), (k_weight, k_bias, v_weight, v_bias)):
            p.copy_(value)
        return outputs(other, torch.float64)[1]

    def block_interleave(t, f=2):  # [c0, c0, c1, c1]
        return t.reshape(2, HIDDEN, *t.shape[1:]).repeat_interleave(f, dim=0).reshape(-1, *t.shape[1:])

    params = (attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias)
    tiled = [p.repeat(2, *[1] * (p.dim() - 1)) for p in params]
    torch.testing.assert_close(rebuilt(*tiled), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(rebuilt(*map(block_interleave, params)), reference, rtol=0, atol=1e-12)
    row_interleaved = rebuilt(*(p.repeat_interleave(2, dim=0) for p in params))
    assert (row_interleaved - reference).abs().max() > 1e-2


def output_change(noise_std: float, seed: int = 5) -> tuple[float, ada.CLIPTextTransformer]:
    model = inverter()
    before = outputs(model)[0]
    expansion.expand_kv(model, {0: 2, 1: 2, 3: 2}, noise_std, torch.Generator().manual_seed(seed))
    return (outputs(model)[0] - before).norm().item() / before.norm().item(), model


def test_noise_is_added_to_every_copy_but_the_first_and_scaled_by_each_weights_std():
    reference = inverter()
    old = {i: {k: v.detach().clone() for k, v in kv_params(reference, i).items()} for i in range(4)}
    noise_std = 0.05
    model = inverter()
    expansion.expand_kv(model, {0: 4, 3: 2}, noise_std, torch.Generator().manual_seed(1))
    for i, f in ((0, 4), (3, 2)):
        params = kv_params(model, i)
        noises = {}
        for proj in ("k_proj", "v_proj"):
            w, w_old = params[f"{proj}.weight"], old[i][f"{proj}.weight"]
            rows = w_old.shape[0]
            assert torch.equal(w[:rows], w_old)  # the first copy is exactly the old weight
            # the biases are copied without noise
            assert torch.equal(params[f"{proj}.bias"], old[i][f"{proj}.bias"].repeat(f))
            noise = (w[rows:] - w_old.repeat(f - 1, 1)) / w_old.std()
            assert (noise != 0).float().mean() > 0.99  # every copy but the first is perturbed
            assert noise.std().item() == pytest.approx(noise_std, rel=0.1)
            assert noise.mean().abs().item() < noise_std * 0.1
            noises[proj] = noise.flatten()
        # k and v get their own noise (independent draws)
        correlation = torch.corrcoef(torch.stack([noises["k_proj"], noises["v_proj"]]))[0, 1]
        assert correlation.abs() < 0.1
    # the same generator seed gives the same expansion
    again = inverter()
    expansion.expand_kv(again, {0: 4, 3: 2}, noise_std, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_the_output_change_grows_linearly_with_the_noise():
    small, _ = output_change(1e-3)
    large, _ = output_change(1e-2)
    assert 0 < small < large
    # the same noise draw at 10x the scale: a small perturbation moves the output ~linearly (measured ~10.0)
    assert 8.0 < large / small < 12.5
    assert large < 0.1  # still a slight perturbation of the function


def test_expanding_twice_equals_expanding_once_by_the_product():
    twice, once = inverter(), inverter()
    before = outputs(twice)
    expansion.expand_kv(twice, {0: 2, 1: 2})
    second = expansion.expand_kv(twice, {0: 2, 1: 2})
    expansion.expand_kv(once, {0: 4, 1: 4})
    assert twice.config.kv_multipliers == once.config.kv_multipliers == [4, 8, 1, 4]
    assert all(torch.equal(a, b) for a, b in zip(twice.state_dict().values(), once.state_dict().values()))
    # the second call's maps start from the first expansion's shapes
    assert {m.old_shape for m in second.values()} == {(2 * HIDDEN, HIDDEN), (2 * HIDDEN,), (4 * HIDDEN, HIDDEN),
                                                      (4 * HIDDEN,)}
    for after, expected in zip(outputs(twice), before):
        torch.testing.assert_close(after, expected, rtol=0, atol=5e-6)


def test_save_load_round_trip_of_an_expanded_model(tmp_path):
    cfg = tiny_text_config(layers=4, multipliers=MULTIPLIERS)
    model = random_model(cfg, seed=3)
    expansion.expand_kv(model, {0: 2, 2: 4, 3: 2}, 0.02, torch.Generator().manual_seed(0))
    # the config the file records is the inverter's own object, so it follows the expansion
    weights = ada.AdaFaceWeights(config=ada.AdaFaceConfig(cfg), inverter=model,
                                 hidden_state_layer_weights=LAYER_WEIGHTS.clone())
    assert weights.config.inverter.kv_multipliers == [2, 2, 4, 8]
    path = str(tmp_path / "expanded.safetensors")
    ada.save_adaface(weights, path)
    loaded = ada.load_adaface(path)
    assert loaded.config == weights.config
    assert loaded.inverter.config.kv_multipliers == [2, 2, 4, 8]
    assert [layer.self_attn.kv_multiplier for layer in loaded.inverter.text_model.encoder.layers] == [2, 2, 4, 8]
    for a, b in zip(outputs(loaded.inverter), outputs(model)):
        assert torch.equal(a, b)


def test_expand_to_multipliers_then_load_state_dict_gives_identical_outputs():
    trained = inverter(seed=7)
    expansion.expand_kv(trained, {0: 2, 1: 4, 3: 2}, 0.05, torch.Generator().manual_seed(2))
    assert trained.config.kv_multipliers == [2, 8, 1, 8]
    expected = outputs(trained.eval())

    fresh = ada.CLIPTextTransformer(tiny_text_config(layers=4, multipliers=MULTIPLIERS)).eval()
    expansion.expand_to_multipliers(fresh, [2, 8, 1, 8])
    fresh.load_state_dict(trained.state_dict())
    for a, b in zip(outputs(fresh), expected):
        assert torch.equal(a, b)

    # as a loader does it: built on the meta device, grown, then materialized with the checkpoint's tensors
    with torch.device("meta"):
        skeleton = ada.CLIPTextTransformer(tiny_text_config(layers=4, multipliers=MULTIPLIERS))
    expansion.expand_to_multipliers(skeleton, [2, 8, 1, 8])
    loaded = ada.materialized(skeleton, trained.state_dict())
    for a, b in zip(outputs(loaded), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("factors,noise_std,message", [
    ({0: 0}, 0.0, r"layer 0's expansion factor is 0, expected an integer of at least 1"),
    ({1: -2}, 0.0, r"layer 1's expansion factor is -2, expected an integer of at least 1"),
    ({1: 1.5}, 0.0, r"layer 1's expansion factor is 1.5, expected an integer"),
    ({1: True}, 0.0, r"layer 1's expansion factor is True, expected an integer"),
    ({4: 2}, 0.0, r"cannot expand layer 4: this model's layers are 0 to 3"),
    ({-1: 2}, 0.0, r"cannot expand layer -1: this model's layers are 0 to 3"),
    ({"0": 2}, 0.0, r"cannot expand layer '0': this model's layers are 0 to 3"),
    ({3: 32}, 0.0, r"layer 3: K/V multiplier 4 x factor 32 = 128 is above the largest allowed, 64: use a factor "
                   r"of at most 16"),
    ([2, 2], 0.0, r"expected a mapping from layer index \(0 to 3\) to an integer factor"),
    ({0: 2}, -0.1, r"noise_std is -0.1, expected a finite number of at least 0"),
    ({0: 2}, float("nan"), r"noise_std is nan, expected a finite number of at least 0"),
])
def test_expand_kv_refuses_what_it_cannot_do_and_changes_nothing(factors, noise_std, message):
    model = inverter()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if isinstance(factors, dict):
        factors = {0: 2, **factors}  # a valid layer first: a refusal must not leave it half done
    with pytest.raises(ConfigError, match=message):
        expansion.expand_kv(model, factors, noise_std)
    assert model.config.kv_multipliers == MULTIPLIERS
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_largest_multiplier_is_allowed():
    model = inverter()
    expansion.expand_kv(model, {3: ada.MAX_KV_MULTIPLIER // 4})
    assert model.config.kv_multipliers[3] == ada.MAX_KV_MULTIPLIER


@pytest.mark.parametrize("multipliers,message", [
    ([2, 3, 1, 4], r"layer 1's K/V multiplier cannot grow from 2 to 3: expected a multiple of 2 \(2, 4, 6, \.\.\.\)"),
    ([2, 1, 1, 4], r"layer 1's K/V multiplier cannot grow from 2 to 1"),
    ([1, 2, 1], r"expected a list of 4 integers \(one per layer\), each a multiple of the current \[1, 2, 1, 4\]"),
    ([1, 2, 1, 128], r"K/V multiplier 4 x factor 32 = 128 is above the largest allowed, 64"),
])
def test_expand_to_multipliers_refuses_what_is_not_a_multiple(multipliers, message):
    model = inverter()
    with pytest.raises(ConfigError, match=message):
        expansion.expand_to_multipliers(model, multipliers)
    assert model.config.kv_multipliers == MULTIPLIERS


def adamw_trained(steps: int = 2):
    model = inverter().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    faces, template, weights = inputs()
    for _ in range(steps):
        optimizer.zero_grad()
        ada.invert(model, faces, template, weights).square().mean().backward()
        optimizer.step()
    return model, optimizer


def test_optimizer_state_follows_the_expansion():
    model, optimizer = adamw_trained()
    old_state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    mapping = expansion.expand_kv(model, {0: 2, 1: 2}, 0.01, torch.Generator().manual_seed(3))
    expand_optimizer_state(optimizer, mapping)

    for p in model.parameters():
        state = optimizer.state[p]
        assert torch.equal(state["step"], old_state[p]["step"])  # scalars untouched
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape
            old = old_state[p][key]
            if p in mapping:
                rows = old.shape[0]
                for copy in range(p.shape[0] // rows):  # every copy of the state is the original rows
                    assert torch.equal(state[key][copy * rows:(copy + 1) * rows], old)
            else:
                assert torch.equal(state[key], old)

    # training goes on with the expanded parameters and their state
    faces, template, weights = inputs()
    optimizer.zero_grad()
    ada.invert(model, faces, template, weights).square().mean().backward()
    optimizer.step()
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(optimizer.state[p]["step"].item() == 3 for p in model.parameters())


def test_optimizer_state_of_another_shape_is_refused():
    model, optimizer = adamw_trained(steps=1)
    mapping = expansion.expand_kv(model, {0: 2})
    expand_optimizer_state(optimizer, mapping)
    expanded = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in mapping}
    with pytest.raises(ConfigError, match=r"cannot expand a tensor of shape \(64, 32\) like a K/V parameter of "
                                          r"shape \(32, 32\)"):
        expand_optimizer_state(optimizer, mapping)  # a second time: the state is already expanded
    for p, state in expanded.items():  # and nothing was changed
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())


def test_parameters_without_optimizer_state_are_skipped():
    model = inverter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # no step yet: no state
    mapping = expansion.expand_kv(model, {1: 2})
    expand_optimizer_state(optimizer, mapping)
    assert not any(optimizer.state[p] for p in model.parameters())


def test_gradients_flow_to_the_expanded_parameters():
    model = inverter().train()
    faces, template, weights = inputs()
    ada.invert(model, faces, template, weights).square().mean().backward()
    mapping = expansion.expand_kv(model, {0: 2, 3: 2}, 0.01, torch.Generator().manual_seed(4))
    assert all(p.grad is None for p in mapping)  # the old-shaped gradients are dropped
    model.zero_grad()
    ada.invert(model, faces, template, weights).square().mean().backward()
    for p in mapping:
        assert p.requires_grad and p.grad is not None
        assert p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # every copy learns: the noised copies get gradients of their own
    k_weight = model.text_model.encoder.layers[0].self_attn.k_proj.weight
    assert k_weight.grad[HIDDEN:].abs().sum() > 0 and not torch.equal(k_weight.grad[:HIDDEN], k_weight.grad[HIDDEN:])


def test_flattened_optimizer_state_grows_like_its_parameter():
    """Prodigy keeps p0 and s flattened: they grow as the parameter does, and stay flat."""
    tiling = expansion.RowTiling((4, 3), 2)
    state = torch.arange(12.0)
    grown = tiling(state)
    assert grown.shape == (24,)
    assert torch.equal(grown.view(8, 3), state.view(4, 3).repeat(2, 1))
