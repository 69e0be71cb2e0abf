"""Writers for miniature data trees: tiny PNGs, DICOMs, NIfTI volumes, npz files and CSVs built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_png(path: Path, array: np.ndarray) -> Path:
    """Save an array as an image file (format from the suffix); uint16 arrays become 16-bit grayscale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def noise_image(seed: int, shape=(12, 10), dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def write_images(folder: Path, names, shape=(12, 10), suffix=".png", seed=0) -> list[Path]:
    return [write_png(folder / f"{name}{suffix}", noise_image(seed + i, shape)) for i, name in enumerate(names)]


def write_mask(path: Path, shape=(12, 10), box=(2, 5, 3, 7)) -> Path:
    mask = np.zeros(shape, dtype=np.uint8)
    r0, r1, c0, c1 = box
    mask[r0:r1, c0:c1] = 255
    return write_png(path, mask)


def write_dicom(path: Path, pixels: np.ndarray, *, slope=None, intercept=None, window=None,
                photometric="MONOCHROME2", compressed_garbage=False) -> Path:
    """A minimal valid DICOM file (Secondary Capture) holding uint16 pixels: H x W or frames x H x W."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.asarray(pixels, dtype=np.uint16), photometric_interpretation=photometric, bits_stored=16)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if compressed_garbage:  # claims JPEG 2000, for which no decoder is installed
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(path))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA
