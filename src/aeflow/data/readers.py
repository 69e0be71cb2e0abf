"""Decode image files into raw numeric arrays, without changing their values.

Every reader returns a `RawImage`: the pixel array in its native dtype (uint16 stays 0..65535, a DICOM's
values are in modality units after RescaleSlope/Intercept) and a metadata dict. Mapping to [0, 1] is a
separate, named step (`aeflow.data.intensity`), so no value is scaled or clipped without saying so.

A *source* is a file path, optionally followed by `#key=value,...` naming one 2-D image inside it:
    scan.nii.gz#axis=2,slice=40     one slice of a NIfTI volume
    multi.dcm#frame=3               one frame of a multi-frame DICOM (also a page of a multi-page TIFF)
    pneumoniamnist.npz#split=train,index=12   one image of a MedMNIST file
    synthetic:phantom#seed=0,index=5,...      a generated phantom (see aeflow.data.synthetic)

Any failure to read a file becomes `BadFileError(path, reason)`; no library exception escapes.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from aeflow.errors import BadFileError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPZ_SUFFIXES = (".npz",)
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES
#: Files with these endings are read; anything else in an image folder (.txt, .DS_Store, ...) is ignored.
READABLE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES

#: Largest image (pixels per 2-D image; voxels per volume) decoded before it is called a decompression bomb.
#: For PNG/JPEG/BMP, Pillow's own guard (2 x PIL.Image.MAX_IMAGE_PIXELS, about 1.8e8) also applies; both
#: become BadFileError.
MAX_PIXELS = 2**28

SYNTHETIC_PREFIX = "synthetic:"

# Options each format accepts after '#'.
_SOURCE_OPTIONS = {
    "dicom": {"frame"},
    "tiff": {"frame"},
    "nifti": {"axis", "slice"},
    "npz": {"split", "index"},
    "image": set(),
}


@dataclass
class RawImage:
    """Decoded pixels in native units: H x W, or H x W x 3 for colour (alpha is dropped)."""

    array: np.ndarray
    meta: dict = field(default_factory=dict)


def split_source(source: str) -> tuple[str, dict[str, str]]:
    """'file.nii.gz#axis=2,slice=4' -> ('file.nii.gz', {'axis': '2', 'slice': '4'})."""
    path, sep, fragment = str(source).partition("#")
    if not sep:
        return path, {}
    options = {}
    for item in filter(None, fragment.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise BadFileError(path, f"cannot parse '#{fragment}': expected key=value pairs")
        options[key.strip()] = value.strip()
    return path, options


def join_source(path: str | Path, **options) -> str:
    """Inverse of split_source."""
    if not options:
        return str(path)
    return f"{path}#" + ",".join(f"{k}={v}" for k, v in options.items())


def file_kind(path: str | Path) -> str | None:
    """'image', 'tiff', 'dicom', 'nifti', 'npz', or None for files aeflow does not read."""
    name = str(path).lower()
    for kind, suffixes in (("image", PIL_SUFFIXES), ("tiff", TIFF_SUFFIXES), ("dicom", DICOM_SUFFIXES),
                           ("nifti", NIFTI_SUFFIXES), ("npz", NPZ_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def read_raw(source: str, *, max_pixels: int = MAX_PIXELS) -> RawImage:
    """Decode one 2-D image named by `source` (see the module docstring) into native-unit pixels."""
    source = str(source)
    if source.startswith(SYNTHETIC_PREFIX):
        from aeflow.data.synthetic import read_synthetic  # deferred: synthetic imports this module

        raw = read_synthetic(source)
    else:
        raw = _read_file(source, max_pixels)
    raw.meta.setdefault("dtype", str(raw.array.dtype))
    return raw


def _read_file(source: str, max_pixels: int) -> RawImage:
    path, options = split_source(source)
    kind = file_kind(path)
    if kind is None:
        raise BadFileError(path, f"unsupported file type (readable: {', '.join(READABLE_SUFFIXES + NPZ_SUFFIXES)})")
    unknown = set(options) - _SOURCE_OPTIONS[kind]
    if unknown:
        allowed = ", ".join(sorted(_SOURCE_OPTIONS[kind])) or "none"
        raise BadFileError(path, f"unknown option(s) {sorted(unknown)} after '#' for a {kind} file (allowed: {allowed})")
    if not os.path.isfile(path):
        raise BadFileError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    reader = {"image": _read_pil, "tiff": _read_tiff, "dicom": _read_dicom, "nifti": _read_nifti, "npz": _read_npz}
    try:
        raw = reader[kind](path, options, max_pixels)
    except BadFileError:
        raise
    except Exception as exc:  # any decoder failure on a user's file is reported as that file's problem
        raise BadFileError(path, f"cannot decode as {kind}: {type(exc).__name__}: {exc}") from exc
    if raw.array.ndim not in (2, 3) or raw.array.size == 0:
        raise BadFileError(path, f"decoded to an array of shape {raw.array.shape}, not a 2-D image")
    return raw


def read_mask(source: str, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A boolean H x W mask.

    Rule: 8/16-bit image files are binarised at half the dtype range (> 127 for 8-bit), which removes
    anti-aliased edge pixels; masks whose values are only 0/1, and label maps from DICOM/NIfTI/npz
    (e.g. BraTS labels 1, 2, 4), are binarised at > 0. Colour masks count a pixel if any channel does.
    """
    raw = read_raw(source, max_pixels=max_pixels)
    values = raw.array if raw.array.ndim == 2 else raw.array.max(axis=2)
    from_image_file = raw.meta.get("format") in ("png", "jpeg", "bmp", "tiff")
    if from_image_file and values.dtype in (np.uint8, np.uint16) and values.max() > 1:
        return values > np.iinfo(values.dtype).max // 2
    return values > 0


