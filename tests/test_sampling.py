import numpy as np
import pytest

from faceaudit_jax import keys, regions
from faceaudit_jax.data import sampling


def random_table(n=40000, seed=0, unknown_rate=0.02):
    rng = np.random.default_rng(seed)
    table = (rng.random((n, regions.NUM_ATTRIBUTES)) < 0.4).astype(np.int8)
    table[rng.random(table.shape) < unknown_rate] = -1
    return table


def col(name):
    return regions.attribute_id(name)


def linked_table(n=40000, seed=0, p_with_men=0.05, p_with_women=0.7):
    """A CelebA-like Male x Wearing_Lipstick link: few men wear lipstick, most women do."""
    table = random_table(n, seed)
    rng = np.random.default_rng(seed + 100)
    male = table[:, col("Male")]
    rate = np.where(male == 1, p_with_men, p_with_women)
    table[:, col("Wearing_Lipstick")] = np.where(male >= 0, rng.random(n) < rate, -1)
    return table


def test_biased_subset_cooccurrence_within_sampling_error():
    table = random_table()
    idx = sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.9, 4000, seed=1,
                                 confounder_values=(1,))
    sub = table[idx]
    assert idx.size == 4000 and np.unique(idx).size == 4000
    y, a = sub[:, col("Male")], sub[:, col("Wearing_Lipstick")]
    assert np.all(y >= 0) and np.all(a >= 0)
    assert np.mean(y == 1) == pytest.approx(0.5, abs=1e-3)
    # Exact counts by construction: 90% of each class aligned.
    assert np.mean(a[y == 1] == 1) == pytest.approx(0.9, abs=1e-3)
    assert np.mean(a[y == 0] == 0) == pytest.approx(0.9, abs=1e-3)
    pos, neg = sampling.cooccurrence(sub, "Male", "Wearing_Lipstick")
    assert pos == pytest.approx(0.9, abs=1e-3) and neg == pytest.approx(0.9, abs=1e-3)


def test_biased_subset_two_confounders_spreads_conflicting_cells():
    table = random_table(80000)
    idx = sampling.biased_subset(table, "Male", ["Eyeglasses", "Wearing_Hat"], 0.97, 2000, seed=3,
                                 confounder_values=(1, 1))
    sub = table[idx]
    y, aligned = sampling.group_labels(sub, "Male", ["Eyeglasses", "Wearing_Hat"], (1, 1))
    assert np.mean(aligned) == pytest.approx(0.97, abs=2e-3)
    # The 3% conflicting images of each class cover all three other combinations.
    conflicting = sub[~aligned][:, regions.attribute_ids(["Male", "Eyeglasses", "Wearing_Hat"])]
    assert len({tuple(r) for r in conflicting}) == 6


def test_biased_subset_is_deterministic_and_seed_dependent():
    table = random_table()
    a = sampling.biased_subset(table, "Young", "Smiling", 0.99, 1000, seed=5, confounder_values=1)
    b = sampling.biased_subset(table, "Young", "Smiling", 0.99, 1000, seed=5, confounder_values=1)
    c = sampling.biased_subset(table, "Young", "Smiling", 0.99, 1000, seed=6, confounder_values=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_default_direction_follows_the_link_women_wear_lipstick():
    table = linked_table()
    assert sampling.linked_values(table, "Male", ["Wearing_Lipstick"]) == (0,)
    idx = sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.99, 2000, seed=0)
    sub = table[idx]
    y, a = sub[:, col("Male")], sub[:, col("Wearing_Lipstick")]
    # FaceX's setting, counted directly: 99% of women wear lipstick, 99% of men do not.
    assert np.mean(a[y == 0] == 1) == pytest.approx(0.99, abs=1e-3)
    assert np.mean(a[y == 1] == 0) == pytest.approx(0.99, abs=1e-3)
    _, aligned = sampling.group_labels(sub, "Male", ["Wearing_Lipstick"], (0,))
    np.testing.assert_array_equal(aligned, a != y)


