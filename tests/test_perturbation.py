"""Deletion / Insertion curves: a hand-computed 2 x 2 case, generic curves, plots."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.metrics import perturbation as P

# Two matching pairs of the same 2 x 2 one-channel image; the probe's saliency
# ranks the pixels in opposite orders.
IMAGE = np.array([[0.9, 0.1], [0.5, 0.3]], np.float32)[:, :, None]
IMAGES = np.stack([IMAGE, IMAGE])
SALIENCY = np.stack([np.array([[4.0, 1.0], [3.0, 2.0]]), np.array([[1.0, 4.0], [2.0, 3.0]])])


def flat_embed(x):
    """The embedding is the image itself, so cos(A', A) = |A'| / |A| when A'
    is A with some pixels set to 0."""
    return x.reshape(x.shape[0], -1)


def test_ranks_and_counts():
    ranks = np.asarray(P.saliency_ranks(SALIENCY))
    np.testing.assert_array_equal(ranks[0], [[0, 3], [1, 2]])
    np.testing.assert_array_equal(ranks[1], [[3, 0], [2, 1]])
    ties = np.asarray(P.saliency_ranks(np.zeros((1, 2, 3))))
    np.testing.assert_array_equal(ties[0], [[0, 1, 2], [3, 4, 5]])  # index order
    np.testing.assert_array_equal(P.step_counts(10, 4), [0, 2, 5, 7, 10])


def test_deletion_and_insertion_hand_computed():
    # Deletion, pair 0 removes 0.9, 0.5, 0.3, 0.1: cos = sqrt(remaining / 1.16)
    # = 1, .549, .294, .093, 0 -> accepted at 0.25: 1 1 1 0 0.
    # Pair 1 removes 0.1, 0.3, 0.5, 0.9: cos = 1, .996, .956, .836, 0 -> 1 1 1 1 0.
    # Insertion into black: pair 0 cos = 0, .836, .956, .996, 1 -> 0 1 1 1 1;
    # pair 1: 0, .093, .294, .549, 1 -> 0 0 1 1 1.
    result = P.deletion_insertion(flat_embed, IMAGES, IMAGES, SALIENCY, threshold=0.25,
                                  num_steps=4, chunk_size=3)
    p, acc = result["deletion"]
    np.testing.assert_allclose(p, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1, 1, 1, 0.5, 0])
    assert result["deletion_auc"] == pytest.approx(0.75)
    np.testing.assert_allclose(result["insertion"][1], [0, 0.5, 1, 1, 1])
    assert result["insertion_auc"] == pytest.approx(0.75)
    # Non-matching pair 1: correct when rejected.
    _, acc = P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.25, num_steps=4,
                                  is_same=[True, False])
    np.testing.assert_allclose(acc, [0.5, 0.5, 0.5, 0.0, 0.5])


def test_chunking_and_compile_reuse():
    a = P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.25, num_steps=4,
                             chunk_size=64)
    size = P._curve_impl._cache_size()
    b = P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.5, num_steps=4,
                             chunk_size=64)
    assert P._curve_impl._cache_size() == size  # the threshold is data
    c = P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.25, num_steps=4,
                             chunk_size=1)
    np.testing.assert_allclose(a[1], c[1])
    assert not np.allclose(a[1], b[1])


def test_baselines():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 4, 5, 3)).astype(np.float32)
    saliency = rng.uniform(size=(3, 4, 5))

    def identity_score(x, context):  # records the first pixel of channel 0
        return x[:, 0, 0, 0]

    top = saliency.reshape(3, -1).argmax(axis=1)
    # With one step of 1/20 the single most salient pixel is replaced.
    _, mean_del = P.perturbation_curve(identity_score, images, saliency, num_steps=20,
                                       baseline="mean")
    means = images.mean(axis=(1, 2))
    for b in range(3):
        expected = means[b, 0] if top[b] == 0 else images[b, 0, 0, 0]
        assert float(mean_del[1, b]) == pytest.approx(expected)
    base = np.full_like(images, 0.25)
    _, arr_ins = P.perturbation_curve(identity_score, images, saliency, num_steps=20,
                                      mode="insertion", baseline=base)
    np.testing.assert_allclose(arr_ins[0], 0.25)
    np.testing.assert_allclose(arr_ins[-1], images[:, 0, 0, 0])
    blurred = np.asarray(P.blur_images(np.ones((1, 6, 6, 3)), sigma=1.0))
    np.testing.assert_allclose(blurred, 1.0, atol=1e-6)


def test_both_images_perturbed_generic_curve():
    """The ViT paper's protocol: both images masked with their own maps."""
    rng = np.random.default_rng(1)
    images_a = rng.uniform(size=(4, 3, 3, 2)).astype(np.float32)
    images_b = rng.uniform(size=(4, 3, 3, 2)).astype(np.float32)
    sal_a, sal_b = rng.uniform(size=(4, 3, 3)), rng.uniform(size=(4, 3, 3))
    labels = np.array([1, 1, 0, 0], bool)

    def decision(pair, context):
        xa, xb = pair
        cos = P.cosine_similarity(flat_embed(xa), flat_embed(xb))
        return ((cos >= 0.8) == context).astype(jnp.float32)

    p, values = P.perturbation_curve(decision, (images_a, images_b), (sal_a, sal_b),
                                     num_steps=3, context=jnp.asarray(labels), chunk_size=5)
    assert values.shape == (4, 4)
    for step, k in enumerate(P.step_counts(9, 3)):
        for i in range(4):
            xa, xb = images_a[i].copy(), images_b[i].copy()
            for x, s in ((xa, sal_a[i]), (xb, sal_b[i])):
                order = np.argsort(-s.ravel(), kind="stable")[:k]
                x.reshape(9, 2)[order] = 0.0
            cos = xa.ravel() @ xb.ravel() / max(np.linalg.norm(xa) * np.linalg.norm(xb), 1e-16)
            assert float(values[step, i]) == float((cos >= 0.8) == labels[i])
    recall = np.asarray(values)[:, labels].mean(axis=1)  # recall on matching pairs
    assert recall.shape == (4,)


def test_auc_and_plot(tmp_path):
    assert P.curve_auc([0, 0.5, 1], [1, 0, 1]) == pytest.approx(0.5)
    assert P.curve_auc([0, 1], np.array([[1, 0], [0, 0]])) == pytest.approx(0.25)
    path = P.plot_curves({"a": ([0, 1], [1, 0]), "b": ([0, 0.5, 1], [0, 1, 1])},
                         str(tmp_path / "sub" / "curves.png"), title="t")
    assert os.path.getsize(path) > 1000


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode="):
        P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.2, mode="erase")
    with pytest.raises(ValueError, match="saliency"):
        P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY[:, :1], 0.2)
    with pytest.raises(ValueError, match="num_steps=0"):
        P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.2, num_steps=0)
    with pytest.raises(ValueError, match="same shape"):
        P.verification_curve(flat_embed, IMAGES, IMAGES[:1], SALIENCY, 0.2)
    with pytest.raises(ValueError, match="baseline="):
        P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.2, baseline="grey")
    with pytest.raises(ValueError, match="is_same"):
        P.verification_curve(flat_embed, IMAGES, IMAGES, SALIENCY, 0.2, is_same=[True])
    with pytest.raises(ValueError, match="curves is empty"):
        P.plot_curves({}, "/tmp/x.png")