def expand_source(path: str | Path, *, axis: int = 2, slice_range: tuple[int, int] | None = None) -> list[str]:
    """One source per 2-D image in a file: NIfTI volumes give one per slice along `axis`
    (optionally only slices in [start, stop)), multi-frame DICOMs one per frame, other files themselves."""
    path = str(path)
    kind = file_kind(path)
    if kind == "nifti":
        shape = _nifti_shape(path)
        if len(shape) == 2:
            return [path]
        if axis not in (0, 1, 2):
            raise BadFileError(path, f"slice axis must be 0, 1 or 2, got {axis}")
        start, stop = slice_range if slice_range is not None else (0, shape[axis])
        return [join_source(path, axis=axis, slice=i) for i in range(max(start, 0), min(stop, shape[axis]))]
    if kind == "dicom":
        frames = _dicom_frame_count(path)
        return [path] if frames == 1 else [join_source(path, frame=i) for i in range(frames)]
    return [path]


# --- PNG / JPEG / BMP (Pillow) -------------------------------------------------------------------------------


def _check_pixels(path: str, n_pixels: int, max_pixels: int, what: str = "image") -> None:
    if n_pixels > max_pixels:
        raise BadFileError(path, f"{what} has {n_pixels} pixels, over the limit of {max_pixels} "
                                 f"(decompression-bomb guard; raise max_pixels to allow it)")


def _read_pil(path: str, options: dict, max_pixels: int) -> RawImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as im:
                _check_pixels(path, im.width * im.height, max_pixels)
                im.load()
                fmt = (im.format or Path(path).suffix.lstrip(".")).lower()
                mode = im.mode
                array = _pil_to_array(im)
    except Image.DecompressionBombError as exc:
        raise BadFileError(path, f"image too large, refused as a decompression bomb: {exc}") from exc
    return RawImage(array, {"format": fmt, "mode": mode})


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (im.mode == "I" and im.format == "PNG"):
        return np.asarray(im).astype(np.uint16)  # PNG holds at most 16 bits; native byte order, values untouched
    if im.mode in ("L", "I", "F"):
        return np.asarray(im)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    if im.mode == "LA":
        return np.asarray(im)[..., 0]
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return _collapse_gray(rgb)


def _collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """Grayscale saved as RGB (three equal channels) is kept single-channel."""
    if rgb.ndim == 3 and rgb.shape[2] >= 3:
        rgb = rgb[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
    return rgb


# --- TIFF (tifffile: 16-bit, float and multi-page) ----------------------------------------------------------------


def _read_tiff(path: str, options: dict, max_pixels: int) -> RawImage:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        n_pages = len(tif.pages)
        frame = _int_option(path, options, "frame", 0)
        if not 0 <= frame < n_pages:
            raise BadFileError(path, f"page {frame} out of range (the file has {n_pages} page(s))")
        page = tif.pages[frame]
        _check_pixels(path, int(np.prod(page.shape[:2])) if page.shape else 0, max_pixels)
        array = page.asarray()
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, 2)  # planar (C, H, W) storage
    array = np.squeeze(array) if array.ndim == 3 and 1 in (array.shape[0], array.shape[2]) else array
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return RawImage(_collapse_gray(array), {"format": "tiff", "pages": n_pages, "frame": frame})


# --- DICOM (pydicom) ------------------------------------------------------------------------------------------------


