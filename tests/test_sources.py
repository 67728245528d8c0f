"""data.sources on fixture folders of every layout: batches against the files, splits, pairs, errors.

The fixture faces are hand-made arrays (noise images, block parse maps, a
Male x Wearing_Lipstick link), written by ``data.fixtures``; every expected
value is read back from the files with PIL or taken from the arrays written,
never from the reader under test.
"""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from faceaudit_jax import regions
from faceaudit_jax.data import fixtures, pipeline, sources

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
RES = 32
N = 24
MALE, LIPSTICK = regions.attribute_id("Male"), regions.attribute_id("Wearing_Lipstick")
UNKNOWN = [regions.attribute_id(a) for a in ("Attractive", "Blurry")]


def make_faces(n=N, res=RES, seed=0):
    rng = np.random.default_rng(seed)
    parse = np.zeros((n, res, res), np.int32)
    for i in range(n):
        for rid in rng.choice(np.arange(1, regions.NUM_REGIONS), size=5, replace=False):
            y, x = rng.integers(0, res - 4, size=2)
            parse[i, y:y + rng.integers(2, res - y), x:x + rng.integers(2, res - x)] = rid
    attrs = rng.integers(0, 2, size=(n, regions.NUM_ATTRIBUTES)).astype(np.int8)
    attrs[:, MALE] = np.arange(n) % 2
    # Women wear lipstick, men do not, but for one conflicting image of each.
    attrs[:, LIPSTICK] = 1 - attrs[:, MALE]
    attrs[[0, 1], LIPSTICK] = 1 - attrs[[0, 1], LIPSTICK]
    attrs[:, UNKNOWN] = -1
    identity = (np.arange(n) // 3).astype(np.int32)
    return {"image": rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8), "parse": parse,
            "attrs": attrs, "identity": identity, "group": (identity % 4).astype(np.int32),
            "landmarks": rng.uniform(4, res - 4, size=(n, 5, 2)).astype(np.float32)}


def load_config(name, variant=""):
    from faceaudit_jax import cli
    return cli.load_config(f"{ROOT / 'configs' / name}.py:{variant}")


def subset(faces, rows):
    """The hand-made arrays of some faces (without what the writers added)."""
    return {k: faces[k][rows] for k in ("image", "parse", "attrs", "identity", "group", "landmarks")}


def data_cfg(source, root, **fields):
    cfg = ml_collections.ConfigDict({"source": source, "root": str(root), "resolution": RES})
    sources.add_data_fields(cfg, **fields)
    return cfg


