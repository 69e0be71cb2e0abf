"""Readers keep raw values; intensity rules map them to [0, 1] visibly."""

import numpy as np
import pytest
from conftest import noise_image, write_dicom, write_nifti, write_png

from aeflow.data import RawImage, expand_source, parse_intensity, read_mask, read_raw, to_unit_range
from aeflow.errors import ConfigError


def test_16bit_png_keeps_values_until_dtype_rule(tmp_path):
    values = (np.arange(120).reshape(12, 10) * 547).astype(np.uint16)  # up to 65 093
    raw = read_raw(write_png(tmp_path / "x.png", values))
    assert raw.array.dtype == np.uint16
    np.testing.assert_array_equal(raw.array, values)
    unit, info = to_unit_range(raw, "auto")
    assert info["intensity"] == "dtype" and info["clipped_fraction"] == 0.0
    np.testing.assert_allclose(unit, values / 65535.0, atol=1e-6)


def test_16bit_tiff_and_8bit_jpeg_bmp(tmp_path):
    import tifffile

    values = (np.arange(120).reshape(12, 10) * 300).astype(np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", values)
    np.testing.assert_array_equal(read_raw(str(tmp_path / "x.tif")).array, values)
    gray = noise_image(1)
    np.testing.assert_array_equal(read_raw(write_png(tmp_path / "x.bmp", gray)).array, gray)
    jpeg = read_raw(write_png(tmp_path / "x.jpg", gray))
    assert jpeg.array.shape == gray.shape and jpeg.array.dtype == np.uint8 and jpeg.meta["format"] == "jpeg"


def test_gray_stored_as_rgb_stays_single_channel_and_colour_stays_colour(tmp_path):
    gray = noise_image(2)
    raw = read_raw(write_png(tmp_path / "g.png", np.stack([gray] * 3, axis=2)))
    np.testing.assert_array_equal(raw.array, gray)
    colour = np.stack([gray, 255 - gray, gray // 2], axis=2)
    assert read_raw(write_png(tmp_path / "c.png", colour)).array.shape == (12, 10, 3)


def test_dicom_rescale_slope_intercept_and_window_from_tags(tmp_path):
    stored = np.arange(12).reshape(3, 4) * 100
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024, window=(0, 400))
    raw = read_raw(path)
    np.testing.assert_allclose(raw.array, stored * 2.0 - 1024)
    assert raw.meta["rescale_slope"] == 2.0 and raw.meta["window_center"] == 0.0
    unit, info = to_unit_range(raw, "auto")  # the file's own window: -200 .. 200 HU
    assert info["intensity"] == "window" and info["window"] == (-200.0, 200.0)
    np.testing.assert_allclose(unit, np.clip((stored * 2.0 - 1024 + 200) / 400, 0, 1), atol=1e-6)
    assert info["clipped_fraction"] == pytest.approx(np.mean(np.abs(stored * 2.0 - 1024) > 200))
    explicit, info = to_unit_range(raw, "window:-424,1600")  # -1224 .. 376
    np.testing.assert_allclose(explicit, np.clip((stored * 2.0 - 1024 + 1224) / 1600, 0, 1), atol=1e-6)


def test_dicom_monochrome1_is_inverted_after_the_rule(tmp_path):
    stored = np.arange(12).reshape(3, 4) * 1000
    mono1 = read_raw(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    mono2 = read_raw(write_dicom(tmp_path / "m2.dcm", stored))
    np.testing.assert_array_equal(mono1.array, mono2.array)  # raw values are untouched
    y1, info1 = to_unit_range(mono1, "minmax")
    y2, info2 = to_unit_range(mono2, "minmax")
    np.testing.assert_allclose(y1, 1.0 - y2, atol=1e-6)
    assert info1["inverted"] is True and "inverted" not in info2
    assert y1[0, 0] == 1.0 and y1[-1, -1] == 0.0


def test_multiframe_dicom_gives_one_image_per_frame(tmp_path):
    frames = np.arange(3 * 4 * 5).reshape(3, 4, 5) * 7
    path = write_dicom(tmp_path / "multi.dcm", frames)
    sources = expand_source(path)
    assert sources == [f"{path}#frame={i}" for i in range(3)]
    for i, source in enumerate(sources):
        np.testing.assert_array_equal(read_raw(source).array, frames[i])


def test_nifti_slices_round_trip_along_any_axis(tmp_path):
    volume = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = write_nifti(tmp_path / "vol.nii.gz", volume)
    sources = expand_source(path, axis=2)
    assert len(sources) == 7 and sources[3] == f"{path}#axis=2,slice=3"
    for k in (0, 3, 6):
        np.testing.assert_array_equal(read_raw(sources[k]).array, volume[:, :, k])
    np.testing.assert_array_equal(read_raw(f"{path}#axis=0,slice=4").array, volume[4])
    assert expand_source(path, axis=1, slice_range=(2, 4)) == [f"{path}#axis=1,slice={k}" for k in (2, 3)]
    unit, info = to_unit_range(read_raw(sources[0]), "auto")
    assert info["intensity"] == "percentile:1,99" and 0 < info["clipped_fraction"] < 0.1
    assert unit.min() == 0.0 and unit.max() == 1.0


def test_npz_images_by_split_and_index(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", train_images=images, train_labels=np.zeros((4, 1)))
    np.testing.assert_array_equal(read_raw(f"{tmp_path / 'tiny.npz'}#split=train,index=2").array, images[2])


def test_mask_binarisation_rules(tmp_path):
    antialiased = np.array([[0, 100, 128], [200, 255, 127]], dtype=np.uint8)
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "m.png", antialiased)), antialiased > 127)
    labels01 = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "l.png", labels01)), labels01 > 0)
    brats = np.zeros((3, 3, 2), dtype=np.uint8)
    brats[1, 1, 0], brats[2, 0, 1] = 4, 2  # label values of a NIfTI segmentation
    path = write_nifti(tmp_path / "seg.nii.gz", brats)
    np.testing.assert_array_equal(read_mask(f"{path}#axis=2,slice=1"), brats[:, :, 1] > 0)


