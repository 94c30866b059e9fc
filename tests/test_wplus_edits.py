"""W+ edits and direction / code files (nodes/arch/wplus_edits.py) against the official formulas
(official-checkpoints.md §3.5, §5)."""

import os

import numpy as np
import pytest
import torch

from comfyui_idadapter.nodes.arch import wplus_edits as edits
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError


def code(seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 18, 512, generator=gen) * 0.5 + 0.15  # e4e codes: mean ~0.15, std ~0.48


def dyadic(shape, seed, scale=2 ** -8):
    """Values on a coarse binary grid: every sum of a few of them is exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1024, 1024, shape, generator=gen).float() * scale


def unit(seed, shape=(1, 512)):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(*shape, generator=gen)
    return d / d.norm()


def hand_made_pca(count=6, seed=0):
    """Orthonormal components [K, 1, 512], a mean [1, 512] and stdevs [K], the layout of ffhq_pca.pt."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(512, count, generator=gen))
    return {"mean": torch.randn(1, 512, generator=gen) * 0.1, "comp": q.T.reshape(count, 1, 512).contiguous(),
            "std": torch.rand(count, generator=gen) * 2 + 0.5}


def pca_of(data):
    return edits.GanSpace(data["mean"].reshape(512).double(), data["comp"].reshape(-1, 512).double(),
                          data["std"].double())


# ---- identity and inverse


def test_zero_strength_is_the_identity():
    w = code()
    d = unit(1)
    assert torch.equal(edits.apply_interfacegan(w, d, 0.0), w)
    assert torch.equal(edits.apply_latent_direction(w, torch.randn(18, 512), 0), w)
    pca = pca_of(hand_made_pca())
    assert torch.equal(edits.apply_ganspace(w, pca, 2, 0.0, 0, 18, relative=True), w)
    # the official GANSpace strength is an absolute coordinate: the identity is at the code's own coordinate
    coordinate = edits.ganspace_coordinate(w, pca, 2).item()
    assert torch.equal(edits.apply_ganspace(w, pca, 2, coordinate, 0, 18), w)
    assert not torch.equal(edits.apply_ganspace(w, pca, 2, 0.0, 0, 18), w)
    out = edits.apply_interfacegan(w, d, 0.0)
    assert out is not w  # a copy: editing it never changes the input


@pytest.mark.parametrize("strength", [1, -4, 3.5, 0.125])
def test_edit_then_inverse_edit_returns_the_original_exactly(strength):
    w = dyadic((2, 18, 512), 0)
    d1, d18 = dyadic((1, 512), 1), dyadic((18, 512), 2)
    for edit, direction in ((edits.apply_interfacegan, d1), (edits.apply_latent_direction, d18),
                            (edits.apply_direction, d18)):
        there = edit(w, direction, strength)
        assert not torch.equal(there, w)
        assert torch.equal(edit(there, direction, -strength), w)
    pca = edits.GanSpace(torch.zeros(512, dtype=torch.float64), dyadic((4, 512), 3).double(),
                         torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64))
    there = edits.apply_ganspace(w, pca, 3, strength, 4, 9, relative=True)
    assert torch.equal(edits.apply_ganspace(there, pca, 3, -strength, 4, 9, relative=True), w)


def test_inverse_edit_of_arbitrary_codes_is_within_one_rounding():
    """Sums of arbitrary float32 values are rounded, so -strength undoes an edit up to one rounding per value."""
    w = code(3)
    there = edits.apply_interfacegan(w, unit(4), 3.7)
    back = edits.apply_interfacegan(there, unit(4), -3.7)
    ulp = torch.nextafter(there.abs(), torch.tensor(float("inf"))) - there.abs()
    assert ((back - w).abs() <= ulp).all()