def pil_square(path, res=None):
    """Independent reference: PIL decode, centre square, bilinear resize, [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if res is not None and res != side:
            img = img.resize((res, res), Image.BILINEAR)
        return np.asarray(img, np.float32) / 255.0


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    faces = make_faces()
    partition = np.array([0] * 15 + [1] * 3 + [2] * 6)
    fixtures.write_layout("celeba", root / "celeba", faces, partition=partition)
    # CelebA rows 0..23 are the originals of HQ images 0..23: rows 18.. are published test.
    orig = np.r_[np.arange(15), 170_000 + np.arange(3), 190_000 + np.arange(6)]
    fixtures.write_layout("celebamask_hq", root / "celebamask_hq", faces, orig_index=orig)
    fixtures.write_layout("fairface", root / "fairface", faces)
    fixtures.write_layout("lfw", root / "lfw", faces)
    fixtures.write_layout("rfw", root / "rfw", faces, races=("African", "Asian"))
    fixtures.write_layout("folder", root / "folder", faces)
    fixtures.write_layout("folder", root / "folder_regions", faces, masks="regions", pairs=False,
                          image_format="jpg")
    return root, faces, partition


def test_celeba_batches_match_the_files(folders_root):
    root, faces, partition = folders_root
    source = sources.build_source(data_cfg("celeba", root / "celeba"))
    assert len(source) == N and not source.has_parse and source.name == "celeba"
    rows = [5, 0, 23]
    batch = source.batch(rows)
    assert set(batch) == {"image", "attrs", "landmarks", "identity"}
    for b, r in enumerate(rows):
        path = root / "celeba" / "img_align_celeba" / f"{r + 1:06d}.jpg"
        np.testing.assert_allclose(batch["image"][b], pil_square(path), atol=1e-6)
    # CelebA tables know 1 / -1 only: unknown columns were written absent.
    expected = np.where(faces["attrs"][rows] == 1, 1, 0)
    np.testing.assert_array_equal(batch["attrs"], expected)
    np.testing.assert_array_equal(batch["identity"], faces["identity"][rows])
    np.testing.assert_allclose(batch["landmarks"], np.round(faces["landmarks"][rows]), atol=1e-4)
    half = source.with_resolution(16).batch([5])
    path = root / "celeba" / "img_align_celeba" / "000006.jpg"
    np.testing.assert_allclose(half["image"][0], pil_square(path, 16), atol=1e-6)
    _, train = sources.build_split(data_cfg("celeba", root / "celeba"), "train")
    _, test = sources.build_split(data_cfg("celeba", root / "celeba"), "test")
    np.testing.assert_array_equal(train, np.flatnonzero(partition == 0))
    np.testing.assert_array_equal(test, np.flatnonzero(partition == 2))


def test_celebamask_hq_and_folder_parse_maps_are_the_written_ones(folders_root):
    root, faces, _ = folders_root
    rows = [3, 17, 20]
    for kind, folder in (("celebamask_hq", "celebamask_hq"), ("folder", "folder"),
                         ("folder", "folder_regions")):
        source = sources.build_source(data_cfg(kind, root / folder))
        assert source.has_parse
        batch = source.batch(rows)
        np.testing.assert_array_equal(batch["parse"], faces["parse"][rows])
        assert batch["image"].shape == (3, RES, RES, 3) and batch["image"].dtype == np.float32
    hq = sources.build_source(data_cfg("celebamask_hq", root / "celebamask_hq"))
    np.testing.assert_allclose(hq.batch([17])["image"][0],
                               pil_square(root / "celebamask_hq" / "CelebA-HQ-img" / "17.jpg"), atol=1e-6)
    # PNG images are lossless: the folder source returns the written pixels exactly.
    folder = sources.build_source(data_cfg("folder", root / "folder"))
    np.testing.assert_allclose(folder.batch(rows)["image"], faces["image"][rows] / 255.0, atol=1e-6)
    # Nearest-neighbour parse at half resolution: the pixel whose centre is nearest (2j + 1).
    small = folder.with_resolution(16).batch(rows)["parse"]
    np.testing.assert_array_equal(small, faces["parse"][rows][:, 1::2, 1::2])


def test_reduced_scale_jpeg_decoding_stays_close_to_a_full_decode(tmp_path):
    # A smooth 128 px image (noise would differ by the filters' response, not their error).
    ramp = np.linspace(0, 255, 128)
    image = np.stack([ramp[None, :].repeat(128, 0), ramp[:, None].repeat(128, 1),
                      np.full((128, 128), 90.0)], -1).astype(np.uint8)
    path = str(tmp_path / "face.jpg")
    Image.fromarray(image).save(path, quality=95)
    fast = sources.decode_square(path, 32)  # decoded at 1/4 scale
    np.testing.assert_allclose(fast, pil_square(path, 32), atol=6 / 255)
    assert np.abs(fast - pil_square(path, 32)).mean() < 1.5 / 255
    np.testing.assert_allclose(sources.decode_square(path, 128), pil_square(path), atol=1e-6)


def test_attribute_tables_keep_unknowns_and_labels(folders_root):
    root, faces, _ = folders_root
    folder = sources.build_source(data_cfg("folder", root / "folder"))
    table = folder.attributes(np.arange(N))
    np.testing.assert_array_equal(table["attrs"], faces["attrs"])  # -1 stays unknown
    np.testing.assert_array_equal(table["identity"], faces["identity"])
    np.testing.assert_array_equal(table["group"], faces["group"])
    assert "Attractive" not in folder.annotated and "Male" in folder.annotated
    fair = sources.build_source(data_cfg("fairface", root / "fairface"))
    assert fair.annotated == frozenset({"Male", "Young"})
    batch = fair.batch([0, 1])
    np.testing.assert_array_equal(batch["attrs"][:, MALE], faces["attrs"][[0, 1], MALE])
    np.testing.assert_array_equal(batch["group"], faces["group"][[0, 1]])


def test_splits_published_seeded_and_test_root(folders_root):
    root, faces, _ = folders_root
    hq_cfg = data_cfg("celebamask_hq", root / "celebamask_hq")
    np.testing.assert_array_equal(sources.build_split(hq_cfg, "test")[1], np.arange(18, 24))
    np.testing.assert_array_equal(sources.build_split(hq_cfg, "train")[1], np.arange(15))
    fair_cfg = data_cfg("fairface", root / "fairface")
    train_source, train = sources.build_split(fair_cfg, "train")
    test_source, test = sources.build_split(fair_cfg, "test")
    assert train.size == 18 and test.size == 6 and test_source.split == "val"
    # Seeded identity-disjoint split of the generic folder.
    cfg = data_cfg("folder", root / "folder", split_seed=3, test_fraction=0.25)
    _, tr = sources.build_split(cfg, "train")
    _, te = sources.build_split(cfg, "test")
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).size == N
    assert not set(faces["identity"][tr]) & set(faces["identity"][te])
    assert len(set(faces["identity"][te])) == 2  # ceil(0.25 * 8 identities)
    np.testing.assert_array_equal(te, sources.build_split(cfg, "test")[1])  # deterministic
    other = [sources.build_split(data_cfg("folder", root / "folder", split_seed=s, test_fraction=0.25),
                                 "test")[1] for s in range(4, 8)]
    assert any(not np.array_equal(te, o) for o in other)
    # A second folder is the test set: all of its images.
    cfg = data_cfg("folder", root / "folder", test_root=str(root / "folder_regions"))
    test_source, test = sources.build_split(cfg, "test")
    assert test_source.root == str(root / "folder_regions") and test.size == N


def test_faceX_protocol_drops_the_celeba_originals_of_the_hq_test_images(folders_root):
    root, _, partition = folders_root
    cfg = data_cfg("celeba", root / "celeba", test_root=str(root / "celebamask_hq"),
                   test_source="celebamask_hq", test_split="published")
    test_source, test = sources.build_split(cfg, "test")
    train_source, train = sources.build_split(cfg, "train")
    assert test_source.name == "celebamask_hq" and train_source.name == "celeba"
    np.testing.assert_array_equal(test, np.arange(18, 24))
    # HQ test images 18..23 have CelebA originals 190000.. (files 190001.jpg ...), not in the
    # fixture's CelebA; HQ train images 0..14 are CelebA files 000001..000015 = rows 0..14,
    # all in the training partition: nothing of the train partition is an HQ test original.
    np.testing.assert_array_equal(train, np.flatnonzero(partition == 0))
    # Name a CelebA training file as the original of HQ test image 18 (the split follows
    # orig_idx, the overlap the file name): that file must leave the training set.
    mapping = root / "celebamask_hq" / "CelebA-HQ-to-CelebA-mapping.txt"
    lines = mapping.read_text().splitlines()
    original = lines[:19] + ["18 190000 000003.jpg"] + lines[20:]
    try:
        mapping.write_text("\n".join(original) + "\n")
        _, train = sources.build_split(cfg, "train")
        np.testing.assert_array_equal(train, np.setdiff1d(np.flatnonzero(partition == 0), [2]))
    finally:
        mapping.write_text("\n".join(lines) + "\n")


def test_pairs_of_every_layout(folders_root):
    root, faces, _ = folders_root
    for kind in ("lfw", "folder"):
        pairs = sources.build_pairs(data_cfg("folder", root / kind, pairs=kind))
        written = faces["pairs"]  # the last writer's pairs are the folder's; same seed for both
        assert len(pairs) == len(written) == 12
        np.testing.assert_array_equal(pairs.same, [s for _, _, s in written])
        np.testing.assert_array_equal(pairs.fold, np.repeat([0, 1], 6))
        images = sources.load_pair_images(pairs, 16)
        assert images.image_a.shape == (12, 16, 16, 3) and images.image_a.dtype == np.uint8
        same = pairs.same
        np.testing.assert_array_equal(images.identity_a[same], images.identity_b[same])
    rfw = sources.build_pairs(data_cfg("folder", root / "rfw", pairs="rfw", num_folds=2,
                                       races=("African", "Asian")))
    assert len(rfw) == 16 and set(rfw.group.tolist()) == {0, 1}
    a, b, same = faces["rfw_pairs"]["Asian"][0]
    assert rfw.same[8] == same and rfw.group[8] == 1
    assert os.path.basename(os.path.dirname(rfw.path_a[8])) == f"asian_{faces['identity'][a]}"
    np.testing.assert_array_equal(sources.load_pair_images(rfw, RES, indices=[8]).image_a[0],
                                  np.round(pil_square(rfw.path_a[8]) * 255).astype(np.uint8))


@pytest.mark.parametrize("make_cfg, error, message", [
    (lambda r: data_cfg("celeba", ""), ValueError, r"data.source='celeba' needs data.root"),
    (lambda r: data_cfg("celeba", r / "nowhere"), FileNotFoundError, r"data.root=.*nowhere.* does not exist"),
    (lambda r: data_cfg("celeba", r / "celebamask_hq"), FileNotFoundError,
     r"is not a celeba folder: missing CelebA image folder.*img_align_celeba.*Found: CelebA-HQ-img"),
    (lambda r: data_cfg("folder", r / "celeba"), FileNotFoundError, r"missing attribute CSV.*attributes.csv"),
    (lambda r: data_cfg("imagenet", r), ValueError, r"data.source='imagenet'; expected one of"),
])
def test_bad_roots_and_layouts_are_named(folders_root, make_cfg, error, message):
    root, _, _ = folders_root
    with pytest.raises(error, match=message):
        sources.build_source(make_cfg(root))


def test_bad_tables_and_attributes_are_named(folders_root, tmp_path):
    root, faces, _ = folders_root
    fair = sources.build_source(data_cfg("fairface", root / "fairface"))
    with pytest.raises(ValueError, match=r"'Wearing_Lipstick'.*does not annotate it; it annotates Male, Young"):
        sources.require_attributes(fair, ["Male", "Wearing_Lipstick"])
    with pytest.raises(ValueError, match="'Lipstick' is not a CelebA attribute"):
        sources.require_attributes(fair, ["Lipstick"])
    fixtures.write_layout("folder", tmp_path / "bad", subset(faces, slice(0, 4)), pairs=False)
    csv = tmp_path / "bad" / "attributes.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("Male")] = "-1"
    csv.write_text("\n".join([lines[0], lines[1], ",".join(cells)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"attributes.csv: line 3 has Male='-1'; expected 1 .* 0 .* empty"):
        sources.build_source(data_cfg("folder", tmp_path / "bad"))
    csv.write_text("\n".join(lines) + "\n")
    os.remove(tmp_path / "bad" / "masks" / "00002.png")
    with pytest.raises(FileNotFoundError, match=r"missing parse map for images/00002.png"):
        sources.build_source(data_cfg("folder", tmp_path / "bad"))


def test_prefetching_iterators_give_the_same_batches(folders_root):
    root, _, _ = folders_root
    source = sources.build_source(data_cfg("folder", root / "folder", num_workers=3))
    rows = np.arange(N)[::-1]
    plain = list(pipeline.iterate_batches(source, rows, 5, prefetch=0))
    ahead = list(pipeline.iterate_batches(source, rows, 5, prefetch=2))
    assert len(plain) == len(ahead) == 5
    for (a, va), (b, vb) in zip(plain, ahead):
        np.testing.assert_array_equal(va, vb)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert plain[-1][1].sum() == 4  # padded last batch
    early = pipeline.iterate_batches(source, rows, 2, prefetch=2)
    next(early)
    early.close()  # stops the worker without draining the rest
    fn_plain = pipeline.step_batch_fn(source, np.arange(N), 4, seed=1)
    fn_ahead = pipeline.step_batch_fn(source, np.arange(N), 4, seed=1, prefetch=2, num_steps=8)
    for step in [0, 1, 2, 5, 6, 7]:  # a skipped step (resume) is loaded on demand
        np.testing.assert_array_equal(np.asarray(fn_plain(step)["image"]),
                                      np.asarray(fn_ahead(step)["image"]))


def test_cheap_experiments_build_their_data_from_fixture_folders(folders_root):
    from faceaudit_jax import multi_attribute
    from faceaudit_jax.experiments import face_parser
    from faceaudit_jax.data import verification as verification_data

    root, faces, partition = folders_root
    config = load_config("face_parser", "smoke")
    config.data.source, config.data.root, config.data.resolution = "folder", str(root / "folder"), RES
    config.train.size, config.test.size = 0, 0
    source, train_idx, test_idx = face_parser.build_data(config)
    assert train_idx.size + test_idx.size == N and source.has_parse
    config = load_config("attribute_cams", "celeba")
    config.data.root, config.data.resolution = str(root / "celeba"), RES
    source = multi_attribute.build_source(config.data)
    train_idx, test_idx = multi_attribute.split_indices(config, source)
    np.testing.assert_array_equal(test_idx, np.flatnonzero(partition == 2))
    config = load_config("corrrise", "smoke")
    config.data.source, config.data.root, config.data.resolution = "folder", str(root / "folder"), RES
    config.data.test_fraction = 0.5
    config.train.num_identities, config.test.num_identities = 3, 3
    images, identity = verification_data.load_images(config, "test")
    assert images.shape == (9, RES, RES, 3) and np.unique(identity).size == 3
    np.testing.assert_array_equal(images, faces["image"][np.isin(faces["identity"], identity)])


def test_facex_tables_celeba_variant_reads_celeba_and_celebamask_hq(folders_root, tmp_path):
    from faceaudit_jax.experiments import facex_tables

    root, _, partition = folders_root
    config = load_config("facex_tables", "celeba")
    config.data.root, config.data.test_root = str(root / "celeba"), str(root / "celebamask_hq")
    config.data.resolution = RES
    ctx = facex_tables.TablesContext(config, tmp_path)
    train_idx, train_attrs = ctx.pool(True, "train", 0)
    test_idx, _ = ctx.pool(True, "test", 0)
    np.testing.assert_array_equal(train_idx, np.flatnonzero(partition == 0))
    np.testing.assert_array_equal(test_idx, np.arange(18, 24))
    assert ctx.source(True, "test").name == "celebamask_hq" and ctx.source(False).name == "celeba"
    # CelebA-like link of the fixture: lipstick goes with Male = 0.
    assert ctx.confounder_values("Male", ["Wearing_Lipstick"], train_idx) == (0,)
    # tables.confounder_value (biased_spec passes it) fixes the direction instead.
    assert ctx.confounder_values("Male", ["Wearing_Lipstick"], train_idx, fixed=1) == (1,)


def test_tfds_source_without_the_extra_names_it(tmp_path):
    try:
        import tensorflow_datasets  # noqa: F401
        pytest.skip("tensorflow-datasets is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"faceaudit_jax\[tfds\]"):
        sources.build_source(data_cfg("celeba_tfds", tmp_path))


def test_a_pool_without_a_link_follows_celebas_sign(tmp_path, capsys):
    faces = make_faces(n=16)
    faces["attrs"][:, LIPSTICK] = (np.arange(16) // 2) % 2  # every Male x Lipstick cell has 4 faces
    faces["attrs"][:, regions.attribute_id("Smiling")] = (np.arange(16) // 2) % 2
    fixtures.write_layout("folder", tmp_path / "flat", faces, pairs=False)
    source = sources.build_source(data_cfg("folder", tmp_path / "flat"))
    rows = np.arange(16)
    bias = ml_collections.ConfigDict({"target": "Male", "confounders": ("Wearing_Lipstick",),
                                      "confounder_values": None})
    assert sources.bias_direction(bias, source, rows) == (0,)  # CelebA: women wear lipstick
    assert "no Male x Wearing_Lipstick link; following CelebA's sign" in capsys.readouterr().out
    bias.confounders = ("Smiling",)  # linked neither here nor in CelebA-like faces
    with pytest.raises(ValueError, match="Smiling.*neither the data nor CelebA.*bias.confounder_values"):
        sources.bias_direction(bias, source, rows)
    bias.confounder_values = (1,)
    assert sources.bias_direction(bias, source, rows) == (1,)


def test_facex_and_audit_configs_share_the_synthetic_fields():
    data = ml_collections.ConfigDict({"source": "synthetic"})
    sources.add_synthetic_fields(data, pool_size=7)
    assert data.pool_size == 7 and data.test_offset == sources.SYNTHETIC_DATA_FIELDS["test_offset"]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['pool_sise'\]"):
        sources.add_synthetic_fields(data, pool_sise=7)
    facex, audit = load_config("facex").data, load_config("audit").data
    for name in ("seed", "resolution", *sources.SYNTHETIC_DATA_FIELDS):
        assert facex[name] == audit[name], name