def test_curve_auc_algorithm2_sum_is_the_right_riemann_sum():
    from faceaudit_jax.metrics import perturbation as pert
    fractions = np.linspace(0.0, 1.0, 11)
    values = np.array([1.0, 0.9, 0.7, 0.6, 0.4, 0.3, 0.3, 0.2, 0.1, 0.0, 0.0])
    # CorrRISE Algorithm 2: (1 / n) sum_{i=1..n} acc_i
    assert pert.curve_auc(fractions, values, rule="sum") == pytest.approx(values[1:].sum() / 10)
    trapezoid = pert.curve_auc(fractions, values)
    assert trapezoid - pert.curve_auc(fractions, values, rule="sum") == pytest.approx(
        (values[0] - values[-1]) / 20)
    with pytest.raises(ValueError, match="rule="):
        pert.curve_auc(fractions, values, rule="simpson")


def test_decision_curves_recall_and_tnr_hand_computed():
    # Positive side = deletion_insertion's hand case (probe masked, gallery untouched):
    # recall 1 1 1 0 0 and 1 1 1 1 0 -> mean 1 1 1 .5 0.
    sal = {"m": (SALIENCY, SALIENCY)}
    pos = P.decision_curves(flat_embed, IMAGES, IMAGES, sal, True, 0.25, 4, 0.0, 3)
    np.testing.assert_allclose(pos["m"]["values"], [1, 1, 1, 0.5, 0])
    assert pos["m"]["auc"] == pytest.approx(P.curve_auc(pos["fractions"], pos["m"]["values"]))
    # Negative side, both images masked: P = IMAGE, G = its negative twin (cos = -1 < 0.5:
    # rejected). Masking both by the same ranks keeps cos = -1 until all pixels are 0
    # (cos 0 with the zero-norm rule: still rejected at 0.5).
    gallery = -IMAGES
    neg = P.decision_curves(flat_embed, IMAGES, gallery, sal, False, 0.5, 4, 0.0, 3)
    np.testing.assert_allclose(neg["m"]["values"], [1, 1, 1, 1, 1])
    # With threshold -2 everything is accepted: TNR 0 everywhere.
    neg = P.decision_curves(flat_embed, IMAGES, gallery, sal, False, -2.0, 4, 0.0, 3)
    np.testing.assert_allclose(neg["m"]["values"], [0, 0, 0, 0, 0])
