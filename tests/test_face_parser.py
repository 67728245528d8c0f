"""The face-parser experiment (train, evaluate, reload) and parsers inside FaceX's audit."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from faceaudit_jax import cli, parsing, regions
from faceaudit_jax import classifiers
from faceaudit_jax.data import fixtures, folders, pipeline
from faceaudit_jax.experiments import face_parser, registry
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.models import build_model, init_variables
from faceaudit_jax.models import parser_net

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def load_config(name, variant=""):
    return cli.load_config(f"{ROOT / 'configs' / name}.py:{variant}")


TRAIN_HQ, TEST_HQ = 16, 8


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The ``:celebamask_hq,smoke`` run on a CelebAMask-HQ-layout folder of rendered faces
    (HQ images 0..15 have CelebA train originals, 16..23 test ones: the published split)."""
    data_root = tmp_path_factory.mktemp("celebamask_hq")
    faces = fixtures.render_faces(TRAIN_HQ + TEST_HQ, 64, seed=0)
    orig = np.r_[np.arange(TRAIN_HQ), folders.PUBLISHED_TEST_START + np.arange(TEST_HQ)]
    fixtures.write_layout("celebamask_hq", data_root, faces, orig_index=orig)
    workdir = tmp_path_factory.mktemp("face_parser")
    config = load_config("face_parser", "celebamask_hq,smoke")
    config.data.root = str(data_root)
    result = registry.run_experiment(config, str(workdir))
    return config, workdir, result


@pytest.mark.slow
def test_smoke_writes_results_and_figures(smoke_run):
    config, workdir, result = smoke_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["source"] == "celebamask_hq" and saved["resolution"] == 64
    assert list(saved["per_region_iou"]) == list(regions.REGIONS)
    assert 0.0 <= saved["mean_iou"] <= 1.0 and 0.0 <= saved["pixel_accuracy"] <= 1.0
    # train.size = 32 and test.size = 16 cap the published split's 16 / 8 images
    assert saved["num_train"] == TRAIN_HQ and saved["num_test"] == TEST_HQ
    assert abs(sum(saved["pixel_share"]) - 1.0) < 1e-6
    for name in ("figure_examples.png", "figure_iou.png", "table.md", "summary.md"):
        assert (workdir / name).stat().st_size > 0
    assert (workdir / "summary.md").read_text() == face_parser.report(saved, "")["summary.md"]
    assert (workdir / "models" / ".gitignore").exists()


@pytest.mark.slow
def test_loaded_parser_reproduces_the_reported_iou(smoke_run):
    config, workdir, result = smoke_run
    parser = parsing.load_trained_parser(workdir)
    assert isinstance(parser, parsing.Parser)
    source, _, test_idx = face_parser.build_data(config)
    batch = source.batch(test_idx)
    pred = parser.parse(batch["image"])
    iou = np.asarray(parser_net.per_region_iou(pred, batch["parse"]))
    np.testing.assert_allclose(np.nanmean(iou), result["mean_iou"], atol=1e-6)


@pytest.mark.slow
def test_rerun_resumes_without_training(smoke_run):
    config, workdir, result = smoke_run
    metrics = (workdir / parsing.PARSER_RUN_DIR / "metrics.jsonl").read_text()
    again = registry.run_experiment(config, str(workdir))
    assert (workdir / parsing.PARSER_RUN_DIR / "metrics.jsonl").read_text() == metrics
    assert again["mean_iou"] == pytest.approx(result["mean_iou"])


@pytest.mark.slow
def test_changed_settings_refuse_the_old_checkpoint(smoke_run):
    config, workdir, _ = smoke_run
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.widths = (8, 8)
    with pytest.raises(ValueError, match="other settings"):
        registry.run_experiment(changed, str(workdir))


def _fixed_results():
    iou = {n: float("nan") if n == "hat" else 0.5 + 0.01 * r for r, n in enumerate(regions.REGIONS)}
    share = [0.0 if n == "hat" else 1.0 / (regions.NUM_REGIONS - 1) for n in regions.REGIONS]
    return {"source": "celebamask_hq", "resolution": 256, "num_train": 100, "num_test": 20,
            "num_steps": 40, "per_region_iou": iou, "mean_iou": 0.6, "pixel_accuracy": 0.875,
            "pixel_share": share}