def test_opposite_direction_is_drawable_only_when_the_pool_has_enough_conflicting_images():
    # 200 men of whom ~5% wear lipstick: 99% of 1000 men with lipstick cannot be drawn.
    table = linked_table(n=2000)
    with pytest.raises(ValueError, match=r"cell \(Male=1, Wearing_Lipstick=1\)"):
        sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.99, 2000, seed=0,
                               confounder_values=(1,))
    idx = sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.99, 200, seed=0)
    assert idx.size == 200


def test_no_link_means_no_default_direction():
    table = random_table()
    with pytest.raises(ValueError, match="Wearing_Lipstick.*no link.*confounder_values"):
        sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.99, 100, seed=0)
    for bad in ((2,), (1, 0), (True,), ("1",)):
        with pytest.raises(ValueError, match="confounder_values"):
            sampling.biased_subset(table, "Male", "Wearing_Lipstick", 0.99, 100, seed=0,
                                   confounder_values=bad)


def test_balanced_subset_has_equal_cells():
    table = random_table()
    idx = sampling.balanced_subset(table, "Male", "Blond_Hair", 1000, seed=0)
    sub = table[idx]
    cells = sub[:, col("Male")] * 2 + sub[:, col("Blond_Hair")]
    np.testing.assert_array_equal(np.bincount(cells, minlength=4), [250, 250, 250, 250])


def test_deconinck_subset_counts():
    table = random_table(60000)
    idx = sampling.deconinck_subset(table, "Eyeglasses", seed=0, n_target=300,
                                    n_other_with=200, n_other_without=100)
    sub = table[idx]
    men = sub[:, col("Male")] == 1
    glasses = sub[:, col("Eyeglasses")] == 1
    assert men.sum() == 300 and np.sum(men & glasses) == 0
    assert np.sum(~men & glasses) == 200 and np.sum(~men & ~glasses) == 100



def test_deconinck_study_sets_follow_the_paper_recipe():
    attrs, test_attrs = random_table(20000, seed=1), random_table(20000, seed=2)
    offset = 50_000_000
    sizes = dict(target="Male", n_target=16, n_other_with=12, n_other_without=4, test_size=16)
    sets = sampling.deconinck_study_sets(attrs, test_attrs, "Eyeglasses", 0, **sizes,
                                         test_rows=np.arange(20000) + offset)
    male, glasses = col("Male"), col("Eyeglasses")
    biased = attrs[sets["biased"]]
    men = biased[:, male] == 1
    assert men.sum() == 16 and np.all(biased[men, glasses] == 0)
    assert np.sum(biased[~men, glasses] == 1) == 12 and np.sum(biased[~men, glasses] == 0) == 4
    balanced = attrs[sets["balanced"]]
    assert balanced.shape[0] == biased.shape[0]
    assert np.all(np.bincount(2 * balanced[:, male] + balanced[:, glasses], minlength=4) == 8)
    test = sets["test"]
    assert test.min() >= offset and test.size == 16
    t = test_attrs[test - offset]
    assert np.all(np.bincount(2 * t[:, male] + t[:, glasses], minlength=4) == 4)
    # Each set draws with its own named seed: the same rows as the single draws.
    np.testing.assert_array_equal(sets["biased"], sampling.deconinck_subset(
        attrs, "Eyeglasses", keys.name_hash(0, "Eyeglasses", "biased"), n_target=16,
        n_other_with=12, n_other_without=4))
    np.testing.assert_array_equal(sets["test"] - offset, sampling.balanced_subset(
        test_attrs, "Male", ["Eyeglasses"], 16, keys.name_hash(0, "Eyeglasses", "test")))
    # Row ids map through train_rows; another seed draws other rows.
    shifted = sampling.deconinck_study_sets(attrs, test_attrs, "Eyeglasses", 0, **sizes,
                                            train_rows=np.arange(20000) * 3)
    np.testing.assert_array_equal(shifted["balanced"], sets["balanced"] * 3)
    other = sampling.deconinck_study_sets(attrs, test_attrs, "Eyeglasses", 1, **sizes)
    assert not np.array_equal(other["biased"], sets["biased"])