def test_official_ganspace_inverse_and_target_coordinate():
    data = hand_made_pca()
    pca, w = pca_of(data), code(5)
    before = edits.ganspace_coordinate(w, pca, 1)
    # rows from 0: row 0 moves to the target coordinate, and the original coordinate as target undoes it
    there = edits.apply_ganspace(w, pca, 1, 4.0, 0, 5)
    torch.testing.assert_close(edits.ganspace_coordinate(there, pca, 1), torch.tensor([4.0], dtype=torch.float64),
                               rtol=0, atol=1e-5)  # the edited code is rounded to float32
    torch.testing.assert_close(edits.apply_ganspace(there, pca, 1, before.item(), 0, 5), w, rtol=0, atol=1e-6)
    # rows after 0: the coordinate is still measured on row 0 (unchanged), so the inverse target is 2 * coord - s
    there = edits.apply_ganspace(w, pca, 1, 4.0, 4, 5)
    torch.testing.assert_close(edits.apply_ganspace(there, pca, 1, 2 * before.item() - 4.0, 4, 5), w, rtol=0,
                               atol=1e-6)


# ---- rows and formulas


def test_the_layer_range_is_respected():
    w = code(1)
    d = torch.randn(18, 512)
    for start, end in ((0, 8), (3, 7), (17, 18), (0, 18)):
        out = edits.apply_direction(w, d, 2.0, start, end)
        assert torch.equal(out[:, :start], w[:, :start]) and torch.equal(out[:, end:], w[:, end:])
        assert (out[:, start:end] != w[:, start:end]).any(dim=-1).all()
    assert torch.equal(edits.apply_latent_direction(w, d, 2.0)[:, 8:], w[:, 8:])
    out = edits.apply_ganspace(w, pca_of(hand_made_pca()), 0, 3.0, 6, 9)
    assert torch.equal(out[:, :6], w[:, :6]) and torch.equal(out[:, 9:], w[:, 9:])
    for start, end in ((5, 5), (-1, 4), (0, 19), (8, 2)):
        with pytest.raises(ConfigError, match="0 <= start < end <= 18"):
            edits.apply_direction(w, d, 1.0, start, end)


def test_official_interfacegan_and_latent_direction_formulas():
    w = code(2)
    d = unit(7)  # InterFaceGAN age/smile: float32 [1, 512], unit norm
    official = w + 3 * d.unsqueeze(0).repeat(1, 18, 1)  # get_direction_from_interfacegan, then w + k * d
    torch.testing.assert_close(edits.apply_interfacegan(w, d, 3), official, rtol=0, atol=1e-6)
    assert (edits.apply_interfacegan(w, d, 3) - w)[:, 17].abs().max() > 0.01  # every row moves
    # latent directions: float64 [18, 512]; the notebook's id_noise[:, :8] = (id_noise0 + i * direction)[:, :8]
    d64 = torch.randn(18, 512, dtype=torch.float64)
    expected = w.clone()
    expected[:, :8] = (w + -2 * d64.unsqueeze(0))[:, :8]
    assert torch.equal(edits.apply_latent_direction(w, d64, -2), expected)


def official_get_delta(pca, latent, idx, strength):
    """script/utils_direction.py get_delta, as written there (float32 like the latent)."""
    w_centered = latent - pca["mean"].to(latent)
    lat_comp = pca["comp"].to(latent)
    lat_std = pca["std"].to(latent)
    w_coord = torch.sum(w_centered[0].reshape(-1) * lat_comp[idx].reshape(-1)) / lat_std[idx]
    return (strength - w_coord) * lat_comp[idx] * lat_std[idx]


