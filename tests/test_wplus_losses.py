"""W+ adapter stage II pieces on hand-made tensors with known answers: face masks (erode, blur, latent grid), the
disentanglement and regularisation losses (outside-the-face MSE), W+ augmentations and drop-out."""

import pytest
import torch

from comfyui_idadapter.training.wplus_losses import (
    apply_wplus_dropout,
    augment_wplus,
    disentanglement_loss,
    face_region_mask,
    mask_to_latent,
    prepare_mask,
    regularisation_loss,
    wplus_dropout,
)

LOSSES = [disentanglement_loss, regularisation_loss]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def face_mask(batch=2, h=8, w=8):
    """A hard face square in rows/cols 2..5 of an 8 x 8 latent."""
    mask = torch.zeros(batch, h, w, dtype=torch.float64)
    mask[:, 2:6, 2:6] = 1
    return mask


# --- face masks ---

def test_box_mask_is_ones_inside_zeros_far_outside_and_in_unit_range():
    mask = face_region_mask(torch.tensor([[20.0, 30.0, 80.0, 100.0]]), (128, 112), erode=8, blur=7)
    assert mask.shape == (1, 128, 112)
    assert mask.min() >= 0 and mask.max() <= 1
    assert torch.allclose(mask[0, 45:85, 35:65], torch.ones(40, 30))  # 1 up to the blur kernel's rounding
    assert mask[0, :20].abs().max() == 0 and mask[0, 110:].abs().max() == 0 and mask[0, :, :10].abs().max() == 0
    assert 0 < mask[0, 34, 50] < 1  # the blurred rim near the eroded edge (y0 + 4)


def test_box_mask_without_erosion_or_blur_is_the_box_and_erosion_shrinks_it():
    box = torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    plain = face_region_mask(box, (64, 64), erode=0, blur=0)
    assert plain.sum() == 20 * 28 and torch.all(plain[0, 12:40, 10:30] == 1)
    for erode in (2, 5, 8):
        eroded = face_region_mask(box, (64, 64), erode=erode, blur=0)
        # a square kernel of side e takes e - 1 pixels off each side length
        assert eroded.sum() == (20 - erode + 1) * (28 - erode + 1)
    blurred = [face_region_mask(box, (64, 64), erode=e, blur=7).sum() for e in (0, 4, 8)]
    assert blurred[0] > blurred[1] > blurred[2]


def test_prepare_mask_blur_keeps_mass_and_erosion_spares_the_image_border():
    mask = torch.zeros(1, 32, 32)
    mask[0, 8:24, 8:24] = 1
    blurred = prepare_mask(mask, erode=0, blur=7)
    assert blurred.sum().item() == pytest.approx(256, rel=1e-5)
    assert torch.equal(prepare_mask(torch.ones(1, 16, 16), erode=9, blur=5), torch.ones(1, 16, 16))
    assert torch.equal(prepare_mask(mask.bool(), erode=0, blur=0), mask)