def test_attribute_column_is_one_only_where_present():
    table = random_table(50)
    expected = np.array([1 if v == 1 else 0 for v in table[:, col("Smiling")]], np.int32)
    got = sampling.attribute_column(table, "Smiling")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="Smilling"):
        sampling.attribute_column(table, "Smilling")

@pytest.mark.parametrize("corr", [0.5, 1.2, -0.1])
def test_corr_outside_range_is_rejected(corr):
    with pytest.raises(ValueError, match=r"corr=.*\(0.5, 1\]"):
        sampling.biased_subset(random_table(1000), "Male", "Smiling", corr, 100, seed=0)


def test_unknown_attribute_names_the_value():
    with pytest.raises(ValueError, match="unknown attribute 'Lipstick'"):
        sampling.biased_subset(random_table(1000), "Male", "Lipstick", 0.9, 100, seed=0)


def test_too_large_subset_names_the_cell():
    table = random_table(2000)
    with pytest.raises(ValueError, match=r"cell \(Male=1, Smiling=1\).*pool has only"):
        sampling.biased_subset(table, "Male", "Smiling", 0.99, 5000, seed=0, confounder_values=1)


def test_unknown_labels_are_never_drawn():
    table = random_table(20000, unknown_rate=0.3)
    idx = sampling.balanced_subset(table, "Male", "Smiling", 400, seed=0)
    assert np.all(table[idx][:, [col("Male"), col("Smiling")]] >= 0)


def test_verification_pairs_are_identity_disjoint_across_folds():
    identity = np.repeat(np.arange(200), 5)
    pairs = sampling.verification_pairs(identity, seed=0, num_folds=10, pairs_per_fold=30)
    assert pairs["a"].size == 600
    same = pairs["same"]
    np.testing.assert_array_equal(identity[pairs["a"]][same], identity[pairs["b"]][same])
    assert np.all(identity[pairs["a"]][~same] != identity[pairs["b"]][~same])
    assert np.all(pairs["a"][same] != pairs["b"][same])
    people_per_fold = [set(identity[pairs["a"][pairs["fold"] == f]]) |
                       set(identity[pairs["b"][pairs["fold"] == f]]) for f in range(10)]
    for f in range(10):
        for g in range(f + 1, 10):
            assert not people_per_fold[f] & people_per_fold[g]
    for f in range(10):
        assert np.sum(same[pairs["fold"] == f]) == 30


# attribute correlations (moved from experiments/facex_tables.py)

def test_attribute_correlations_match_corrcoef_and_exclusions():
    rng = np.random.default_rng(1)
    table = (rng.random((400, regions.NUM_ATTRIBUTES)) < 0.4).astype(np.int8)
    table[:, regions.attribute_id("Attractive")] = -1                 # undrawn
    table[:, regions.attribute_id("Bald")] = 0                        # constant
    r = sampling.attribute_correlations(table, "Male")
    y = table[:, regions.attribute_id("Male")].astype(float)
    for j, name in enumerate(regions.ATTRIBUTES):
        if name in ("Male", "Attractive", "Bald"):
            assert np.isnan(r[j]), name
        else:
            assert r[j] == pytest.approx(np.corrcoef(table[:, j].astype(float), y)[0, 1], abs=1e-12)