def test_ganspace_matches_the_official_formula_on_hand_made_components():
    # an exact case: component 0 is e_0, mean 0, stdev 2, row 0 has 3 on axis 0 -> coordinate 1.5
    comp = torch.zeros(2, 1, 512)
    comp[0, 0, 0] = comp[1, 0, 1] = 1
    data = {"mean": torch.zeros(1, 512), "comp": comp, "std": torch.tensor([2.0, 1.0])}
    w = torch.zeros(1, 18, 512)
    w[0, 0, 0] = 3.0
    assert edits.ganspace_coordinate(w, pca_of(data), 0).item() == 1.5
    delta = edits.ganspace_delta(w, pca_of(data), 0, 4.0)
    assert delta[0, 0].item() == (4.0 - 1.5) * 2.0 and delta[0, 1:].abs().max() == 0
    assert edits.ganspace_delta(w, pca_of(data), 0, 4.0, relative=True)[0, 0].item() == 8.0
    # random components: the official get_direction_from_ganspace (delta padded onto rows start:end) + w
    data = hand_made_pca(count=8, seed=4)
    for index, start, end, strength in ((46, 4, 5, -20), (34, 10, 11, 20), (37, 0, 5, 20)):
        index %= 8
        w = code(index)
        latent = w[0]
        delta = official_get_delta(data, latent, index, strength)
        padded = torch.zeros(latent.shape)
        padded[start:end] += delta.repeat(end - start, 1)
        official = w + padded.unsqueeze(0)
        torch.testing.assert_close(edits.apply_ganspace(w, pca_of(data), index, strength, start, end), official,
                                   rtol=0, atol=2e-5)
    # a batch: each code's own coordinate
    batch = torch.cat([code(1), code(2)])
    out = edits.apply_ganspace(batch, pca_of(data), 3, 2.0, 0, 18)
    for i in range(2):
        torch.testing.assert_close(out[i:i + 1], edits.apply_ganspace(batch[i:i + 1], pca_of(data), 3, 2.0, 0, 18))
    with pytest.raises(ConfigError, match="component index must be an integer from 0 to 7"):
        edits.apply_ganspace(w, pca_of(data), 8, 1.0, 0, 18)


def test_interpolation_endpoints_and_midpoint():
    a, b = code(1), code(2)
    assert torch.equal(edits.interpolate(a, b, 0.0), a)
    assert torch.equal(edits.interpolate(a, b, 1.0), b)
    torch.testing.assert_close(edits.interpolate(a, b, 0.5), (a + b) / 2)
    torch.testing.assert_close(edits.interpolate(a, b, 0.25), 0.75 * a + 0.25 * b)
    pair = edits.interpolate(a[0], torch.cat([a, b]), 1.0)  # one code against two
    assert pair.shape == (2, 18, 512) and torch.equal(pair[1], b[0])
    with pytest.raises(ConfigError, match="cannot interpolate W\\+ codes"):
        edits.interpolate(torch.cat([a, b]), torch.cat([a, b, a]), 0.5)
    with pytest.raises(ConfigError, match="finite number"):
        edits.interpolate(a, b, float("nan"))


def test_bad_codes_and_strengths_are_refused():
    with pytest.raises(ConfigError, match=r"shaped \[18, 512\] or \[batch, 18, 512\].*got \(1, 14, 512\)"):
        edits.apply_interfacegan(torch.zeros(1, 14, 512), unit(0), 1.0)
    nan = code()
    nan[0, 3, 3] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        edits.apply_interfacegan(nan, unit(0), 1.0)
    with pytest.raises(ConfigError, match="strength must be a finite number"):
        edits.apply_interfacegan(code(), unit(0), float("inf"))
    with pytest.raises(ConfigError, match="direction must be shaped"):
        edits.apply_interfacegan(code(), torch.zeros(2, 512), 1.0)


# ---- direction files


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_npy_directions_load_with_the_official_rows(tmp_path):
    d = np.random.default_rng(0).standard_normal((18, 512))
    np.save(tmp_path / "smile.npy", d)
    direction = edits.load_direction(str(tmp_path / "smile.npy"))
    assert direction.kind == "latent" and (direction.start, direction.end) == (0, 8)
    assert direction.vector.dtype == torch.float64 and torch.equal(direction.vector, torch.from_numpy(d))
    w = code()
    as_tensor = edits.apply_latent_direction(w, torch.from_numpy(d), 2.0)
    assert torch.equal(edits.apply_direction(w, direction, 2.0), as_tensor)
    # InterFaceGAN's own boundaries are .npy [1, 512]: every row
    np.save(tmp_path / "age.npy", d[:1].astype(np.float32))
    age = edits.load_direction(str(tmp_path / "age.npy"))
    assert age.kind == "interfacegan" and (age.start, age.end) == (0, 18)
    assert torch.equal(age.vector, torch.from_numpy(d[:1].astype(np.float32)).double().expand(18, 512))


