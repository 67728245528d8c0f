"""Reader defects that used to pass silently: misnamed masks, duplicate rows, non-UTF-8
tables, LFW pairs naming one person as a mismatch, a header declaring no pairs."""

import pytest

from faceaudit_jax.data import celeba, folders
from test_celeba import write_celeba
from test_folders import write_celebamask_hq, write_lfw, write_rfw


def test_misnamed_mask_file_is_named_with_its_image(tmp_path):
    write_celebamask_hq(tmp_path)
    folder = tmp_path / "CelebAMask-HQ-mask-anno" / "0"
    nose = sorted(folder.glob("00001_*.png"))[0]
    region = nose.name.split("_", 1)[1]
    nose.rename(folder / f"1_{region}")  # the index without its zero padding
    hq = folders.CelebAMaskHQ(tmp_path, mask_size=8)
    with pytest.warns(UserWarning, match=rf"1 mask file\(s\) do not match .*1_{region} \(image 1\)"):
        files = hq.mask_files(1)
    assert region.removesuffix(".png") not in [name for name, _ in hq._folder_masks(0)[1]]
    assert len(files) == 5


def test_duplicate_attribute_rows_name_both_lines(tmp_path):
    truth = write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[5] = truth["names"][1] + " " + lines[5].split(" ", 1)[1]  # row 4 repeats row 2's image
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"list_attr_celeba.txt: {truth['names'][1]} has two rows, "
                                         r"lines 4 and 6"):
        celeba.CelebA(tmp_path)


def test_duplicate_rows_in_celebamask_hq_are_named_too(tmp_path):
    write_celebamask_hq(tmp_path)
    path = tmp_path / "CelebAMask-HQ-attribute-anno.txt"
    lines = path.read_text().splitlines()
    lines[0] = str(int(lines[0]) + 1)  # the count agrees: only the repeat is wrong
    path.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(ValueError, match="0.jpg has two rows, lines 3 and 8"):
        folders.CelebAMaskHQ(tmp_path, mask_size=8)


def test_latin1_byte_is_reported_with_file_and_line(tmp_path):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    data = path.read_bytes().split(b"\n")
    data[3] = data[3].replace(b".jpg", b"\xe9.jpg")
    path.write_bytes(b"\n".join(data))
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt: line 4 is not UTF-8 text \(byte 0xe9"):
        celeba.CelebA(tmp_path)


def test_crlf_tables_still_read(tmp_path):
    truth = write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert celeba.CelebA(tmp_path).filenames == truth["names"]


def test_lfw_mismatched_pair_naming_one_person_is_an_error(tmp_path):
    lines = write_lfw(tmp_path)
    lines[3] = "Ann_A\t3\tAnn_A\t1"
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs.txt: line 4 is a mismatched pair naming 'Ann_A' twice"):
        folders.read_lfw_pairs(tmp_path)


@pytest.mark.parametrize("header", ["0 0", "0", "2 0"])
def test_lfw_header_declaring_no_pairs_is_an_error(tmp_path, header):
    write_lfw(tmp_path)
    (tmp_path / "pairs.txt").write_text(header + "\n")
    with pytest.raises(ValueError, match=f"first line '{header}' declares .*expected at least one fold"):
        folders.read_lfw_pairs(tmp_path)


def test_rfw_mismatched_pair_naming_one_person_is_an_error(tmp_path):
    write_rfw(tmp_path)
    path = next(tmp_path.rglob("African_pairs.txt"))
    lines = path.read_text().splitlines()
    mismatched = next(i for i, line in enumerate(lines) if len(line.split()) == 4)
    name = lines[mismatched].split()[0]
    tokens = lines[mismatched].split()
    lines[mismatched] = "\t".join([name, tokens[1], name, tokens[3]])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"line {mismatched + 1} is a mismatched pair naming '{name}' twice"):
        folders.read_rfw_pairs(tmp_path, races=("African",), num_folds=2, check_files=False)


