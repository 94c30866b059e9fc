"""AdaFace's dynamic model expansion (the paper's "Dynamic Model Expansion", the official
``CLIPAttentionMKV.extend_weights``): during a run the trainer multiplies some inverter layers' keys and values in
place (:func:`expand_kv`), a resumed run grows a fresh inverter to a checkpoint's shapes
(:func:`expand_to_multipliers`), and the optimiser state follows through each parameter's :class:`RowTiling`
(``training.loop.expand_optimizer_state``). The nodes only load expanded files (``nodes.arch.adaface``).

Layout. k_proj(x)[t] (D*m values) is viewed as m sub-tokens of width D, so the rows of a k_proj/v_proj weight
[D*m, D] form m blocks of D rows, block c being sub-token c of every token, and a token's sub-tokens are always
its own (the view is per token). Growing m to m*f therefore only has to give each token m*f blocks, each a copy
of one of its m: ``weight.repeat(f, 1)`` tiles the blocks [c0 .. c(m-1), c0 .. c(m-1), ...] (the official layout;
the first copy is the old weight itself, rows 0 .. D*m-1). Interleaving whole blocks [c0, c0, c1, c1, ...] would
serve as well (softmax attention does not depend on the order of its keys when the values follow them), but
interleaving rows (``repeat_interleave(f, 0)``) would not: it splices halves of different heads into one
sub-token. With the copies equal, query i sees each visible key f times with the same value, so every
sub-token's softmax share is split into f equal parts of the same value: the output is unchanged (exactly in
arithmetic; in floating point the longer sums round differently).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..nodes.arch.adaface import MAX_KV_MULTIPLIER, CLIPTextTransformer
from ..nodes.errors import ConfigError
from .task import Grow


@dataclass(frozen=True)
class RowTiling:
    """Maps a tensor shaped like a k_proj/v_proj parameter before :func:`expand_kv` (``old_shape``) to the shape
    after it, laid out as the parameter is: the old rows repeated ``factor`` times along dim 0, without noise.
    What an optimizer's per-parameter state (Adam's exp_avg / exp_avg_sq, Prodigy's p0 / s) goes through."""

    old_shape: tuple[int, ...]
    factor: int

    @property
    def new_shape(self) -> tuple[int, ...]:
        return (self.old_shape[0] * self.factor, *self.old_shape[1:])

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 1 and len(self.old_shape) > 1 and tensor.numel() == math.prod(self.old_shape):
            # state kept flattened (Prodigy's p0 and s): grown as the parameter, then flattened again
            return self(tensor.view(self.old_shape)).flatten()
        if tuple(tensor.shape) != self.old_shape:
            raise ConfigError(f"cannot expand a tensor of shape {tuple(tensor.shape)} like a K/V parameter of shape "
                              f"{self.old_shape}: only tensors of that shape (a parameter's optimizer state, taken "
                              "before the expansion) follow the expansion")
        return tensor.repeat(self.factor, *[1] * (tensor.dim() - 1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_expansion(text: str, num_layers: int | None = None) -> dict[int, int]:
    """"factor:first-last" (or "factor:layer", "factor:all") -> {layer: factor}; with ``num_layers`` the layers
    must exist (without it only the form is checked, and "all" gives an empty dict)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(all|(\d+)(?:\s*-\s*(\d+))?)\s*", text)
    if not match:
        raise ConfigError(f"{text!r} is not 'factor:layers' (e.g. '4:0-11', '2:0', '2:all')")
    factor = int(match.group(1))
    if factor < 2:
        raise ConfigError(f"{text!r}: the factor must be 2 or more")
    if match.group(2) == "all":
        return {} if num_layers is None else dict.fromkeys(range(num_layers), factor)
    first = int(match.group(3))
    last = int(match.group(4)) if match.group(4) is not None else first
    if last < first or (num_layers is not None and last >= num_layers):
        limit = "" if num_layers is None else f" of the {num_layers} layers (0 to {num_layers - 1})"
        raise ConfigError(f"{text!r}: layers {first}-{last} are not a range{limit}")
    return dict.fromkeys(range(first, last + 1), factor)


def expand_kv(model: CLIPTextTransformer, factors: dict[int, int], noise_std: float = 0.0,
              generator: torch.Generator | None = None) -> dict[nn.Parameter, Grow]:
    """Multiplies layer i's K/V multiplier by ``factors[i]`` (dynamic model expansion), in place.

    For each layer with a factor f >= 2 (1 leaves a layer as it is), the k_proj and v_proj weights [D*m, D] become
    ``weight.repeat(f, 1)`` [D*m*f, D] and the biases ``bias.repeat(f)``: each token's m sub-tokens repeated f
    times, the layer's function unchanged. With ``noise_std`` > 0, Gaussian noise of standard deviation
    ``noise_std * w.std()`` (w: that weight before the expansion, k and v each their own, drawn independently from
    ``generator``, which must be on the weights' device) is added to every copy but the first, which stays exactly
    the old weight; as in the official code the biases are copied without noise (once the weights differ, the copies'
    biases get different gradients and drift apart in training).

    The Parameter objects stay the same (their ``.data`` is replaced), so an optimizer holding them keeps them; the
    Linear's ``out_features``, the attention's ``kv_multiplier`` and ``model.config.kv_multipliers[i]`` are updated
    (the config object in place: a config shared with another holder, such as ``AdaFaceWeights.config.inverter``,
    follows). A gradient the expanded parameters hold is dropped (it has the old shape): expand between optimizer
    steps, with no autograd graph of an earlier step alive (its nodes keep the parameters' gradient accumulators,
    which remember the old shapes: training.loop drops each step's loss). Everything is checked before anything
    changes.

    Returns, for every parameter whose shape changed, a :class:`RowTiling` that maps a tensor of its old shape to
    its new one the same way (copies, no noise): what ``training.loop.expand_optimizer_state`` applies to optimizer state.
    """
    layers = model.text_model.encoder.layers
    n = len(layers)
    if not isinstance(factors, dict):
        raise ConfigError(f"the expansion factors are a {type(factors).__name__}, expected a mapping from layer index "
                          f"(0 to {n - 1}) to an integer factor, e.g. {{0: 2, 1: 2}}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not 0 <= noise_std < math.inf:
        raise ConfigError(f"the expansion noise_std is {noise_std!r}, expected a finite number of at least 0 (relative "
                          "to each weight's standard deviation; 0 copies the weights exactly)")
    plan = []
    for i, f in factors.items():
        if not _is_int(i) or not 0 <= i < n:
            raise ConfigError(f"cannot expand layer {i!r}: this model's layers are 0 to {n - 1}")
        if not _is_int(f) or f < 1:
            raise ConfigError(f"layer {i}'s expansion factor is {f!r}, expected an integer of at least 1 (1 leaves the "
                              "layer as it is, 2 doubles its keys and values)")
        m = layers[i].self_attn.kv_multiplier
        if model.config.kv_multipliers[i] != m:
            raise ConfigError(f"layer {i}'s attention has K/V multiplier {m}, the model's config says "
                              f"{model.config.kv_multipliers[i]}: the model was changed outside expand_kv; rebuild it")
        if m * f > MAX_KV_MULTIPLIER:
            raise ConfigError(f"layer {i}: K/V multiplier {m} x factor {f} = {m * f} is above the largest allowed, "
                              f"{MAX_KV_MULTIPLIER}: use a factor of at most {MAX_KV_MULTIPLIER // m} for this layer")
        if f > 1:
            plan.append((i, f))

    mapping: dict[nn.Parameter, Grow] = {}
    with torch.no_grad():
        for i, f in sorted(plan):
            attn = layers[i].self_attn
            for proj in (attn.k_proj, attn.v_proj):
                for param, noisy in ((proj.weight, True), (proj.bias, False)):
                    if param is None:
                        continue
                    old = param.data
                    tiling = RowTiling(tuple(old.shape), f)
                    new = tiling(old)
                    if noisy and noise_std > 0:
                        rows = old.shape[0]
                        scale = noise_std * old.float().std()
                        noise = torch.randn(new[rows:].shape, generator=generator, device=old.device)
                        new[rows:] += (noise * scale).to(old.dtype)
                    param.data = new
                    param.grad = None
                    mapping[param] = tiling
                proj.out_features *= f
            attn.kv_multiplier *= f
            model.config.kv_multipliers[i] *= f
    return mapping


def expand_to_multipliers(model: CLIPTextTransformer,
                          multipliers: list[int]) -> dict[nn.Parameter, Grow]:
    """Grows ``model`` (freshly built, e.g. on the ``meta`` device) to the per-layer K/V ``multipliers``, each a
    multiple of the layer's current one, with exact copies (no noise): what a resumed run does before
    ``load_state_dict`` of a checkpoint whose k/v weights were expanded. Returns :func:`expand_kv`'s mapping."""
    current = list(model.config.kv_multipliers)
    if not isinstance(multipliers, (list, tuple)) or len(multipliers) != len(current):
        raise ConfigError(f"the K/V multipliers to expand to are {multipliers!r}, expected a list of {len(current)} "
                          f"integers (one per layer), each a multiple of the current {current}")
    factors = {}
    for i, (target, m) in enumerate(zip(multipliers, current)):
        if not _is_int(target) or target < m or target % m:
            raise ConfigError(f"layer {i}'s K/V multiplier cannot grow from {m} to {target!r}: expected a multiple of "
                              f"{m} ({m}, {2 * m}, {3 * m}, ...) up to {MAX_KV_MULTIPLIER}")
        factors[i] = target // m
    return expand_kv(model, factors)
