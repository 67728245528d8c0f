"""Tests of the embedded synthetic faces (faceaudit_jax.data.synthetic).

Pixel tests share a few batches (one compile per batch shape) so the file
stays fast on a small CPU; statistics use sample_attributes, which renders
nothing.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from faceaudit_jax import regions
from faceaudit_jax.data import synthetic as S

SEED = 7
A = regions.ATTRIBUTE_ID
G = regions.REGION_ID
B = 12

# Accessory attribute -> the parse region it owns (present iff attribute is 1).
ACCESSORY_REGIONS = {
    "Wearing_Earrings": "ear_r",
    "Eyeglasses": "eye_g",
    "Wearing_Hat": "hat",
    "Wearing_Necklace": "neck_l",
}


def _pick_indices():
    """12 images: two with each accessory, two bald, two with lipstick, from
    an independent-attribute pool (the other images supply the negatives)."""
    attrs = S.sample_attributes(SEED, np.arange(4000), independent=True)["attrs"]
    chosen = []
    for name in [*ACCESSORY_REGIONS, "Bald", "Wearing_Lipstick"]:
        hits = [i for i in np.flatnonzero(attrs[:, A[name]] == 1) if i not in chosen]
        chosen += hits[:2]
    assert len(chosen) == B
    return np.array(chosen)


@pytest.fixture(scope="module")
def picked():
    return _pick_indices()


@pytest.fixture(scope="module")
def batch64(picked):
    return jax.device_get(S.render(SEED, picked, 64, independent=True))


@pytest.fixture(scope="module")
def batch128(picked):
    return jax.device_get(S.render(SEED, picked, 128, independent=True))


def _region_counts(parse):
    return np.stack([(parse == r).sum(axis=(1, 2)) for r in range(regions.NUM_REGIONS)], axis=1)


def test_batch_format_shapes_dtypes_ranges(batch64):
    b = batch64
    assert set(b) == {"image", "parse", "attrs", "identity", "landmarks", "group", "yaw"}
    assert b["image"].shape == (B, 64, 64, 3) and b["image"].dtype == np.float32
    assert b["parse"].shape == (B, 64, 64) and b["parse"].dtype == np.int32
    assert b["attrs"].shape == (B, 40) and b["attrs"].dtype == np.int8
    assert b["identity"].shape == (B,) and b["identity"].dtype == np.int32
    assert b["landmarks"].shape == (B, 5, 2) and b["landmarks"].dtype == np.float32
    assert b["group"].shape == (B,) and b["group"].dtype == np.int32
    assert b["yaw"].shape == (B,) and b["yaw"].dtype == np.float32
    assert np.isfinite(b["image"]).all()
    assert b["image"].min() >= 0.0 and b["image"].max() <= 1.0
    assert b["parse"].min() >= 0 and b["parse"].max() < regions.NUM_REGIONS
    regions.validate_parse_ids(b["parse"])
    assert set(np.unique(b["group"])) <= set(range(S.NUM_GROUPS))
    assert np.abs(b["yaw"]).max() <= S.MAX_YAW + 1e-6


def test_every_face_has_its_basic_regions(batch128):
    counts = _region_counts(batch128["parse"])
    for name in ("background", "skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow",
                 "u_lip", "l_lip", "neck", "cloth"):
        assert (counts[:, G[name]] > 0).all(), name
    # At least one ear shows (the far one may slide behind the cheek).
    assert ((counts[:, G["l_ear"]] + counts[:, G["r_ear"]]) > 0).all()


def test_determinism_by_index(picked, batch64):
    # The same indices in another order, with other neighbours in the batch
    # (same batch size, so no recompile), give the same rows.
    order = np.roll(np.arange(B), 5)
    again = jax.device_get(S.render(SEED, picked[order], 64, independent=True))
    for key in batch64:
        np.testing.assert_array_equal(again[key], batch64[key][order], err_msg=key)
    # A different seed gives different faces.
    other = jax.device_get(S.render(SEED + 1, picked, 64, independent=True))
    assert not np.array_equal(other["image"], batch64["image"])


def test_sample_attributes_matches_render(picked, batch64):
    ref = S.sample_attributes(SEED, picked, independent=True)
    np.testing.assert_array_equal(ref["attrs"], batch64["attrs"])
    np.testing.assert_array_equal(ref["identity"], batch64["identity"])
    np.testing.assert_array_equal(ref["group"], batch64["group"])
    # Chunked pools give the same rows as small calls.
    big = S.sample_attributes(SEED, np.arange(4000), independent=True)
    np.testing.assert_array_equal(big["attrs"][picked], ref["attrs"])


@pytest.mark.parametrize("res", [64, 128])
def test_accessory_regions_present_iff_attribute(res, batch64, batch128):
    b = batch64 if res == 64 else batch128
    counts = _region_counts(b["parse"])
    attrs = b["attrs"]
    for attr, region in ACCESSORY_REGIONS.items():
        present = attrs[:, A[attr]] == 1
        assert present.any() and (~present).any(), attr   # both cases tested
        np.testing.assert_array_equal(counts[:, G[region]] > 0, present, err_msg=attr)
    # Hair: none at all when bald, some otherwise.
    np.testing.assert_array_equal(counts[:, G["hair"]] == 0, attrs[:, A["Bald"]] == 1)
    # Mouth opening: drawn iff smiling or mouth open.
    opening = (attrs[:, A["Smiling"]] == 1) | (attrs[:, A["Mouth_Slightly_Open"]] == 1)
    np.testing.assert_array_equal(counts[:, G["mouth"]] > 0, opening)


def test_lipstick_colours_the_lips(batch128):
    b = batch128
    lips = (b["parse"] == G["u_lip"]) | (b["parse"] == G["l_lip"])
    lipstick = b["attrs"][:, A["Wearing_Lipstick"]] == 1
    assert lipstick.any() and (~lipstick).any()
    for i in range(B):
        rgb = b["image"][i][lips[i]]
        green_over_red = np.median(rgb[:, 1] / np.maximum(rgb[:, 0], 1e-6))
        # Lipstick is saturated red (G/R ~ 0.1); natural lips follow the skin (G/R > 0.35).
        assert (green_over_red < 0.3) == lipstick[i], (i, green_over_red)


def test_undrawn_attributes_are_unknown_and_drawn_are_binary():
    attrs = S.sample_attributes(SEED, np.arange(3000))["attrs"]
    for name in regions.ATTRIBUTES:
        col = attrs[:, A[name]]
        if name in S.UNDRAWN_ATTRIBUTES:
            assert (col == -1).all(), name
        else:
            assert set(np.unique(col)) <= {0, 1}, name
    assert len(S.DRAWN_ATTRIBUTES) >= 20
    for name in ("Male", "Young", "Blond_Hair", "Black_Hair", "Brown_Hair", "Gray_Hair",
                 "Bald", "Bangs", "Eyeglasses", "Smiling", "Mouth_Slightly_Open",
                 "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
                 "Wearing_Necktie", "Mustache", "No_Beard", "Pale_Skin", "Heavy_Makeup"):
        assert name in S.DRAWN_ATTRIBUTES, name


def test_identity_shares_geometry_and_identity_attributes():
    idx = np.arange(600)
    out = S.sample_attributes(SEED, idx, images_per_identity=6)
    np.testing.assert_array_equal(out["identity"], idx // 6)
    params = S.sample_parameters(SEED, idx, images_per_identity=6)
    by_id = lambda v: v.reshape(100, 6, *v.shape[1:])  # noqa: E731
    identity_level = ["Male", "Young", "Pale_Skin", "Big_Nose", "Big_Lips", "Chubby",
                      "Arched_Eyebrows", "Bushy_Eyebrows", "Bald"]
    for name in identity_level:
        col = by_id(out["attrs"][:, A[name]])
        assert (col == col[:, :1]).all(), name
    group = by_id(out["group"])
    assert (group == group[:, :1]).all()
    for key in ("face_r", "jaw_sq", "chin", "eye_dx", "eye_w", "nose_len", "nose_w",
                "lip_u", "lip_l", "tone"):
        v = by_id(params[key])
        np.testing.assert_array_equal(v, np.broadcast_to(v[:, :1], v.shape), err_msg=key)
    # ...while pose, lighting and accessories vary between images of one identity.
    for key in ("yaw", "scale", "brightness", "bg"):
        v = by_id(params[key])
        assert (v != v[:, :1]).any(axis=tuple(range(1, v.ndim))).all(), key
    assert len(np.unique(out["identity"][:: 6])) == 100


def test_default_rates_resemble_celeba():
    attrs = S.sample_attributes(SEED, np.arange(20000))["attrs"]
    col = lambda n: attrs[:, A[n]]  # noqa: E731
    male = col("Male") == 1
    # 2000 identities: the standard error of identity-level rates is ~0.011.
    assert abs(male.mean() - 0.42) < 0.04
    assert abs((col("Young") == 1).mean() - 0.77) < 0.04
    assert abs((col("Wearing_Lipstick") == 1).mean() - 0.47) < 0.03
    assert (col("Wearing_Lipstick")[male] == 1).mean() < 0.03
    assert abs((col("Wearing_Lipstick")[~male] == 1).mean() - 0.80) < 0.04
    assert (col("Wearing_Earrings")[~male] == 1).mean() > 5 * (col("Wearing_Earrings")[male] == 1).mean()
    assert (col("No_Beard")[~male] == 1).all()
    assert abs((col("Smiling") == 1).mean() - 0.48) < 0.02
    assert abs((col("Eyeglasses") == 1).mean() - 0.065) < 0.015
    assert abs((col("Blond_Hair") == 1).mean() - 0.15) < 0.03


def test_independent_sampling_decorrelates_male_and_lipstick():
    attrs = S.sample_attributes(SEED, np.arange(20000), independent=True)["attrs"]
    male = attrs[:, A["Male"]].astype(float)
    lipstick = attrs[:, A["Wearing_Lipstick"]].astype(float)
    assert abs(np.corrcoef(male, lipstick)[0, 1]) < 0.03
    assert abs(lipstick.mean() - S.MARGINAL_RATES["Wearing_Lipstick"]) < 0.02
    assert abs(male.mean() - 0.42) < 0.04
    default = S.sample_attributes(SEED, np.arange(20000))["attrs"]
    assert np.corrcoef(default[:, A["Male"]], default[:, A["Wearing_Lipstick"]])[0, 1] < -0.7


@pytest.mark.parametrize("independent", [False, True])
def test_hair_colour_attributes_exclusive(independent):
    attrs = S.sample_attributes(SEED, np.arange(5000), independent=independent)["attrs"]
    colours = attrs[:, [A[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald")]]
    assert colours.sum(axis=1).max() == 1
    bald = attrs[:, A["Bald"]] == 1
    for name in ("Bangs", "Wavy_Hair", "Straight_Hair", "Sideburns", "Receding_Hairline"):
        assert (attrs[bald, A[name]] == 0).all(), name
    assert ((attrs[:, A["Wavy_Hair"]] + attrs[:, A["Straight_Hair"]]) <= 1).all()


@pytest.mark.parametrize("bad", [63, 513, 0, 128.0, "128", True])
def test_resolution_outside_range_raises(bad):
    with pytest.raises(ValueError, match="resolution"):
        S.render(0, [0], bad)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="seed"):
        S.render(-1, [0], 64)
    with pytest.raises(ValueError, match="seed"):
        S.sample_attributes(1.5, [0])
    with pytest.raises(ValueError, match="index"):
        S.sample_attributes(0, [0, -3])
    with pytest.raises(ValueError, match="integers"):
        S.sample_attributes(0, [0.5, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        S.sample_attributes(0, np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="empty"):
        S.render(0, [], 64)
    with pytest.raises(ValueError, match="images_per_identity"):
        S.sample_attributes(0, [0], images_per_identity=0)
    with pytest.raises(ValueError, match="params lacks"):
        S.render_parameters({"yaw": np.zeros(1)}, 64)


def test_landmarks_inside_image_and_eyes_ordered(batch64, batch128):
    for b, res in ((batch64, 64), (batch128, 128)):
        lm = b["landmarks"]
        assert (lm >= 0).all() and (lm <= res - 1).all()
        assert (lm[:, 0, 0] < lm[:, 1, 0]).all()          # image-left eye first
        assert (lm[:, 3, 0] < lm[:, 4, 0]).all()          # image-left mouth corner first
        assert (lm[:, :2, 1].max(axis=1) < lm[:, 2, 1]).all()   # eyes above the nose tip
        assert (lm[:, 2, 1] < lm[:, 3:, 1].min(axis=1)).all()   # nose tip above the mouth
        # Each eye landmark lies on its drawn eye region.
        for i in range(B):
            for k, region in ((0, "l_eye"), (1, "r_eye")):
                x, y = np.round(lm[i, k]).astype(int)
                window = b["parse"][i, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
                assert (window == G[region]).any() or (window == G["eye_g"]).any(), (res, i, k)


def test_same_face_at_two_resolutions(batch64, batch128):
    # Landmarks scale with the resolution (pixel centres at integers).
    np.testing.assert_allclose((batch64["landmarks"] + 0.5) * 2.0 - 0.5, batch128["landmarks"],
                               atol=0.05)
    # The 128 px image averaged down to 64 px is close to the 64 px render.
    down = batch128["image"].reshape(B, 64, 2, 64, 2, 3).mean(axis=(2, 4))
    assert np.abs(down - batch64["image"]).mean() < 0.03


def test_frontal_filter_separates_frontal_from_yawed():
    idx = np.arange(3000)
    params = S.sample_parameters(SEED, idx)
    landmarks = jax.jit(jax.vmap(lambda p: S._landmarks(p, 128)))
    lm = np.asarray(landmarks({k: jnp.asarray(v) for k, v in params.items()}))
    eye_centre = lm[:, :2].mean(axis=1)
    mouth_centre = lm[:, 3:].mean(axis=1)
    axis = mouth_centre - eye_centre
    length = np.linalg.norm(axis, axis=1)
    offset = lm[:, 2] - eye_centre
    ratio = np.abs(axis[:, 0] * offset[:, 1] - axis[:, 1] * offset[:, 0]) / length ** 2
    yaw = np.degrees(params["yaw"])
    assert (ratio[np.abs(yaw) < 10] < 0.1).all()
    assert (ratio[np.abs(yaw) > 27] > 0.1).all()
    assert (np.abs(yaw) > 27).sum() > 10
    assert (ratio < 0.1).mean() > 0.75
    # The nose moves towards the side the face turns to.
    turned = np.abs(yaw) > 10
    assert (np.sign(offset[turned, 0]) == np.sign(yaw[turned])).all()


def _worst_case_params():
    """12 parameter sets pushing the inner features to the edges of their
    windows: largest scale, extreme translation, roll and yaw, largest eyes,
    brows, glasses, mouth and beard."""
    params = S.sample_parameters(SEED, np.arange(B), independent=True)
    n = np.arange(B)
    sx = np.where(n % 2 == 0, 1.0, -1.0)
    sy = np.where((n // 2) % 2 == 0, 1.0, -1.0)
    sr = np.where((n // 4) % 2 == 0, 1.0, -1.0)
    over = dict(
        scale=np.full(B, S._SCALE_RANGE[1]), tx=sx * S._TX_RANGE[1],
        ty=np.where(sy > 0, S._TY_RANGE[1], S._TY_RANGE[0]),
        yaw=np.where(n < 8, 0.0, sx * S.MAX_YAW),   # frontal faces are the widest
        roll=sr * S._ROLL_RANGE[1], face_r=np.where(n % 3 == 0, S._FACE_R_RANGE[0], S._FACE_R_RANGE[1]),
        eye_dx=np.full(B, 0.195), eye_w=np.full(B, 0.084), eye_h=np.full(B, 0.039),
        eye_y=np.where(sy > 0, -0.005, -0.065), brow_gap=np.full(B, 0.107),
        brow_thick=np.full(B, 0.042), brow_arch=np.full(B, 0.024), nose_len=np.full(B, 0.162),
        nose_w=np.full(B, 0.058), mouth_y=np.full(B, 0.30), mouth_w=np.full(B, 0.167),
        lip_u=np.full(B, 0.048), lip_l=np.full(B, 0.058), smiling=np.ones(B),
        mouth_open=np.ones(B), open_amount=np.full(B, 1.4), glasses=np.ones(B),
        makeup=np.ones(B), bags=np.ones(B), goatee=np.ones(B), mustache=np.ones(B),
        age=np.full(B, 75.0))
    for k, v in over.items():
        params[k] = v.astype(params[k].dtype)
    return params


def test_windowed_rendering_equals_full_frame():
    params = _worst_case_params()
    windowed = jax.device_get(S.render_parameters(params, 64))
    full_frame = jax.jit(jax.vmap(lambda p: S._render_one(p, 64, windows=False)))
    image, parse = jax.device_get(full_frame({k: jnp.asarray(v) for k, v in params.items()}))
    np.testing.assert_array_equal(windowed["parse"], parse)
    np.testing.assert_allclose(windowed["image"], image, atol=1e-4)


def test_render_compiles_once_per_shape(picked, batch64):
    before = S._render_jit._cache_size()
    S.render(SEED, picked[::-1], 64, independent=True)   # same (B, resolution)
    S.render(SEED + 3, picked, 64)                        # other seed and mode
    assert S._render_jit._cache_size() == before


def test_counterfactual_parameters_change_only_their_region():
    params = S.sample_parameters(SEED, np.arange(B))
    params["lipstick"] = np.zeros(B, np.float32)
    without = jax.device_get(S.render_parameters(params, 64))
    params["lipstick"] = np.ones(B, np.float32)
    with_ = jax.device_get(S.render_parameters(params, 64))
    np.testing.assert_array_equal(without["parse"], with_["parse"])
    changed = np.abs(with_["image"] - without["image"]).sum(-1) > 1e-6
    lips = np.isin(with_["parse"], [G["u_lip"], G["l_lip"]])
    assert changed[lips].all()
    # Outside the lips only their anti-aliased edges change: pixels within
    # two pixels of a lip pixel (the edge distance is approximate at the corners).
    near_lips = lips
    for _ in range(2):
        padded = np.pad(near_lips, ((0, 0), (1, 1), (1, 1)))
        near_lips = np.zeros_like(lips)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                near_lips = near_lips | padded[:, dy:dy + 64, dx:dx + 64]
    assert not (changed & ~near_lips).any()


def test_counter_hash_draws_are_uniform_normal_and_uncorrelated():
    idx = np.arange(200_000)
    stream = S._Stream(SEED, S.IMAGE_STREAM, idx, ("a", "b"), ("z",))
    a, b, z = stream.u("a"), stream.u("b"), stream.z("z")
    assert 0.0 <= a.min() and a.max() < 1.0
    counts = np.histogram(a, bins=20, range=(0, 1))[0]
    expected = len(idx) / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60      # chi2(19): p ~ 1e-6
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.005
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01                   # slots
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01          # neighbouring indices
    other_seed = S._Stream(SEED + 1, S.IMAGE_STREAM, idx, ("a",), ()).u("a")
    identity = S._Stream(SEED, S.IDENTITY_STREAM, idx, ("a",), ()).u("a")
    assert abs(np.corrcoef(a, other_seed)[0, 1]) < 0.01
    assert abs(np.corrcoef(a, identity)[0, 1]) < 0.01