def _random_table_linked_to_male(seed: int, n: int = 2000):
    """A random 0/1 attribute table and ``noisy(flip)``: Male with a share ``flip`` of rows flipped."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int8)
    table = (rng.random((n, regions.NUM_ATTRIBUTES)) < 0.5).astype(np.int8)
    table[:, regions.attribute_id("Male")] = y

    def noisy(flip):
        return np.where(rng.random(n) < flip, 1 - y, y).astype(np.int8)

    return table, noisy


def test_top_correlated_attributes_order_and_region_filter():
    table, noisy = _random_table_linked_to_male(2)

    table[:, regions.attribute_id("Young")] = noisy(0.0)               # perfect, but tied to no region
    table[:, regions.attribute_id("Wearing_Lipstick")] = 1 - noisy(0.05)   # strong negative
    table[:, regions.attribute_id("Goatee")] = noisy(0.15)
    table[:, regions.attribute_id("Eyeglasses")] = noisy(0.3)
    top = sampling.top_correlated_attributes(table, "Male", 3)
    assert [name for name, _ in top] == ["Wearing_Lipstick", "Goatee", "Eyeglasses"]
    assert top[0][1] < -0.8 and 0.6 < top[1][1] < 0.8
    with_young = sampling.top_correlated_attributes(table, "Male", 1, require_regions=False)
    assert with_young[0][0] == "Young" and with_young[0][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=0"):
        sampling.top_correlated_attributes(table, "Male", 0)


def test_top_correlated_attributes_with_distinct_regions_skips_shared_regions():
    table, noisy = _random_table_linked_to_male(3)

    table[:, regions.attribute_id("Wearing_Lipstick")] = 1 - noisy(0.05)   # lips
    table[:, regions.attribute_id("Heavy_Makeup")] = 1 - noisy(0.10)       # skin, eyes, lips: shares lips
    table[:, regions.attribute_id("No_Beard")] = 1 - noisy(0.15)           # skin
    table[:, regions.attribute_id("5_o_Clock_Shadow")] = noisy(0.20)       # skin again
    table[:, regions.attribute_id("Wearing_Earrings")] = 1 - noisy(0.25)   # earrings
    plain = [a for a, _ in sampling.top_correlated_attributes(table, "Male", 4)]
    assert plain == ["Wearing_Lipstick", "Heavy_Makeup", "No_Beard", "5_o_Clock_Shadow"]
    distinct = [a for a, _ in sampling.top_correlated_attributes(table, "Male", 3,
                                                             distinct_regions=True)]
    assert distinct == ["Wearing_Lipstick", "No_Beard", "Wearing_Earrings"]
    used = [set(regions.regions_of(a)) for a in distinct]
    assert all(not (used[i] & used[j]) for i in range(3) for j in range(i + 1, 3))


def _biased_fits(table, size, corr, value):
    """Reference for one confounder: per class y, round(corr * n_y) aligned and the rest
    conflicting images must exist (rows with the two attributes known)."""
    male, lip = table[:, col("Male")], table[:, col("Wearing_Lipstick")]
    known = (male >= 0) & (lip >= 0)
    n_pos = int(round(size * 0.5))
    for y, n_y in ((1, n_pos), (0, size - n_pos)):
        aligned = value if y == 1 else 1 - value
        n_aligned = int(round(corr * n_y))
        rows = known & (male == y)
        if n_aligned > np.sum(rows & (lip == aligned)) or n_y - n_aligned > np.sum(rows & (lip != aligned)):
            return False
    return True


@pytest.mark.parametrize("corr, value", [(0.9, 0), (0.99, 0), (0.75, 1)])
def test_largest_biased_size_is_the_largest_drawable(corr, value):
    table = linked_table(n=600, seed=3)
    largest = sampling.largest_biased_size(table, "Male", ["Wearing_Lipstick"], corr,
                                           confounder_values=(value,))
    expected = max([s for s in range(2, 601) if _biased_fits(table, s, corr, value)], default=0)
    assert largest == expected > 0
    sampling.biased_subset(table, "Male", ["Wearing_Lipstick"], corr, largest, 0,
                           confounder_values=(value,))
    with pytest.raises(ValueError, match="pool has only"):
        sampling.biased_subset(table, "Male", ["Wearing_Lipstick"], corr, largest + 1, 0,
                               confounder_values=(value,))


def test_largest_balanced_size_is_cells_times_the_smallest_cell():
    table = linked_table(n=600, seed=3)
    male, lip = table[:, col("Male")], table[:, col("Wearing_Lipstick")]
    smallest = min(np.sum((male == a) & (lip == b)) for a in (0, 1) for b in (0, 1))
    assert sampling.largest_balanced_size(table, "Male", ["Wearing_Lipstick"]) == 4 * smallest
    assert sampling.largest_balanced_size(table, "Male", []) == 2 * min(np.sum(male == 0),
                                                                        np.sum(male == 1))
    empty = table.copy()
    empty[(male == 1) & (lip == 1), col("Wearing_Lipstick")] = 0
    assert sampling.largest_balanced_size(empty, "Male", ["Wearing_Lipstick"]) == 0
