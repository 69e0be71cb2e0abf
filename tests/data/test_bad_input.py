"""Bad input gives aeflow's own errors naming the file and the reason, or is skipped and listed."""

import struct
import zlib

import numpy as np
import pytest
from conftest import noise_image, write_dicom, write_images, write_mask, write_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aeflow.data import load_data, read_raw
from aeflow.errors import AeflowError, BadFileError, ConfigError, DataError


def _mvtec(root, n_train=4):
    write_images(root / "train" / "good", [f"{i:03d}" for i in range(n_train)])
    write_images(root / "test" / "good", ["100", "101"], seed=50)
    write_images(root / "test" / "crack", ["200", "201"], seed=60)
    for stem in ("200", "201"):
        write_mask(root / "ground_truth" / "crack" / f"{stem}_mask.png")
    return root


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (no pixel data), as a decompression bomb would."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_truncated_png_names_file_and_reason(tmp_path):
    path = write_png(tmp_path / "scan.png", noise_image(0, (64, 64)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadFileError, match=r"scan\.png: cannot decode as image: .*(truncated|broken)") as info:
        read_raw(path)
    assert info.value.path == str(path)


def test_zero_byte_and_undecodable_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadFileError, match=r"empty\.png: empty file \(0 bytes\)"):
        read_raw(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("this is text, not an image")
    with pytest.raises(BadFileError, match=r"notes\.png: cannot decode as image: UnidentifiedImageError"):
        read_raw(tmp_path / "notes.png")
    with pytest.raises(BadFileError, match=r"readme\.txt: unsupported file type"):
        read_raw(tmp_path / "readme.txt")


def test_non_image_files_in_image_folders_are_ignored(tmp_path):
    root = _mvtec(tmp_path)
    (root / "train" / "good" / "notes.txt").write_text("hello")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "test" / "crack" / "Thumbs.db").write_bytes(b"\0")
    data = load_data("mvtec", root, image_size=8)
    assert len(data.train) + len(data.val) == 4 and len(data.test) == 4 and data.skipped == []


def test_unsupported_dicom_transfer_syntax(tmp_path):
    path = write_dicom(tmp_path / "jp2.dcm", np.zeros((4, 4)), compressed_garbage=True)
    with pytest.raises(BadFileError, match=r"jp2\.dcm: unsupported transfer syntax JPEG 2000.*no decoder installed"):
        read_raw(path)


def test_file_that_is_not_dicom(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(BadFileError, match=r"x\.dcm: not a DICOM file"):
        read_raw(tmp_path / "x.dcm")


def test_mask_with_a_different_size_is_reported_at_load(tmp_path):
    root = _mvtec(tmp_path)
    write_mask(root / "ground_truth" / "crack" / "201_mask.png", shape=(9, 9))
    with pytest.raises(BadFileError, match=r"201_mask\.png: mask size 9x9 differs from its image's 10x12"):
        load_data("mvtec", root, image_size=8)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="data root does not exist"):
        load_data("mvtec", tmp_path / "nowhere")
    root = _mvtec(tmp_path / "cat")
    for f in (root / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/good: no image files"):
        load_data("mvtec", root)
    (root / "train" / "good").rmdir()
    with pytest.raises(DataError, match=r"train/good: expected folder is missing"):
        load_data("mvtec", root)


def test_pixel_limit_is_configurable_and_pil_bombs_become_our_error(tmp_path):
    path = write_png(tmp_path / "big.png", noise_image(0, (30, 40)))
    assert read_raw(path, max_pixels=1200).array.shape == (30, 40)
    with pytest.raises(BadFileError, match=r"big\.png: image has 1200 pixels, over the limit of 1199"):
        read_raw(path, max_pixels=1199)
    bomb = _png_header_only(tmp_path / "bomb.png", 40000, 40000)  # 1.6e9 pixels: PIL refuses it itself
    with pytest.raises(BadFileError, match=r"bomb\.png: image too large, refused as a decompression bomb: .*1600000000"):
        read_raw(bomb, max_pixels=2**40)
    tiff_bomb = tmp_path / "bomb.tif"
    import tifffile
    tifffile.imwrite(tiff_bomb, np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(BadFileError, match=r"bomb\.tif: image has 4096 pixels, over the limit of 4000"):
        read_raw(tiff_bomb, max_pixels=4000)


def test_skip_bad_collects_files_and_goes_on(tmp_path):
    root = _mvtec(tmp_path, n_train=6)
    (root / "train" / "good" / "003.png").write_bytes(b"")
    (root / "test" / "crack" / "200.png").write_bytes(b"garbage")
    with pytest.raises(BadFileError, match=r"003\.png: empty file"):
        load_data("mvtec", root, image_size=8)
    data = load_data("mvtec", root, image_size=8, skip_bad=True)
    skipped = dict(data.skipped)
    assert set(skipped) == {str(root / "train" / "good" / "003.png"), str(root / "test" / "crack" / "200.png")}
    assert "empty file" in skipped[str(root / "train" / "good" / "003.png")]
    assert len(data.train) + len(data.val) == 5 and len(data.test) == 3
    assert "skipped: 2 file(s)" in data.describe() and "003.png: empty file" in data.describe()
    assert all(sample.image.shape == (1, 8, 8) for sample in data.test)


def test_missing_mvtec_mask_is_a_bad_file(tmp_path):
    root = _mvtec(tmp_path)
    (root / "ground_truth" / "crack" / "201_mask.png").unlink()
    with pytest.raises(BadFileError, match=r"201\.png: no mask for it in ground_truth/crack/ \(expected 201_mask"):
        load_data("mvtec", root)
    assert [r.source.endswith("200.png") for r in load_data("mvtec", root, skip_bad=True).records.test
            if r.label == 1] == [True]


def test_bad_options_are_config_errors_naming_them(tmp_path):
    with pytest.raises(ConfigError, match=r"layout 'synthetic' has no option 'n_trian'; its options are: n_train"):
        load_data("synthetic", n_trian=3)
    with pytest.raises(ConfigError, match=r"unknown data layout 'mvtech'; available: .*mvtec"):
        load_data("mvtech", tmp_path)
    with pytest.raises(ConfigError, match=r"option 'val_fraction' must be in \[0, 1\)"):
        load_data("mvtec", _mvtec(tmp_path), val_fraction=1.5)
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        load_data("synthetic", channels=2)
    with pytest.raises(ConfigError, match="image_size must be"):
        load_data("synthetic", image_size=(0, 4))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=600),
       suffix=st.sampled_from([".png", ".dcm", ".nii", ".nii.gz", ".tif", ".jpg", ".bmp", ".npz"]))
def test_random_bytes_give_only_aeflow_errors(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    try:
        read_raw(f"{path}#split=train,index=0" if suffix == ".npz" else path)
    except AeflowError:
        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=400), suffix=st.sampled_from([".png", ".dcm", ".tif"]))
def test_truncated_valid_files_give_only_aeflow_errors(tmp_path, cut, suffix):
    """Random bytes rarely look like a header; cutting a real file does, and reaches deeper into decoders."""
    path = tmp_path / f"cut{suffix}"
    if suffix == ".dcm":
        write_dicom(path, np.arange(100).reshape(10, 10))
    elif suffix == ".tif":
        import tifffile
        tifffile.imwrite(path, np.arange(100, dtype=np.uint16).reshape(10, 10))
    else:
        write_png(path, noise_image(0, (10, 10)))
    path.write_bytes(path.read_bytes()[:cut])
    try:
        read_raw(path)
    except AeflowError:
        pass
