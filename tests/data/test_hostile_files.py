"""Files crafted to break a reader (from tests/fuzz_corpus.py): each is refused with a BadFileError naming it and
the reason, from its header and before anything large is allocated, or read with a recorded rule."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
from fuzz_corpus import crafted_files, seed_files

from aeflow.data import ImageDataset, Record, expand_source, read_raw
from aeflow.data.layouts import scan_inputs
from aeflow.errors import BadFileError, TooLargeError

CRAFTED = crafted_files()
SEEDS = seed_files()


def write(tmp_path, name, table=CRAFTED):
    path = tmp_path / name
    path.write_bytes(table[name])
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name, reason", [
    ("frames_999999999.dcm", r"declares 999999999 frames \(NumberOfFrames\), over the limit"),
    ("frames_100000.dcm", r"declares 100000 frames"),
    ("nifti2_1x1x1e9.nii", r"NIfTI volume has 1000000000 pixels, over the limit"),
    ("nifti1_32767_cubed.nii", r"NIfTI volume has 35181150961663 pixels"),
    ("rows_huge.dcm", r"declares \d+ bytes of pixel data, but the file holds only \d+ bytes"),
])
def test_declared_sizes_are_refused_before_any_list_or_array_is_built(tmp_path, name, reason):
    path = write(tmp_path, name)
    before = peak_rss_mb()
    with pytest.raises(TooLargeError if "limit" in reason else BadFileError, match=reason) as error:
        expand_source(path)
    assert error.value.path == str(path)
    assert peak_rss_mb() - before < 100  # a list of 1e9 frame names alone would take tens of GB


@pytest.mark.parametrize("name, reason", [
    ("frames_minus3.dcm", r"declares -3 frames \(NumberOfFrames\); there must be at least 1"),
    ("frames_zero.dcm", r"declares 0 frames"),
    ("nifti1_zero_slices.nii", r"shape \(20, 24, 0\) holds no voxels"),
    ("nifti1_negative.nii", r"holds no voxels"),
])
def test_zero_or_negative_counts_are_errors_not_empty_lists(tmp_path, name, reason):
    # An empty frame/slice list made such a file vanish from predict: no prediction row and no skipped row.
    path = write(tmp_path, name)
    with pytest.raises(BadFileError, match=reason):
        expand_source(path)
    records, skipped = scan_inputs([path], skip_bad=True)
    assert records == [] and [p for p, _ in skipped] == [str(path)]


@pytest.mark.parametrize("name", ["two_channel.tif", "five_channel.tif", "five_planar.tif", "four_no_alpha.tif",
                                  "two_channel.npz", "five_channel.npz"])
def test_channel_counts_outside_the_policy_are_refused_with_the_reason(tmp_path, name):
    path = write(tmp_path, name)
    with pytest.raises(BadFileError, match=r"\d (channels|samples) per pixel.*aeflow reads gray \(1\), RGB \(3\)"):
        read_raw(str(path))


@pytest.mark.parametrize("name, rule, channels", [
    ("rgba.png", "rgb+alpha: alpha dropped", 3), ("la.png", "gray+alpha: alpha dropped", 1),
    ("rgba.tif", "rgb+alpha: alpha dropped", 3), ("two_channel_alpha.tif", "gray+alpha: alpha dropped", 1),
    ("rgb_planar.tif", "rgb", 3), ("palette.png", "P->RGB (Pillow), rgb", 3), ("rgb.dcm", "rgb", 3),
])
def test_convertible_channel_layouts_are_read_with_the_rule_recorded(tmp_path, name, rule, channels):
    raw = read_raw(str(write(tmp_path, name, SEEDS)))
    assert raw.meta["channels"] == rule
    assert (raw.array.shape[2] if raw.array.ndim == 3 else 1) == channels


def test_planar_rgb_tiff_keeps_its_pixels_in_place(tmp_path):
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, (3, 7, 5), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_raw(str(path)).array, np.moveaxis(rgb, 0, 2))


def test_rgb24_nifti_becomes_an_rgb_image(tmp_path):
    import nibabel

    voxels = np.zeros((5, 4, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    voxels["R"], voxels["G"], voxels["B"] = 10, 20, 30
    path = tmp_path / "rgb.nii"
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), str(path))
    raw = read_raw(f"{path}#axis=2,slice=1")
    assert raw.array.shape == (5, 4, 3) and raw.array.dtype == np.uint8
    assert raw.array[0, 0].tolist() == [10, 20, 30] and raw.meta["channels"] == "rgb"


@pytest.mark.parametrize("name, reason", [
    ("strings.npz", r"'train_images' holds <U1 values, not numbers"),
    ("complex.npz", r"holds complex64 values, not numbers"),
    ("declares_4gb.npz", r"declares 4294967296 bytes of data, but its entry holds 64"),
    ("images_1d.npz", r"shape \(5,\), not images"),
    ("nifti1_complex.nii#axis=2,slice=0", r"holds complex64 values, not numbers"),
    ("complex.tif", r"holds complex64 values, not numbers"),
])
def test_non_numeric_or_forged_arrays_are_refused(tmp_path, name, reason):
    file, _, fragment = name.partition("#")
    path = write(tmp_path, file)
    with pytest.raises(BadFileError, match=reason):
        read_raw(f"{path}#{fragment}" if fragment else str(path))


def test_npz_is_checked_from_its_header_before_decompressing(tmp_path, monkeypatch):
    import aeflow.data.readers as readers

    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, train_images=np.zeros((64, 64, 64), np.uint8), train_labels=np.zeros(64))
    monkeypatch.setattr(readers, "MAX_NPZ_BYTES", 64 * 64 * 64 - 1)
    readers._npz_array.cache_clear()
    with pytest.raises(TooLargeError, match=r"'train_images' declares 262144 bytes, over the limit of 262143"):
        read_raw(f"{path}#split=train,index=0")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("decompressed before the size check"))
    with pytest.raises(TooLargeError):
        read_raw(f"{path}#split=train,index=1")


def test_planar_tiff_is_measured_by_its_tags_not_its_first_two_dimensions(tmp_path):
    import tifffile

    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.zeros((3, 300, 300), np.uint8), photometric="rgb", planarconfig="separate")
    with pytest.raises(TooLargeError, match=r"image has 90000 pixels, over the limit of 10000"):
        read_raw(str(path), max_pixels=10_000)


def test_each_tiff_page_is_checked_not_only_the_first(tmp_path):
    path = write(tmp_path, "small_page0_planar_page1.tif")
    assert read_raw(str(path), max_pixels=10_000).array.shape == (24, 20)
    with pytest.raises(TooLargeError, match=r"page 1 has 1440000 pixels, over the limit of 10000"):
        read_raw(f"{path}#frame=1", max_pixels=10_000)


def test_resize_target_is_checked_before_the_image_is_decoded(tmp_path):
    # 1 x 100,000,000 is under the pixel limit, but resizing it to 64 x 64 would need 6.4e9 pixels in between.
    path = write(tmp_path, "png_1x100000000.png")
    before = peak_rss_mb()
    dataset = ImageDataset([Record(str(path), -1)], image_size=64)
    with pytest.raises(TooLargeError, match=r"resizing 100000000x1 to 64x64 needs 6400000000 pixels in between"):
        dataset[0]
    assert peak_rss_mb() - before < 90  # the decoded pixels alone are 100 MB (and 800 MB as float64)
    assert read_raw(str(path)).array.shape == (1, 100_000_000)  # without a resize, the image itself is readable


@pytest.mark.parametrize("name", ["hash#frame=1.png", "hash#1.dcm", "new\nline.png", "name with spaces.png"])
def test_file_names_with_hash_newline_and_spaces_are_read_as_names(tmp_path, name):
    path = write(tmp_path, name)
    records, skipped = scan_inputs([path], skip_bad=False)
    assert skipped == [] and records
    for record in records:
        read_raw(record.source)
    folder_records, _ = scan_inputs([tmp_path], skip_bad=False)
    assert [r.source for r in folder_records] == [r.source for r in records]


def test_a_frame_of_a_file_whose_name_holds_a_hash(tmp_path):
    path = write(tmp_path, "hash#1.dcm")
    assert expand_source(path) == [f"{path}#frame=0", f"{path}#frame=1"]
    assert read_raw(f"{path}#frame=1").meta["frame"] == 1


def test_unreadable_folder_and_broken_links_are_listed_not_passed_over(tmp_path, monkeypatch):
    good = write(tmp_path, "name with spaces.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    real_scandir = os.scandir

    def scandir(path):  # the tests run as root, for whom chmod 000 does not lock a folder
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    records, skipped = scan_inputs([tmp_path], skip_bad=True)
    assert [r.source for r in records] == [str(good)]
    assert dict(skipped) == {str(locked): "cannot list folder: Permission denied",
                             str(tmp_path / "dangling.png"): "a link that leads nowhere (broken or looping)"}
    with pytest.raises(BadFileError, match="dangling.png: a link that leads nowhere"):  # the first in name order
        scan_inputs([tmp_path], skip_bad=False)


@pytest.mark.parametrize("document, reason", [
    ([1, 2], r"not an aeflow split list \(a JSON list"),
    ({"format": "aeflow-splits/1"}, r"malformed split file list \(KeyError"),
    ({"format": "aeflow-splits/1", "checksums": {}, "splits": {"train": [{"source": "a.png", "mask": None,
                                                                           "label": 0, "colour": "red"}]},
      "layout": "folder", "seed": 0, "options": {}, "root": None}, r"malformed split file list \(TypeError"),
    ({"format": "aeflow-splits/1", "checksums": {"/dev/zero": "0"}, "splits": {}, "layout": "x", "seed": 0,
      "options": {}, "root": None}, r"/dev/zero \(missing, or not a regular file\)"),
])
def test_a_crafted_split_list_is_a_data_error(tmp_path, document, reason):
    import json

    from aeflow.data import load_splits
    from aeflow.errors import DataError

    (tmp_path / "splits.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=reason):
        load_splits(tmp_path)  # /dev/zero used to be hashed forever