def test_mask_to_latent_area_averages():
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, :4] = 1
    latent = mask_to_latent(mask, (2, 2))
    assert torch.allclose(latent, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    assert mask_to_latent(mask, (32, 32)).shape == (1, 32, 32)


# --- losses ---

@pytest.mark.parametrize("loss", LOSSES)
def test_loss_is_zero_when_only_the_face_changes_and_positive_otherwise(loss):
    g = gen()
    mask = face_mask()
    base = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    inside = base.clone()
    inside[:, :, 2:6, 2:6] += torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    assert loss(inside, base, mask).item() == 0
    outside = inside.clone()
    outside[:, :, 0, 0] += 1
    assert loss(outside, base, mask).item() > 0


@pytest.mark.parametrize("loss", LOSSES)
def test_changes_inside_the_mask_never_matter(loss):
    g = gen(1)
    mask = face_mask()
    a, b = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a2, b2 = a.clone(), b.clone()
    a2[:, :, 2:6, 2:6] = 100.0
    b2[:, :, 2:6, 2:6] = -7.0
    assert loss(a2, b2, mask).item() == pytest.approx(loss(a, b, mask).item(), rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_normalised_by_outside_area_per_sample(loss):
    # diff² = [[1, 4], [9, 16]], outside weight 1 - mask = [[0, 1], [1, 0.5]]:
    # (4 + 9 + 8) / 2.5 = 8.4 for sample 0; sample 1 is all face (no outside) and contributes 0 to the mean.
    diff = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    a = torch.stack([diff, diff]).unsqueeze(1)
    b = torch.zeros_like(a)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.5]], [[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    assert loss(a, b, mask).item() == pytest.approx(8.4 / 2)
    assert loss(a[:1], b[:1], mask[:1]).item() == pytest.approx(8.4)
    # two channels with the same outside area: the mean over channels too
    a2 = torch.cat([a[:1], 2 * a[:1]], dim=1)
    assert loss(a2, b[:1].repeat(1, 2, 1, 1), mask[:1, None]).item() == pytest.approx((21 + 84) / (2 * 2.5))


def test_regularisation_without_mask_is_the_official_plain_mse():
    g = gen(2)
    a, b = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    assert regularisation_loss(a, b, None).item() == pytest.approx(torch.nn.functional.mse_loss(a, b).item())
    no_face = torch.zeros(3, 5, 6)
    assert regularisation_loss(a, b, no_face).item() == pytest.approx(regularisation_loss(a, b, None).item())


@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_reaches_only_the_student_and_only_outside_the_face(loss):
    g = gen(3)
    mask = face_mask(1)
    student = torch.randn(1, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(1, 4, 8, 8, generator=g, requires_grad=True)
    loss(student, target, mask).backward()
    assert target.grad is None
    grad = student.grad
    assert grad[:, :, 2:6, 2:6].abs().max() == 0
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert torch.all(grad[:, :, outside] != 0)


def test_losses_reject_mismatched_shapes():
    a = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError):
        disentanglement_loss(a, torch.zeros(2, 4, 8, 7), face_mask())
    with pytest.raises(ValueError):
        regularisation_loss(a, a, torch.zeros(2, 16, 16))


# --- augmentation ---

def test_shuffle_is_a_seeded_derangement():
    w = torch.arange(7, dtype=torch.float32).view(7, 1, 1).expand(7, 18, 512)
    for seed in range(20):
        out = augment_wplus(w, "shuffle", gen(seed))
        source = out[:, 0, 0].long()
        assert sorted(source.tolist()) == list(range(7))
        assert torch.all(source != torch.arange(7))
        assert torch.equal(out, w[source])
    assert torch.equal(augment_wplus(w, "shuffle", gen(5)), augment_wplus(w, "shuffle", gen(5)))
    two = augment_wplus(w[:2], "shuffle", gen(0))
    assert torch.equal(two, w[[1, 0]])
    single = augment_wplus(w[:1], "shuffle", gen(0))
    assert torch.equal(single, w[:1]) and single.data_ptr() != w.data_ptr()


def test_gaussian_has_the_given_std_and_is_seeded():
    w = torch.randn(64, 18, 512, generator=gen(4))
    out = augment_wplus(w, "gaussian", gen(5), std=0.3)
    noise = out - w
    assert noise.std().item() == pytest.approx(0.3, rel=0.01)
    assert abs(noise.mean().item()) < 0.003
    assert torch.equal(out, augment_wplus(w, "gaussian", gen(5), std=0.3))
    official = augment_wplus(w, "gaussian", gen(6)) - w  # s · N(mean(w), std(w)), |s| <= 8
    assert 0 < official.std().item() <= 8 * w.std().item() * 1.01


def test_direction_edit_changes_exactly_the_directions_rows():
    w = torch.randn(4, 18, 512, generator=gen(7), dtype=torch.float64)
    direction = torch.zeros(18, 512, dtype=torch.float64)
    direction[3:6] = torch.randn(3, 512, generator=gen(8), dtype=torch.float64)
    out = augment_wplus(w, "direction", gen(9), direction=direction, strength_range=(1.0, 2.0))
    changed = (out != w).any(dim=2)  # [B, 18]
    assert torch.all(changed[:, 3:6]) and not changed[:, :3].any() and not changed[:, 6:].any()
    # one strength per sample, within the range
    strength = (out - w)[:, 3:6] / direction[3:6]
    per_sample = strength.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), rtol=1e-5, atol=1e-5)
    assert torch.all((per_sample[:, 0] >= 1 - 1e-4) & (per_sample[:, 0] <= 2 + 1e-4))
    assert torch.equal(out, augment_wplus(w, "direction", gen(9), direction=direction, strength_range=(1.0, 2.0)))


def test_augment_rejects_bad_arguments():
    w = torch.zeros(2, 18, 512)
    with pytest.raises(ValueError):
        augment_wplus(w, "mixup")
    with pytest.raises(ValueError):
        augment_wplus(w, "direction")
    with pytest.raises(ValueError):
        augment_wplus(w, "direction", direction=torch.zeros(18, 256))


# --- drop-out ---

def test_dropout_rates_follow_the_three_exclusive_cases_and_are_seeded():
    n = 200_000
    drop_w, drop_t = wplus_dropout(n, 0.05, 0.05, 0.05, gen(10))
    assert drop_w.dtype == torch.bool and drop_w.shape == (n,)
    assert drop_w.float().mean().item() == pytest.approx(0.10, abs=0.004)
    assert drop_t.float().mean().item() == pytest.approx(0.10, abs=0.004)
    assert (drop_w & drop_t).float().mean().item() == pytest.approx(0.05, abs=0.003)
    only_w, only_t = wplus_dropout(n, 0.2, 0.0, 0.0, gen(11))
    assert not only_t.any() and only_w.float().mean().item() == pytest.approx(0.2, abs=0.005)
    again = wplus_dropout(n, 0.05, 0.05, 0.05, gen(10))
    assert torch.equal(again[0], drop_w) and torch.equal(again[1], drop_t)
    with pytest.raises(ValueError):
        wplus_dropout(4, 0.5, 0.4, 0.2)


def test_dropped_wplus_is_the_zero_code():
    w = torch.randn(3, 18, 512, generator=gen(12))
    out = apply_wplus_dropout(w, torch.tensor([False, True, False]))
    assert torch.equal(out[1], torch.zeros(18, 512)) and torch.equal(out[[0, 2]], w[[0, 2]])