def test_report_on_fixed_results():
    pages = face_parser.report(_fixed_results(), prefix="r/")
    assert set(pages) == {"table.md", "summary.md"}
    table = pages["table.md"].splitlines()
    assert table[0] == "| region | IoU | share of pixels |"
    assert len(table) == 2 + regions.NUM_REGIONS + 1
    # Rows in regions.REGIONS order, absent regions named, shares in percent.
    assert table[2] == f"| {regions.REGION_LABELS['background']} | 0.500 | 5.56% |"
    hat = regions.REGIONS.index("hat")
    assert table[2 + hat] == f"| {regions.REGION_LABELS['hat']} | absent | 0.00% |"
    assert table[-1] == "| **mean over present regions** | **0.600** | |"
    summary = pages["summary.md"]
    assert "Face parser (celebamask_hq, 256 px, 100 training images, 40 steps; 20 held-out test images)" in summary
    assert "**mean IoU 0.600**, pixel accuracy 0.875" in summary
    assert "(r/figure_examples.png)" in summary and "(r/figure_iou.png)" in summary
    assert pages["table.md"] in summary


def test_load_parser_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="parser_config.json"):
        parsing.load_trained_parser(tmp_path)
    with pytest.raises(FileNotFoundError, match="parser_config.json"):
        parsing.parser_from_config(ml_collections.ConfigDict({"parser": str(tmp_path)}))
    assert parsing.parser_from_config(ml_collections.ConfigDict({"parser": ""})) is None
    assert parsing.parser_from_config(ml_collections.ConfigDict({"method": "grad_cam"})) is None


def test_bad_data_settings_are_named():
    config = load_config("face_parser", "smoke")
    config.data.source = "lfw"
    with pytest.raises(ValueError, match="'lfw'"):
        face_parser.build_data(config)
    config = load_config("face_parser", "smoke")
    config.data.source = "celebamask_hq"
    with pytest.raises(ValueError, match="data.root"):
        face_parser.build_data(config)
    config = load_config("face_parser", "smoke")
    config.data.test_offset = 3
    with pytest.raises(ValueError, match="test_offset=3"):
        face_parser.build_data(config)


class _AllSkinParser:
    """Every pixel is skin: the audit must then see one region only."""

    visible_regions = np.arange(regions.NUM_REGIONS) == regions.region_id("skin")

    def parse(self, images, batch=None):
        return jax.numpy.full(images.shape[:3], regions.region_id("skin"), jax.numpy.int32)


def test_audit_takes_its_parse_maps_from_the_parser():
    model = build_model("small_resnet", 1)
    variables = init_variables(model, jax.random.key(0), 64)
    clf = classifiers.TrainedClassifier(model, variables, "random", "")
    source = pipeline.SyntheticSource(seed=0, resolution=64)
    indices = np.arange(12)
    cfg = ml_collections.ConfigDict(dict(method="grad_cam", target_mode="predicted", ior_mode="soft",
                                         patch_size=8, top_k=2, num_overlays=1))
    own = audit_lib.audit(clf, source, indices, "Male", cfg, 8)
    truth = audit_lib.audit(clf, source, indices, "Male", cfg, 8, parser=parsing.GroundTruthParser())
    np.testing.assert_array_equal(own.ior, truth.ior)
    np.testing.assert_array_equal(own.counts, truth.counts)

    skin_only = audit_lib.audit(clf, source, indices, "Male", cfg, 8, parser=_AllSkinParser())
    skin = regions.region_id("skin")
    assert skin_only.counts[skin] == 12 and skin_only.counts.sum() == 12
    assert np.isnan(np.delete(skin_only.ior, skin)).all()
    # IoR of a region covering the whole image is the mean of the (min-max normalised) map.
    assert 0.0 <= skin_only.ior[skin] <= 1.0


def test_median_frequency_weights_against_hand_values():
    # Two 2x2 maps: region 0 covers 6 of 8 pixels; region 1 one pixel in image 0
    # (share 1/4 there); region 2 one pixel in image 1; region 3 never occurs.
    maps = np.array([[[0, 0], [0, 1]], [[0, 0], [0, 2]]])
    freq = np.array([6 / 8, 1 / 4, 1 / 4])
    median = np.median(freq)
    weights = parser_net.median_frequency_weights(maps, num_regions=4)
    np.testing.assert_allclose(weights, [median / freq[0], 1.0, 1.0, 0.0], rtol=1e-6)
    soft = parser_net.median_frequency_weights(maps, num_regions=4, power=0.5)
    np.testing.assert_allclose(soft, np.sqrt(weights), rtol=1e-6)
    with pytest.raises(ValueError, match="labelled pixel"):
        parser_net.median_frequency_weights(np.full((1, 2, 2), -1), num_regions=4)


def test_weighted_loss_counts_small_regions_more():
    logits = jax.numpy.zeros((1, 2, 2, 3)).at[0, 0, 0, 2].set(5.0)   # pixel (0, 0) confidently region 2
    batch = {"parse": jax.numpy.array([[[1, 0], [0, 0]]])}             # but it is region 1
    plain, _ = parser_net.make_parser_loss(None)(logits, batch)
    weighted, _ = parser_net.make_parser_loss(np.array([0.1, 10.0, 1.0]))(logits, batch)
    assert float(weighted) > float(plain)
