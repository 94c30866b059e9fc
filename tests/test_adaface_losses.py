"""AdaFace's composition-distillation losses on hand-made tensors with known answers: orthogonal subtraction,
the compositional delta loss (Eq. 3-6), the elastic face-preserving loss (Eq. 7-8) and face masks on token grids."""

import pytest
import torch

from comfyui_idadapter.training.adaface_losses import (
    compositional_delta_loss,
    delta_loss_over,
    face_preserving_loss,
    mask_to_token_grid,
    orthogonal_delta,
    token_grid_shape,
)


def generator():
    return torch.Generator().manual_seed(0)


def randn(*shape, g, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype)


# --- orthogonal subtraction (Eq. 5-6) ---

def test_orthogonal_delta_is_orthogonal_to_feat_single():
    g = generator()
    compos, single = randn(3, 4, 5, g=g), randn(3, 4, 5, g=g)
    delta = orthogonal_delta(compos, single)
    assert delta.shape == compos.shape
    assert (delta.flatten(1) * single.flatten(1)).sum(1).abs().max() < 1e-6
    # float32 too, up to its rounding: the cosine of the angle to feat_single
    compos, single = compos.float(), single.float()
    delta = orthogonal_delta(compos, single)
    assert delta.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(delta.flatten(1), single.flatten(1), dim=1).abs().max() < 1e-6


def test_orthogonal_delta_ignores_the_scale_and_sign_of_feat_single():
    # The paper's Eq. 6, <a, b> b, would scale with |b|^2; the true projection does not.
    g = generator()
    compos, single = randn(2, 6, g=g), randn(2, 6, g=g)
    reference = orthogonal_delta(compos, single)
    for scale in (1e-3, 0.5, 7.0, 1e4, -2.0):
        torch.testing.assert_close(orthogonal_delta(compos, single * scale), reference, rtol=0, atol=1e-12)


def test_orthogonal_delta_keeps_an_orthogonal_feat_compos_and_zeroes_a_parallel_one():
    single = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    orthogonal = torch.tensor([[[2.0, -1.0], [3.0, 0.0]]])  # 2 - 2 + 0 + 0 = 0
    assert torch.equal(orthogonal_delta(orthogonal, single), orthogonal)
    assert orthogonal_delta(-2.5 * single, single).abs().max() < 1e-6