@pytest.mark.parametrize("rule, expected", [
    ("minmax", lambda x: (x - 10) / 90),
    ("percentile:0,50", lambda x: np.clip((x - 10) / (np.percentile(np.arange(10, 101), 50) - 10), 0, 1)),
    ("window:50,20", lambda x: np.clip((x - 40) / 20, 0, 1)),
])
def test_intensity_rules(rule, expected):
    x = np.arange(10, 101, dtype=np.float64).reshape(7, 13)
    y, info = to_unit_range(RawImage(x, {"format": "tiff"}), rule)
    np.testing.assert_allclose(y, expected(x), atol=1e-6)
    assert info["intensity"] == str(parse_intensity(rule))


def test_intensity_rule_errors_are_config_errors():
    floats = RawImage(np.array([[0.0, 2.0]]), {"format": "tiff"})
    for bad in ("gamma", "window:1", "window:1,0", "percentile:90,10", "minmax:3", "window:a,b"):
        with pytest.raises(ConfigError, match="intensity rule"):
            parse_intensity(bad)
    with pytest.raises(ConfigError, match="'dtype' needs integer"):
        to_unit_range(floats, "dtype")
    with pytest.raises(ConfigError, match="'unit' needs values in"):
        to_unit_range(floats, "unit")
    with pytest.raises(ConfigError, match="WindowCenter"):
        to_unit_range(floats, "window")


def test_nonfinite_values_are_replaced_and_counted():
    x = np.array([[1.0, np.nan], [3.0, np.inf]])
    y, info = to_unit_range(RawImage(x, {"format": "nifti"}), "minmax")
    assert info["nonfinite_pixels"] == 2
    np.testing.assert_allclose(y, [[0.0, 0.0], [1.0, 0.0]])