def _read_dicom(path: str, options: dict, max_pixels: int) -> RawImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise BadFileError(path, f"not a DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise BadFileError(path, "DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixels(path, int(ds.Rows) * int(ds.Columns) * frames, max_pixels, what="DICOM pixel data")
    frame = _int_option(path, options, "frame", 0)
    if not 0 <= frame < frames:
        raise BadFileError(path, f"frame {frame} out of range (the file has {frames} frame(s))")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        if syntax is not None and syntax.is_compressed:
            raise BadFileError(path, f"unsupported transfer syntax {syntax.name} ({syntax}): no decoder installed "
                                     f"for this compression (pydicom: {type(exc).__name__})") from exc
        raise BadFileError(path, f"cannot decode DICOM pixel data: {type(exc).__name__}: {exc}") from exc
    if frames > 1:
        pixels = pixels[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    meta = {"format": "dicom", "transfer_syntax": str(syntax), "photometric": photometric,
            "frames": frames, "frame": frame, "stored_dtype": str(pixels.dtype)}
    if photometric.startswith("MONOCHROME"):
        meta["rescale_slope"] = float(ds.get("RescaleSlope", 1) or 1)
        meta["rescale_intercept"] = float(ds.get("RescaleIntercept", 0) or 0)
        pixels = apply_modality_lut(pixels, ds)
        for tag, key in (("WindowCenter", "window_center"), ("WindowWidth", "window_width")):
            value = ds.get(tag)
            if value is not None:
                meta[key] = float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    return RawImage(np.asarray(pixels), meta)


def _dicom_frame_count(path: str) -> int:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise BadFileError(path, f"cannot read DICOM header: {type(exc).__name__}: {exc}") from exc


# --- NIfTI (nibabel) ------------------------------------------------------------------------------------------------


def _nifti_shape(path: str) -> tuple[int, ...]:
    """Spatial shape with trailing singleton dimensions dropped; 2-D or 3-D only."""
    import nibabel

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadFileError(path, "file not found" if not os.path.isfile(path) else "empty file (0 bytes)")
    try:
        shape = tuple(nibabel.load(path).shape)
    except Exception as exc:
        raise BadFileError(path, f"cannot read NIfTI header: {type(exc).__name__}: {exc}") from exc
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise BadFileError(path, f"NIfTI image of shape {shape}: only 2-D and 3-D volumes are supported")
    return shape


@functools.lru_cache(maxsize=2)
def _nifti_volume(path: str, mtime_ns: int) -> np.ndarray:
    """Whole volume in scaled units (scl_slope/inter applied); cached because slices are read one by one."""
    import nibabel

    return np.asarray(nibabel.load(path).dataobj)


def _read_nifti(path: str, options: dict, max_pixels: int) -> RawImage:
    shape = _nifti_shape(path)
    _check_pixels(path, int(np.prod(shape)), max_pixels, what="NIfTI volume")
    volume = _nifti_volume(path, os.stat(path).st_mtime_ns).reshape(shape)
    meta = {"format": "nifti", "volume_shape": shape}
    if len(shape) == 2:
        return RawImage(volume, meta)
    if "slice" not in options:
        raise BadFileError(path, "a 3-D volume needs a slice: e.g. 'scan.nii.gz#axis=2,slice=40'")
    axis = _int_option(path, options, "axis", 2)
    index = _int_option(path, options, "slice", 0)
    if axis not in (0, 1, 2):
        raise BadFileError(path, f"slice axis must be 0, 1 or 2, got {axis}")
    if not 0 <= index < shape[axis]:
        raise BadFileError(path, f"slice {index} out of range (axis {axis} has {shape[axis]} slices)")
    meta.update(axis=axis, slice=index)
    return RawImage(np.take(volume, index, axis=axis), meta)


# --- MedMNIST .npz --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        if key not in npz.files:
            raise BadFileError(path, f"no array '{key}' in the file (it holds: {', '.join(npz.files)})")
        return npz[key]


def _read_npz(path: str, options: dict, max_pixels: int) -> RawImage:
    split = options.get("split", "train")
    index = _int_option(path, options, "index", 0)
    images = _npz_array(path, f"{split}_images", os.stat(path).st_mtime_ns)
    if not 0 <= index < len(images):
        raise BadFileError(path, f"index {index} out of range ({split}_images holds {len(images)} images)")
    _check_pixels(path, int(np.prod(images.shape[1:3])), max_pixels)
    return RawImage(np.asarray(images[index]), {"format": "npz", "split": split, "index": index})


def npz_labels(path: str | Path, split: str) -> np.ndarray:
    """Integer labels of one split of a MedMNIST file, shape (N,) or (N, K) for multi-label files."""
    path = str(path)
    try:
        labels = _npz_array(path, f"{split}_labels", os.stat(path).st_mtime_ns)
    except BadFileError:
        raise
    except Exception as exc:
        raise BadFileError(path, f"cannot read as npz: {type(exc).__name__}: {exc}") from exc
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels


def _int_option(path: str, options: dict, key: str, default: int) -> int:
    try:
        return int(options.get(key, default))
    except ValueError:
        raise BadFileError(path, f"option '{key}={options[key]}' after '#' is not an integer") from None