def test_orthogonal_delta_works_sample_by_sample():
    g = generator()
    compos, single = randn(3, 2, 4, g=g), randn(3, 2, 4, g=g)
    one_by_one = torch.cat([orthogonal_delta(compos[i:i + 1], single[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(orthogonal_delta(compos, single), one_by_one)


def test_orthogonal_delta_of_a_zero_feat_single_is_feat_compos_with_finite_gradients():
    compos = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    single = torch.zeros(1, 3, requires_grad=True)
    delta = orthogonal_delta(compos, single)
    assert torch.equal(delta.detach(), compos.detach())
    delta.sum().backward()
    assert torch.isfinite(compos.grad).all() and torch.isfinite(single.grad).all()


# --- compositional delta loss (Eq. 3-4) ---

SINGLE = torch.tensor([[1.0, 0.0, 0.0]])  # feat(subject) = feat(class): the deltas below are orthogonal to it
ALONG = torch.tensor([[0.0, 1.0, 0.0]])
ACROSS = torch.tensor([[0.0, 0.0, 1.0]])


@pytest.mark.parametrize("class_delta,expected", [(ALONG, 0.0), (-ALONG, 2.0), (ACROSS, 1.0), (3 * ALONG, 0.0)])
def test_compositional_delta_loss_is_one_minus_the_cosine_of_the_deltas(class_delta, expected):
    loss = compositional_delta_loss(SINGLE, SINGLE + ALONG, SINGLE, SINGLE + class_delta)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_compositional_delta_loss_is_zero_for_identical_subject_and_class_inputs():
    g = generator()
    single, compos = randn(2, 4, 3, g=g), randn(2, 4, 3, g=g)
    assert compositional_delta_loss(single, compos, single, compos).item() == pytest.approx(0.0, abs=1e-12)


def test_compositional_delta_loss_is_the_batch_mean_over_sampled_compos_prompts():
    single, compos = SINGLE.repeat(2, 1), (SINGLE + ALONG).repeat(2, 1)
    class_compos = torch.cat([SINGLE + ALONG, SINGLE - ALONG])  # per sample: 0 and 2
    assert compositional_delta_loss(single, compos, single, class_compos).item() == pytest.approx(1.0)


def test_compositional_delta_loss_ignores_the_scale_of_the_subject_specific_part():
    # feat(subject, compos) = s * feat(subject) + compos: the subject part may shrink under a compositional prompt.
    g = generator()
    subject_single, compos = randn(2, 5, 4, g=g), randn(2, 5, 4, g=g)
    class_single, class_compos = randn(2, 5, 4, g=g), randn(2, 5, 4, g=g)
    losses = [compositional_delta_loss(subject_single, scale * subject_single + compos, class_single, class_compos)
              for scale in (0.0, 0.1, 1.0, 5.0, -3.0)]
    assert max(losses).item() - min(losses).item() < 1e-12
    assert 0.1 < losses[0].item() < 1.9  # a real, non-trivial loss


def test_compositional_delta_loss_trains_the_subject_branch_only():
    g = generator()
    four = [randn(2, 3, 4, g=g, dtype=torch.float32).requires_grad_() for _ in range(4)]
    compositional_delta_loss(*four).backward()
    subject_single, subject_compos, class_single, class_compos = four
    assert subject_single.grad.abs().sum() > 0 and subject_compos.grad.abs().sum() > 0
    assert class_single.grad is None and class_compos.grad is None

    for t in four:
        t.grad = None
    compositional_delta_loss(*four, detach_class=False).backward()
    assert class_single.grad.abs().sum() > 0 and class_compos.grad.abs().sum() > 0


def test_compositional_delta_loss_computes_half_precision_features_in_float32():
    loss = compositional_delta_loss(*(t.half() for t in (SINGLE, SINGLE + ALONG, SINGLE, SINGLE - ALONG)))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(2.0)


def test_compositional_delta_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="four tensors of one shape"):
        compositional_delta_loss(SINGLE, SINGLE, SINGLE, torch.zeros(1, 4))


def test_delta_loss_over_averages_layers_within_a_type_and_sums_the_types():
    zero = (SINGLE, SINGLE + ALONG, SINGLE, SINGLE + ALONG)
    one = (SINGLE, SINGLE + ALONG, SINGLE, SINGLE + ACROSS)
    two = (SINGLE, SINGLE + ALONG, SINGLE, SINGLE - ALONG)
    total, logs = delta_loss_over({
        "ca_out/down.0": zero, "ca_out/mid": two, "ca_out/up.1": two,  # mean 4/3
        "ca_map/down.0": one,  # 1
        "prompt_embeds": two,  # 2
    })
    assert total.item() == pytest.approx(4 / 3 + 1 + 2)
    assert {name: round(v.item(), 6) for name, v in logs.items()} == {
        "ca_out/down.0": 0.0, "ca_out/mid": 2.0, "ca_out/up.1": 2.0, "ca_map/down.0": 1.0, "prompt_embeds": 2.0}
    assert not any(v.requires_grad for v in logs.values())
    with pytest.raises(ValueError, match="no features"):
        delta_loss_over({})


# --- elastic face-preserving loss (Eq. 7-8) ---

def one_hot_queries(batch, pixels, norm=20.0):
    """Queries whose unscaled inner products are norm^2 on the diagonal, 0 elsewhere: CA = identity."""
    return (norm * torch.eye(pixels, dtype=torch.float64)).expand(batch, pixels, pixels).clone()


def test_face_preserving_loss_is_zero_for_identical_instances():
    g = generator()
    queries, feats = one_hot_queries(2, 6), randn(2, 6, 3, g=g)
    mask = torch.tensor([[1, 1, 0, 0.5, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float64)
    assert face_preserving_loss(queries, queries, feats, feats, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_face_preserving_loss_matches_a_moved_face_elastically():
    # The compos image is the single one with its pixels shuffled: the soft warp finds each pixel again.
    g = generator()
    queries, feats = one_hot_queries(1, 8), randn(1, 8, 4, g=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    permutation = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = face_preserving_loss(queries, queries[:, permutation], feats, feats[:, permutation], mask)
    assert shuffled.item() == pytest.approx(0.0, abs=1e-12)
    # Without the warp, the same shuffle would be a large misalignment.
    assert face_preserving_loss(queries, queries, feats, feats[:, permutation], mask).item() > 0.3


def test_face_preserving_loss_grows_with_misalignment():
    g = generator()
    queries, feats, others = one_hot_queries(2, 5), randn(2, 5, 6, g=g), randn(2, 5, 6, g=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0.5, 1, 1, 0]], dtype=torch.float64)
    losses = [face_preserving_loss(queries, queries, feats, (1 - t) * feats + t * others, mask).item()
              for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert losses[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_face_preserving_loss_inner_product_is_unscaled():
    # footnote 2: softmax(Q_s Q_cᵀ), no 1/sqrt(Cq); a hand-written Eq. 7-8 on random queries agrees.
    g = generator()
    q_single, q_compos = randn(2, 5, 3, g=g), randn(2, 7, 3, g=g)
    f_single, f_compos = randn(2, 5, 4, g=g), randn(2, 7, 4, g=g)
    mask = torch.tensor([[1, 0, 0.5, 1, 0], [0.25, 1, 1, 0, 1]], dtype=torch.float64)
    expected = []
    for b in range(2):
        warped = torch.softmax(q_single[b] @ q_compos[b].T, dim=1) @ f_compos[b]
        cos = (warped * f_single[b]).sum(1) / (warped.norm(dim=1) * f_single[b].norm(dim=1))
        expected.append((mask[b] * (1 - cos)).sum() / mask[b].sum())
    loss = face_preserving_loss(q_single, q_compos, f_single, f_compos, mask)
    assert loss.item() == pytest.approx(sum(expected).item() / 2, abs=1e-12)
    scaled = face_preserving_loss(q_single / 3 ** 0.25, q_compos / 3 ** 0.25, f_single, f_compos, mask)
    assert abs(scaled.item() - loss.item()) > 1e-4


def test_face_preserving_loss_ignores_pixels_outside_the_mask():
    g = generator()
    q_single, q_compos = randn(1, 6, 3, g=g), randn(1, 6, 3, g=g)
    f_single, f_compos = randn(1, 6, 4, g=g), randn(1, 6, 4, g=g)
    mask = torch.tensor([[1, 0, 0.5, 1, 0, 0]], dtype=torch.float64)
    loss = face_preserving_loss(q_single, q_compos, f_single, f_compos, mask)
    outside = (mask == 0).unsqueeze(-1)
    changed = face_preserving_loss(torch.where(outside, randn(1, 6, 3, g=g), q_single), q_compos,
                                   torch.where(outside, randn(1, 6, 4, g=g), f_single), f_compos, mask)
    assert changed.item() == pytest.approx(loss.item(), abs=1e-12)
    # With CA = identity, the compos features outside the face do not count either.
    queries = one_hot_queries(1, 6)
    loss = face_preserving_loss(queries, queries, f_single, f_compos, mask)
    f_compos_changed = torch.where(outside, randn(1, 6, 4, g=g), f_compos)
    changed = face_preserving_loss(queries, queries, f_single, f_compos_changed, mask)
    assert changed.item() == pytest.approx(loss.item(), abs=1e-12)


def test_face_preserving_loss_skips_samples_without_a_face():
    g = generator()
    q_single, q_compos = randn(2, 4, 3, g=g), randn(2, 4, 3, g=g)
    f_single, f_compos = randn(2, 4, 5, g=g), randn(2, 4, 5, g=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.float64)
    both = face_preserving_loss(q_single, q_compos, f_single, f_compos, mask)
    first = face_preserving_loss(q_single[:1], q_compos[:1], f_single[:1], f_compos[:1], mask[:1])
    assert both.item() == pytest.approx(first.item(), abs=1e-12) and first.item() > 0.1


def test_face_preserving_loss_of_an_empty_mask_is_a_zero_with_a_clean_backward():
    g = generator()
    tensors = [randn(2, 4, 3, g=g, dtype=torch.float32).requires_grad_() for _ in range(4)]
    loss = face_preserving_loss(*tensors, torch.zeros(2, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    q_single, q_compos, _, f_compos = tensors
    for t in (q_single, q_compos, f_compos):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_face_preserving_loss_trains_the_compos_branch_and_keeps_feat_single_as_the_reference():
    g = generator()
    q_single, q_compos, f_single, f_compos = [randn(1, 4, 3, g=g, dtype=torch.float32).requires_grad_()
                                              for _ in range(4)]
    face_preserving_loss(q_single, q_compos, f_single, f_compos, torch.ones(1, 4)).backward()
    assert f_single.grad is None
    assert f_compos.grad.abs().sum() > 0 and q_single.grad.abs().sum() > 0 and q_compos.grad.abs().sum() > 0


def test_face_preserving_loss_rejects_mismatched_shapes():
    q, f = torch.zeros(1, 4, 3), torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match=r"mask \[B, N\]"):
        face_preserving_loss(q, q, f, f, torch.ones(1, 5))
    with pytest.raises(ValueError, match="feat_compos"):
        face_preserving_loss(q, q, f, torch.zeros(1, 4, 6), torch.ones(1, 4))


# --- face masks on token grids ---

def test_mask_to_token_grid_averages_blocks_when_shrinking():
    mask = torch.tensor([[[1, 1, 0, 0],
                          [1, 1, 0, 1],
                          [0, 0, 1, 1],
                          [1, 0, 1, 1]]], dtype=torch.float32)
    grid = mask_to_token_grid(mask, 4, 1.0)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 0.25, 0.25, 1.0]]))
    torch.testing.assert_close(mask_to_token_grid(mask.bool(), 4, (64, 64)), grid)


def test_mask_to_token_grid_follows_a_non_square_aspect():
    # A tall 4 x 2 mask on an 8-token grid of a 2:1 (height:width) latent: 4 rows x 2 columns, row by row.
    mask = torch.tensor([[[1, 0], [1, 0], [0, 0], [0, 1]]], dtype=torch.float32).repeat_interleave(2, 1)
    assert token_grid_shape(8, 2.0) == (4, 2) and token_grid_shape(8, 0.5) == (2, 4)
    torch.testing.assert_close(mask_to_token_grid(mask, 8, (96, 48)),
                               torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 1]]))
    # The same mask on a wide 2 x 4 grid stretches horizontally and stays in [0, 1].
    wide = mask_to_token_grid(mask, 8, 0.5)
    assert wide.shape == (1, 8) and 0 <= wide.min() and wide.max() <= 1


@pytest.mark.parametrize("latent", [(64, 64), (96, 64), (75, 55), (128, 72), (13, 9)])
def test_token_grid_shape_finds_every_unet_level_of_a_latent(latent):
    h, w = latent
    for _ in range(4):  # the UNet's stride-2 convolutions: ceil(size / 2)
        assert token_grid_shape(h * w, latent) == (h, w)
        assert token_grid_shape(h * w, latent[0] / latent[1]) == (h, w)
        h, w = -(-h // 2), -(-w // 2)


def test_mask_to_token_grid_explains_a_token_count_that_fits_no_grid():
    with pytest.raises(ValueError, match=r"no h x w token grid with h \* w == 7 has the latent's aspect 1"):
        mask_to_token_grid(torch.ones(1, 8, 8), 7, 1.0)
    with pytest.raises(ValueError, match="h \\* w == 6"):
        token_grid_shape(6, (64, 64))
    with pytest.raises(ValueError, match=r"mask \[B, H, W\]"):
        mask_to_token_grid(torch.ones(1, 1, 8, 8), 4, 1.0)