def test_npy_loader_refuses_pickles_wrong_shapes_and_nan(tmp_path):
    marker = tmp_path / "marker"
    np.save(tmp_path / "objects.npy", np.array([WritesMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ModelFileError, match=r"holds Python objects \(a pickled object array\)"):
        edits.load_direction(str(tmp_path / "objects.npy"))
    assert not marker.exists()
    np.save(tmp_path / "short.npy", np.zeros((17, 512)))
    with pytest.raises(ModelFileError, match=r"shaped \(17, 512\), expected \[512\], \[1, 512\], \[18, 512\]"):
        edits.load_direction(str(tmp_path / "short.npy"))
    np.save(tmp_path / "ints.npy", np.zeros((18, 512), dtype=np.int32))
    with pytest.raises(ModelFileError, match="int32 values, expected floating-point"):
        edits.load_direction(str(tmp_path / "ints.npy"))
    bad = np.zeros((18, 512))
    bad[4, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        edits.load_direction(str(tmp_path / "nan.npy"))
    # a header that declares a huge array is refused from the header, before numpy allocates anything
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 9, 512)})
    with pytest.raises(ModelFileError, match=r"shaped \(1000000000, 512\)"):
        edits.load_direction(str(huge))
    np.save(tmp_path / "cut.npy", np.zeros((18, 512)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="cannot be read"):
        edits.load_direction(str(tmp_path / "cut.npy"))
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ModelFileError, match="not a readable .npy file"):
        edits.load_direction(str(tmp_path / "text.npy"))


def test_pt_directions_interfacegan_pose_and_ganspace(tmp_path):
    d = unit(3)
    torch.save(d, tmp_path / "age.pt")
    age = edits.load_direction(str(tmp_path / "age.pt"))
    assert age.kind == "interfacegan" and (age.start, age.end) == (0, 18)
    w = code()
    assert torch.equal(edits.apply_direction(w, age, 2.0), edits.apply_interfacegan(w, d, 2.0))
    pose = torch.randn(1, 18, 512)
    torch.save(pose, tmp_path / "pose.pt")
    loaded = edits.load_direction(str(tmp_path / "pose.pt"))
    assert (loaded.start, loaded.end) == (0, 18) and torch.equal(loaded.vector, pose[0].double())
    data = hand_made_pca()
    torch.save(data, tmp_path / "ffhq_pca.pt")
    pca = edits.load_direction(str(tmp_path / "ffhq_pca.pt"))
    assert isinstance(pca, edits.GanSpace) and pca.components.shape == (6, 512)
    assert torch.equal(pca.components, data["comp"].reshape(6, 512).double())
    assert torch.equal(pca.mean, data["mean"].reshape(512).double()) and torch.equal(pca.stdev, data["std"].double())


@pytest.mark.parametrize("content, message", [
    (torch.zeros(2, 512), r"direction shaped \(2, 512\)"),
    (torch.full((1, 512), float("nan")), "NaN or infinite"),
    (torch.zeros(1, 512, dtype=torch.int64), "torch.int64 values, expected floating-point"),
    ({"mean": torch.zeros(1, 512), "comp": torch.zeros(4, 1, 512)}, r"missing \['std'\]"),
    ({"mean": torch.zeros(1, 512), "comp": torch.zeros(4, 1, 512), "std": torch.zeros(5)},
     r"comp is shaped \(4, 1, 512\), expected \[5, 1, 512\]"),
    ({"mean": torch.zeros(1, 512), "comp": torch.zeros(4, 1, 512), "std": torch.tensor([1.0, 0.0, 1.0, 1.0])},
     "values <= 0"),
    ({"mean": torch.zeros(1, 512), "comp": torch.full((4, 1, 512), float("inf")), "std": torch.ones(4)},
     "'comp' holds NaN or infinite"),
    ({"mean": torch.zeros(1, 511), "comp": torch.zeros(4, 1, 512), "std": torch.ones(4)}, r"mean is shaped \(1, 511\)"),
    ([1, 2, 3], "holds a list, expected a tensor"),
])
def test_pt_loader_refuses_wrong_shapes_and_nan(tmp_path, content, message):
    torch.save(content, tmp_path / "d.pt")
    with pytest.raises(ModelFileError, match=message):
        edits.load_direction(str(tmp_path / "d.pt"))