# ---------------------------------------------------------------------------
# data.sources on bad generic folders: one error naming the file / line / value
# ---------------------------------------------------------------------------

def _generic_folder(root, **kwargs):
    import ml_collections
    import numpy as np
    from test_sources import make_faces, subset

    from faceaudit_jax.data import fixtures, sources

    fixtures.write_layout("folder", root, subset(make_faces(n=8), slice(0, 8)), **kwargs)
    cfg = ml_collections.ConfigDict({"source": "folder", "root": str(root), "resolution": 16})
    sources.add_data_fields(cfg, pairs="folder")
    return cfg, np


def test_a_target_without_a_column_names_the_csv(tmp_path):
    from faceaudit_jax.data import sources
    cfg, _ = _generic_folder(tmp_path / "f", attributes=["Smiling"], pairs=False)
    source = sources.build_source(cfg)
    with pytest.raises(ValueError, match=r"target 'Male'.*does not annotate it \(.*f/attributes.csv has no "
                                         r"'Male' column.*it annotates Smiling"):
        sources.require_attributes(source, "Male", "target")


def test_a_listed_image_that_is_missing_names_its_csv_line(tmp_path):
    from faceaudit_jax.data import sources
    cfg, _ = _generic_folder(tmp_path / "f", pairs=False)
    (tmp_path / "f" / "images" / "00003.png").unlink()  # the 4th data row: line 5
    with pytest.raises(FileNotFoundError, match=r"generic-layout.*missing image: .*images/00003.png "
                                                r"\(line 5 of .*attributes.csv; 1 listed images are missing\)"):
        sources.build_source(cfg)


def test_label_maps_of_another_shape_name_both_files(tmp_path):
    from PIL import Image

    from faceaudit_jax.data import sources
    cfg, np = _generic_folder(tmp_path / "f", pairs=False)
    masks = tmp_path / "f" / "masks"
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(masks / "00002.png")  # images are 32 x 32
    source = sources.build_source(cfg)  # row 0 is fine; row 2 fails when it is read
    with pytest.raises(ValueError, match=r"parse map .*masks/00002.png is 20x16 but its image "
                                         r".*images/00002.png is 32x32; expected the same aspect ratio"):
        source.batch([1, 2])
    # A smaller square map is the image's map at another size: resized, not an error.
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(masks / "00002.png")
    np.testing.assert_array_equal(source.batch([2])["parse"], np.full((1, 16, 16), 3))
    # The first row is checked when the source is built: a layout-wide mistake fails before any work.
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(masks / "00000.png")
    with pytest.raises(ValueError, match=r"parse map .*masks/00000.png is 20x16"):
        sources.build_source(cfg)


def test_a_region_mask_of_another_size_names_it_and_the_reference(tmp_path):
    from PIL import Image

    from faceaudit_jax.data import sources
    cfg, np = _generic_folder(tmp_path / "f", masks="regions", pairs=False)
    masks = sorted((tmp_path / "f" / "masks").glob("00001_*.png"))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks[-1])
    with pytest.raises(ValueError, match=rf"mask .*{masks[-1].name} is 16x16; expected 32x32 like "
                                         r".*masks/00001_\w+\.png, this image's first region mask"):
        sources.build_source(cfg).batch([1])


def test_a_pair_naming_a_missing_image_names_the_pairs_line(tmp_path):
    from faceaudit_jax.data import sources
    cfg, _ = _generic_folder(tmp_path / "f")
    with open(tmp_path / "f" / "pairs.csv", "a") as f:
        f.write("images/00001.png,images/nope.png,1,0\n")
    lines = (tmp_path / "f" / "pairs.csv").read_text().splitlines()
    with pytest.raises(FileNotFoundError, match=rf"missing image: .*images/nope.png \(file_b on line "
                                                rf"{len(lines)} of .*pairs.csv"):
        sources.build_pairs(cfg)