def test_pt_loader_never_unpickles_code(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"mean": WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="the pickle names posix.system.*refused on purpose"):
        edits.load_direction(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    (tmp_path / "big.pt").write_bytes(b"\0" * (edits.MAX_DIRECTION_BYTES + 1))
    with pytest.raises(ModelFileError, match="more than a direction file can be"):
        edits.load_direction(str(tmp_path / "big.pt"))
    with pytest.raises(ModelFileError, match=r"end in \.npy, \.pt or \.pth"):
        edits.load_direction(str(tmp_path / "d.csv"))


def test_the_official_named_ganspace_edits():
    table = edits.GANSPACE_EDITS
    assert len(table) == 42  # the rows of ganspace_configs.csv as released with the W+ adapter
    # rows of the released table, and the five e4e's editing examples apply
    assert table["big_smile"] == edits.GanSpaceEdit(19, 4, 5, 20.0)
    assert table["show_front_teeth"] == edits.GanSpaceEdit(59, 4, 5, 40.0)
    assert table["disgusted"] == edits.GanSpaceEdit(43, 6, 8, -30.0)
    assert table["overexposed"] == edits.GanSpaceEdit(27, 8, 18, 15.0)
    assert table["boyishness"] == edits.GanSpaceEdit(8, 2, 5, 20.0)
    for name, row in {"eye_openness": (54, 7, 8, 20.0), "smile": (46, 4, 5, -20.0), "trimmed_beard": (58, 7, 9, 20.0),
                      "white_hair": (57, 7, 10, -24.0), "lipstick": (34, 10, 11, 20.0)}.items():
        assert table[name] == edits.GanSpaceEdit(*row)
    assert all(0 <= e.index < 80 and 0 <= e.start < e.end <= 18 for e in table.values())  # ffhq_pca.pt: 80
    assert edits.CUSTOM_EDIT not in table


def ffhq_sized_pca(seed=3):
    """A PCA of ffhq_pca.pt's size (80 orthonormal components)."""
    return pca_of(hand_made_pca(count=80, seed=seed))


def test_big_smile_moves_only_its_official_row_by_the_official_strength_times_the_component():
    pca = ffhq_sized_pca()
    component, stdev = pca.components[19], pca.stdev[19]
    w = code(4).double()
    along = component / (component @ component)  # the components are unit vectors to float32 precision
    w[0, 0] -= ((w[0, 0] - pca.mean) @ component) * along  # row 0 at coordinate 0 along component 19
    assert abs(edits.ganspace_coordinate(w, pca, 19).item()) < 1e-12
    out = edits.apply_named_ganspace(w, pca, "big_smile")
    untouched = [r for r in range(18) if r != 4]
    assert torch.equal(out[:, untouched], w[:, untouched])
    torch.testing.assert_close(out[0, 4] - w[0, 4], 20.0 * stdev * component, rtol=0, atol=1e-12)
    # strength: a multiple of the official one; the official target is absolute (measured on row 0)
    torch.testing.assert_close(edits.apply_named_ganspace(w, pca, "big_smile", -0.5)[0, 4] - w[0, 4],
                               -10.0 * stdev * component, rtol=0, atol=1e-12)
    w[0, 0] += 3.0 * stdev * along  # now at coordinate 3
    torch.testing.assert_close(edits.apply_named_ganspace(w, pca, "big_smile")[0, 4] - w[0, 4],
                               (20.0 - 3.0) * stdev * component, rtol=0, atol=1e-12)
    torch.testing.assert_close(edits.apply_named_ganspace(w, pca, "big_smile", relative=True)[0, 4] - w[0, 4],
                               20.0 * stdev * component, rtol=0, atol=1e-12)
    # the rows can be overridden; another edit uses its own component, rows and strength
    assert torch.equal(edits.apply_named_ganspace(w, pca, "big_smile", start=2, end=8),
                       edits.apply_ganspace(w, pca, 19, 20.0, 2, 8))
    assert torch.equal(edits.apply_named_ganspace(w, pca, "white_hair", 0.5),
                       edits.apply_ganspace(w, pca, 57, -12.0, 7, 10))


def test_named_ganspace_edit_refusals():
    pca, w = ffhq_sized_pca(), code()
    with pytest.raises(ConfigError, match="unknown GANSpace edit 'biggest_smile'; the named edits are"):
        edits.apply_named_ganspace(w, pca, "biggest_smile")
    with pytest.raises(ConfigError, match="needs GANSpace's ffhq_pca.pt as the direction, got an InterFaceGAN"):
        edits.apply_named_ganspace(w, edits.Direction(unit(1).double()), "big_smile")
    with pytest.raises(ConfigError, match="uses principal component 19, but this PCA has 6 components"):
        edits.apply_named_ganspace(w, pca_of(hand_made_pca()), "big_smile")
    with pytest.raises(ConfigError, match="strength must be a finite number"):
        edits.apply_named_ganspace(w, pca, "big_smile", float("nan"))


# ---- W+ code files


def test_wplus_code_files_round_trip(tmp_path):
    w = code(0, batch=3)
    path = str(tmp_path / "face.safetensors")
    edits.save_wplus_code(w, path)
    assert torch.equal(edits.load_wplus_code(path), w)
    edits.save_wplus_code(w[0], path)  # [18, 512] is stored as one code
    assert edits.load_wplus_code(path).shape == (1, 18, 512)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "wplus-code/1"}
    # the official e4e outputs: torch.save of a [1, 18, 512] tensor that requires grad
    e4e = str(tmp_path / "1.pth")
    torch.save(w[:1].clone().requires_grad_(True), e4e)
    loaded = edits.load_wplus_code(e4e)
    assert torch.equal(loaded, w[:1]) and not loaded.requires_grad
    bad = w.clone()
    bad[1, 2, 3] = float("inf")
    save_file({"wplus": bad}, str(tmp_path / "inf.safetensors"), metadata={"format": "wplus-code/1"})
    with pytest.raises(ModelFileError, match="'wplus' holds NaN or infinite"):
        edits.load_wplus_code(str(tmp_path / "inf.safetensors"))
    save_file({"wplus": torch.zeros(1, 14, 512)}, str(tmp_path / "short.safetensors"),
              metadata={"format": "wplus-code/1"})
    with pytest.raises(ModelFileError, match=r"expected exactly 'wplus' \[batch <= 4096, 18, 512\]"):
        edits.load_wplus_code(str(tmp_path / "short.safetensors"))
    save_file({"wplus": w}, str(tmp_path / "other.safetensors"), metadata={"format": "wplus/1"})
    with pytest.raises(ModelFileError, match="format 'wplus/1', expected 'wplus-code/1'"):
        edits.load_wplus_code(str(tmp_path / "other.safetensors"))
    torch.save({"latent": w}, str(tmp_path / "dict.pth"))
    with pytest.raises(ModelFileError, match="holds a dict, expected a tensor"):
        edits.load_wplus_code(str(tmp_path / "dict.pth"))
    with pytest.raises(ConfigError, match="NaN"):
        edits.save_wplus_code(bad, str(tmp_path / "x.safetensors"))
