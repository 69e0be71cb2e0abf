"""Decode image files into raw numeric arrays, without changing their values.

Every reader returns a `RawImage`: the pixel array in its native dtype (uint16 stays 0..65535, a DICOM's
values are in modality units after RescaleSlope/Intercept) and a metadata dict. Mapping to [0, 1] is a
separate, named step (`aeflow.data.intensity`), so no value is scaled or clipped without saying so.

A *source* is a file path, optionally followed by `#key=value,...` naming one 2-D image inside it:
    scan.nii.gz#axis=2,slice=40     one slice of a NIfTI volume
    multi.dcm#frame=3               one frame of a multi-frame DICOM (also a page of a multi-page TIFF)
    pneumoniamnist.npz#split=train,index=12   one image of a MedMNIST file
    synthetic:phantom#seed=0,index=5,...      a generated phantom (see aeflow.data.synthetic)

A file whose own name holds a '#' (``hash#1.png``) is read as that file: the part after the last '#' is taken as
options only when the whole name is not an existing file.

Any failure to read a file becomes `BadFileError(path, reason)`; no library exception escapes. Every size a file
declares (pixels, frames, slices, pages, planes, decompressed bytes) is checked against the limits below and
against the file's own size BEFORE anything is allocated, so a header of a few hundred bytes cannot make a reader
allocate gigabytes or list a billion frames; a file over a limit is a `TooLargeError` (a BadFileError).

Channels, one policy for every format (`channel_policy`): 1 channel is gray; 3 are RGB (kept as gray when the
three are equal); a 4th channel or the 2nd of two is dropped only when the file says it is alpha (PNG RGBA/LA,
TIFF ExtraSamples, NIfTI RGBA32); any other channel count is refused with its reason. The rule applied is
recorded in `meta["channels"]`.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from aeflow.data.sources import SYNTHETIC_PREFIX, RawImage, join_source, split_source  # noqa: F401 (public)
from aeflow.data.synthetic import read_synthetic
from aeflow.errors import BadFileError, TooLargeError

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
#: Most 2-D images one file may hold: DICOM frames, NIfTI slices along one axis, TIFF pages, npz images per split.
MAX_FRAMES = 2**16
#: Most bytes one npz array may decompress to (checked from its header, before decompressing).
MAX_NPZ_BYTES = 2**32

# Options each format accepts after '#'.
_SOURCE_OPTIONS = {
    "dicom": {"frame"},
    "tiff": {"frame"},
    "nifti": {"axis", "slice"},
    "npz": {"split", "index"},
    "image": set(),
}


@dataclass(frozen=True)
class Limits:
    """What a reader checks a file's declared geometry against before it decodes anything: the pixel limit and,
    when the image is to be resized, the size it will be resized to (see `check_resize`)."""

    max_pixels: int = MAX_PIXELS
    resize_to: tuple[int, int] | None = None

    def check(self, path: str, height: int, width: int, *, count: int = 1, what: str = "image") -> None:
        _check_pixels(path, height * width * count, self.max_pixels, what)
        if self.resize_to is not None:
            check_resize(path, (height, width), self.resize_to, self.max_pixels)


def check_resize(source: str, size: tuple[int, int], target: tuple[int, int], max_pixels: int) -> None:
    """Refuse a resize whose intermediate would be too large, before the image is even decoded.

    Antialiased resizing works one axis at a time, so it holds a target-height x width (or height x target-width)
    array in between: a 1 x 100,000,000 image is under the pixel limit, but made 64 px high first it would be
    6.4e9 pixels. The larger of the two intermediates must stay under `max_pixels`.
    """
    (height, width), (to_height, to_width) = size, target
    intermediate = max(to_height * width, height * to_width)
    if intermediate > max_pixels:
        raise TooLargeError(split_source(source)[0], f"resizing {width}x{height} to {to_width}x{to_height} needs "
                                                     f"{intermediate} pixels in between, over the limit of "
                                                     f"{max_pixels} (aspect ratio too extreme)")


def file_kind(path: str | Path) -> str | None:
    """'image', 'tiff', 'dicom', 'nifti', 'npz', or None for files aeflow does not read."""
    name = str(path).lower()
    for kind, suffixes in (("image", PIL_SUFFIXES), ("tiff", TIFF_SUFFIXES), ("dicom", DICOM_SUFFIXES),
                           ("nifti", NIFTI_SUFFIXES), ("npz", NPZ_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def read_raw(source: str, *, max_pixels: int = MAX_PIXELS, resize_to: tuple[int, int] | None = None) -> RawImage:
    """Decode one 2-D image named by `source` (see the module docstring) into native-unit pixels.

    resize_to: the (height, width) the caller will resize the image to; an image whose resize would need an
    intermediate over `max_pixels` (see `check_resize`) is refused from its header, before it is decoded.
    """
    source = str(source)
    if source.startswith(SYNTHETIC_PREFIX):
        raw = read_synthetic(source)
    else:
        raw = _read_file(source, Limits(max_pixels, resize_to))
    raw.meta.setdefault("dtype", str(raw.array.dtype))
    return raw


def _read_file(source: str, limits: Limits) -> RawImage:
    path, options = split_source(source)
    kind = file_kind(path)
    if kind is None:
        raise BadFileError(path, f"unsupported file type (readable: {', '.join(READABLE_SUFFIXES + NPZ_SUFFIXES)})")
    unknown = set(options) - _SOURCE_OPTIONS[kind]
    if unknown:
        allowed = ", ".join(sorted(_SOURCE_OPTIONS[kind])) or "none"
        raise BadFileError(path, f"unknown option(s) {sorted(unknown)} after '#' for a {kind} file (allowed: {allowed})")
    if not os.path.isfile(path):
        raise BadFileError(path, "a link that leads nowhere (broken or looping)" if os.path.islink(path)
                           else "not a file" if os.path.exists(path) else "file not found")
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    reader = {"image": _read_pil, "tiff": _read_tiff, "dicom": _read_dicom, "nifti": _read_nifti, "npz": _read_npz}
    try:
        raw = reader[kind](path, options, limits)
    except BadFileError:
        raise
    except Exception as exc:  # any decoder failure on a user's file is reported as that file's problem
        raise BadFileError(path, f"cannot decode as {kind}: {type(exc).__name__}: {exc}") from exc
    if raw.array.size == 0 or raw.array.ndim != 2 and (raw.array.ndim != 3 or raw.array.shape[2] != 3):
        raise BadFileError(path, f"decoded to an array of shape {raw.array.shape}, not a 2-D gray or RGB image")
    if raw.array.dtype.kind not in "biuf":
        raise BadFileError(path, f"holds {raw.array.dtype} values, not numbers")
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
    (optionally only slices in [start, stop)), multi-frame DICOMs one per frame, other files themselves.

    The frame or slice count comes from the header and is checked (MAX_FRAMES, MAX_PIXELS, the file's size)
    before the list is built, so a header claiming a billion frames is a BadFileError, not a billion names.
    """
    path = str(path)
    kind = file_kind(path)
    if kind == "nifti":
        shape = _nifti_shape(path)
        if len(shape) == 2:
            return [path]
        if axis not in (0, 1, 2):
            raise BadFileError(path, f"slice axis must be 0, 1 or 2, got {axis}")
        start, stop = slice_range if slice_range is not None else (0, shape[axis])
        sources = [join_source(path, axis=axis, slice=i) for i in range(max(start, 0), min(stop, shape[axis]))]
        if not sources:
            raise BadFileError(path, f"no slices in {start}:{stop} (axis {axis} has {shape[axis]} slices)")
        return sources
    if kind == "dicom":
        frames = _dicom_frame_count(path)
        return [path] if frames == 1 else [join_source(path, frame=i) for i in range(frames)]
    return [path]


def _check_pixels(path: str, n_pixels: int, max_pixels: int, what: str = "image") -> None:
    if n_pixels > max_pixels:
        raise TooLargeError(path, f"{what} has {n_pixels} pixels, over the limit of {max_pixels} "
                                  f"(decompression-bomb guard; raise max_pixels to allow it)")


def _check_count(path: str, count: int, what: str) -> int:
    """A declared number of frames/slices/pages/images: a whole number in 1..MAX_FRAMES."""
    if count < 1:
        raise BadFileError(path, f"the header declares {count} {what}; there must be at least 1")
    if count > MAX_FRAMES:
        raise TooLargeError(path, f"the header declares {count} {what}, over the limit of {MAX_FRAMES}")
    return count


def _check_bytes(path: str, needed: int, what: str, *, ratio: int = 1) -> None:
    """Refuse a header whose declared data (`needed` bytes) cannot be in a file of this size (x `ratio` for
    compressed data: deflate expands at most about 1032-fold)."""
    size = os.path.getsize(path)
    if needed > size * ratio:
        raise BadFileError(path, f"the header declares {needed} bytes of {what}, but the file holds only {size} "
                                 f"bytes{' (compressed)' if ratio > 1 else ''}: truncated or forged header")


def channel_policy(path: str, array: np.ndarray, *, alpha: bool = False) -> tuple[np.ndarray, str]:
    """The one channel rule of every reader: H x W (gray) or H x W x 3 (RGB), and the rule applied.

    1 channel: gray. 3: RGB, kept as gray when the three channels are equal. 2 or 4 channels: gray or RGB plus
    alpha, the alpha dropped, only when the file marks the extra channel as alpha (`alpha=True`). Any other
    count is refused with the reason, so no file reaches a batch with a channel count it cannot be stacked with.
    """
    if array.ndim == 2:
        return array, "gray"
    if array.ndim != 3:
        raise BadFileError(path, f"decoded to an array of shape {array.shape}, not a 2-D image")
    count = array.shape[2]
    if count == 1:
        return array[..., 0], "gray"
    if count == 2 and alpha:
        return array[..., 0], "gray+alpha: alpha dropped"
    if count == 4 and alpha:
        array, rule = array[..., :3], "rgb+alpha: alpha dropped"
    elif count == 3:
        rule = "rgb"
    else:
        extra = " (the extra channel is not marked as alpha)" if count in (2, 4) else ""
        raise BadFileError(path, f"{count} channels per pixel{extra}: aeflow reads gray (1), RGB (3), or gray/RGB "
                                 "with an alpha channel (2/4); save the image as gray or RGB")
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        return array[..., 0], rule + ", equal channels kept as gray"
    return array, rule


# --- PNG / JPEG / BMP (Pillow) -------------------------------------------------------------------------------

#: Pillow modes -> (mode to convert to, whether the last channel is alpha). Modes not listed are refused.
_PIL_MODES = {
    "1": ("L", False), "L": (None, False), "I": (None, False), "F": (None, False),
    "I;16": (None, False), "I;16L": (None, False), "I;16B": (None, False), "I;16N": (None, False),
    "LA": (None, True), "La": ("LA", True), "PA": ("RGBA", True), "P": ("RGBA", True),
    "RGB": (None, False), "RGBA": (None, True), "RGBa": ("RGBA", True), "RGBX": ("RGB", False),
    "CMYK": ("RGB", False), "YCbCr": ("RGB", False), "LAB": ("RGB", False), "HSV": ("RGB", False),
}


def _read_pil(path: str, options: dict, limits: Limits) -> RawImage:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":  # checked here: Pillow gives up on some
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")  # huge headers
        limits.check(path, height, width)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as im:
                limits.check(path, im.height, im.width)
                if im.mode not in _PIL_MODES:
                    raise BadFileError(path, f"unsupported pixel mode {im.mode!r}")
                im.load()
                fmt = (im.format or Path(path).suffix.lstrip(".")).lower()
                mode = im.mode
                convert_to, alpha = _PIL_MODES[mode]
                if mode == "P" and "transparency" not in im.info:
                    convert_to, alpha = "RGB", False
                array = _pil_to_array(im if convert_to is None else im.convert(convert_to))
    except Image.DecompressionBombError as exc:
        raise TooLargeError(path, f"image too large, refused as a decompression bomb: {exc}") from exc
    array, rule = channel_policy(path, array, alpha=alpha)
    if convert_to is not None:
        rule = f"{mode}->{convert_to} (Pillow), {rule}"
    return RawImage(array, {"format": fmt, "mode": mode, "channels": rule})


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (im.mode == "I" and im.format == "PNG"):
        return np.asarray(im).astype(np.uint16)  # PNG holds at most 16 bits; native byte order, values untouched
    return np.asarray(im)


# --- TIFF (tifffile: 16-bit, float, planar and multi-page) ------------------------------------------------------


def _read_tiff(path: str, options: dict, limits: Limits) -> RawImage:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        n_pages = _check_count(path, len(tif.pages), "pages")
        frame = _int_option(path, options, "frame", 0)
        if not 0 <= frame < n_pages:
            raise BadFileError(path, f"page {frame} out of range (the file has {n_pages} page(s))")
        page = tif.pages[frame]
        if not isinstance(page, tifffile.TiffPage):
            page = page.aspage()
        # The page's own tags, whatever the storage (contiguous or planar): never the decoded array's shape.
        width, length, depth = int(page.imagewidth), int(page.imagelength), int(page.imagedepth or 1)
        samples = int(page.samplesperpixel or 1)
        limits.check(path, length, width, count=depth, what="image" if n_pages == 1 else f"page {frame}")
        if depth != 1:
            raise BadFileError(path, f"page {frame} is a 3-D block (depth {depth}); aeflow reads 2-D pages")
        if samples > 4:
            raise BadFileError(path, f"{samples} samples per pixel: aeflow reads gray (1), RGB (3), or gray/RGB "
                                     "with an alpha channel (2/4); save the image as gray or RGB")
        if page.dtype is None:
            raise BadFileError(path, f"unsupported sample format ({page.bitspersample} bits, "
                                     f"format {page.sampleformat})")
        if page.compression == 1:  # uncompressed: the strips must be in the file
            _check_bytes(path, width * length * samples * page.dtype.itemsize, "pixel data")
        alpha = samples in (2, 4) and bool(page.extrasamples) and page.extrasamples[-1] in (1, 2)
        array = page.asarray()
        axes = page.axes
    array = np.squeeze(array, axis=tuple(i for i, a in enumerate(axes) if a not in "YXS" and array.shape[i] == 1))
    axes = "".join(a for a in axes if a in "YXS")
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)  # planar (S, Y, X) or contiguous (Y, X, S)
    if array.ndim not in (2, 3) or array.shape[:2] != (length, width):
        raise BadFileError(path, f"page {frame} decoded to shape {array.shape}, not {length} x {width}")
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    array, rule = channel_policy(path, array, alpha=alpha)
    return RawImage(array, {"format": "tiff", "pages": n_pages, "frame": frame, "channels": rule,
                            "planar": int(page.planarconfig) == 2})


# --- DICOM (pydicom) ------------------------------------------------------------------------------------------------


def _dicom_geometry(path: str, ds) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples per pixel) from a DICOM header, each checked before any pixel is decoded:
    counts are whole numbers in range, the pixels under MAX_PIXELS, and uncompressed pixel data fits the file."""
    def number(tag: str, default: int | None = None) -> int:
        value = ds.get(tag, default)
        if value is None or value == "":
            if default is None:
                raise BadFileError(path, f"DICOM header lacks {tag}")
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise BadFileError(path, f"DICOM {tag} is {value!r}, not a whole number") from None

    frames = _check_count(path, number("NumberOfFrames", 1), "frames (NumberOfFrames)")
    rows, columns = number("Rows"), number("Columns")
    if rows < 1 or columns < 1:
        raise BadFileError(path, f"DICOM image of {rows} x {columns} pixels")
    samples = number("SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise BadFileError(path, f"SamplesPerPixel is {samples}: aeflow reads gray (1) or colour (3) DICOM images")
    bits = number("BitsAllocated", 16)
    if bits not in (1, 8, 16, 32, 64):
        raise BadFileError(path, f"BitsAllocated is {bits}: DICOM allows 1, 8, 16, 32 or 64")
    _check_pixels(path, rows * columns * frames, max_pixels=MAX_PIXELS, what="DICOM pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        _check_bytes(path, 8 * frames, "encapsulated frames (8 bytes each at least)")
    else:
        _check_bytes(path, (rows * columns * frames * samples * bits + 7) // 8, "pixel data")
    return frames, rows, columns, samples


def _read_dicom(path: str, options: dict, limits: Limits) -> RawImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise BadFileError(path, f"not a DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise BadFileError(path, "DICOM file has no pixel data")
    frames, rows, columns, _ = _dicom_geometry(path, ds)
    limits.check(path, rows, columns, count=frames, what="DICOM pixel data")
    frame = _int_option(path, options, "frame", 0)
    if not 0 <= frame < frames:
        raise BadFileError(path, f"frame {frame} out of range (the file has {frames} frame(s))")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = pixel_array(ds, index=frame if frames > 1 else None)  # decodes only the frame asked for
    except Exception as exc:
        if syntax is not None and syntax.is_compressed:
            raise BadFileError(path, f"unsupported transfer syntax {syntax.name} ({syntax}): no decoder installed "
                                     f"for this compression (pydicom: {type(exc).__name__})") from exc
        raise BadFileError(path, f"cannot decode DICOM pixel data: {type(exc).__name__}: {exc}") from exc
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
    elif photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        meta["palette"] = "applied"
    pixels, rule = channel_policy(path, np.asarray(pixels))
    meta["channels"] = rule
    return RawImage(pixels, meta)


def _dicom_frame_count(path: str) -> int:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise BadFileError(path, f"cannot read DICOM header: {type(exc).__name__}: {exc}") from exc
    try:
        return _dicom_geometry(path, ds)[0]
    except BadFileError:
        raise
    except Exception as exc:
        raise BadFileError(path, f"cannot read DICOM header: {type(exc).__name__}: {exc}") from exc


# --- NIfTI (nibabel) ------------------------------------------------------------------------------------------------

#: Structured NIfTI voxel types (RGB24, RGBA32) -> their colour fields, in order; the 4th, if any, is alpha.
_NIFTI_COLOUR_FIELDS = (("R", "G", "B"), ("R", "G", "B", "A"))


def _nifti_shape(path: str) -> tuple[int, ...]:
    """Spatial shape with trailing singleton dimensions dropped; 2-D or 3-D only, checked against MAX_PIXELS,
    MAX_FRAMES and the file's size before anything is read."""
    import nibabel

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadFileError(path, "file not found" if not os.path.isfile(path) else "empty file (0 bytes)")
    try:
        image = nibabel.load(path)
        shape = tuple(int(n) for n in image.shape)
        dtype = image.header.get_data_dtype()
        offset = int(image.header.get("vox_offset", 0) or 0)
    except Exception as exc:
        raise BadFileError(path, f"cannot read NIfTI header: {type(exc).__name__}: {exc}") from exc
    if any(n < 1 for n in shape):
        raise BadFileError(path, f"NIfTI image of shape {shape} holds no voxels")
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise BadFileError(path, f"NIfTI image of shape {shape}: only 2-D and 3-D volumes are supported")
    voxels = int(np.prod(shape, dtype=object))
    _check_pixels(path, voxels, MAX_PIXELS, what="NIfTI volume")
    for n in shape:
        _check_count(path, n, "slices along an axis")
    compressed = path.lower().endswith(".gz")
    _check_bytes(path, offset * (not compressed) + voxels * dtype.itemsize, "voxel data", ratio=1032 if compressed else 1)
    return shape


@functools.lru_cache(maxsize=2)
def _nifti_volume(path: str, mtime_ns: int) -> np.ndarray:
    """Whole volume in scaled units (scl_slope/inter applied); cached because slices are read one by one."""
    import nibabel

    return np.asarray(nibabel.load(path).dataobj)


def _read_nifti(path: str, options: dict, limits: Limits) -> RawImage:
    shape = _nifti_shape(path)
    meta = {"format": "nifti", "volume_shape": shape}
    if len(shape) == 2:
        limits.check(path, *shape)
        image = _nifti_volume(path, os.stat(path).st_mtime_ns).reshape(shape)
    else:
        if "slice" not in options:
            raise BadFileError(path, "a 3-D volume needs a slice: e.g. 'scan.nii.gz#axis=2,slice=40'")
        axis = _int_option(path, options, "axis", 2)
        index = _int_option(path, options, "slice", 0)
        if axis not in (0, 1, 2):
            raise BadFileError(path, f"slice axis must be 0, 1 or 2, got {axis}")
        if not 0 <= index < shape[axis]:
            raise BadFileError(path, f"slice {index} out of range (axis {axis} has {shape[axis]} slices)")
        _check_pixels(path, int(np.prod(shape)), limits.max_pixels, what="NIfTI volume")
        limits.check(path, *(n for i, n in enumerate(shape) if i != axis))
        meta.update(axis=axis, slice=index)
        volume = _nifti_volume(path, os.stat(path).st_mtime_ns).reshape(shape)
        image = np.take(volume, index, axis=axis)
    alpha = False
    if image.dtype.names is not None:  # RGB24 / RGBA32 voxels: a structured dtype, one field per colour
        fields = tuple(image.dtype.names)
        if fields not in _NIFTI_COLOUR_FIELDS:
            raise BadFileError(path, f"NIfTI voxels of structured type {image.dtype}: aeflow reads numbers, RGB24 "
                                     f"or RGBA32")
        image, alpha = np.stack([image[name] for name in fields], axis=-1), len(fields) == 4
    image, meta["channels"] = channel_policy(path, image, alpha=alpha)
    return RawImage(image, meta)


# --- MedMNIST .npz --------------------------------------------------------------------------------------------------


def _npz_header(path: str, key: str, *, images: bool) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an npz, read from its .npy header without decompressing the data;
    the declared bytes must match the archive's entry and stay under MAX_NPZ_BYTES."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if key not in names:
                raise BadFileError(path, f"no array '{key}' in the file (it holds: {', '.join(names) or 'none'})")
            info = archive.getinfo(f"{key}.npy")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise BadFileError(path, f"'{key}': unsupported .npy format version {version}")
                header = f.tell()
    except BadFileError:
        raise
    except Exception as exc:
        raise BadFileError(path, f"cannot read as npz: {type(exc).__name__}: {exc}") from exc
    if dtype.kind not in "biuf":
        raise BadFileError(path, f"'{key}' holds {dtype} values, not numbers")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_NPZ_BYTES:
        raise TooLargeError(path, f"'{key}' declares {nbytes} bytes, over the limit of {MAX_NPZ_BYTES}")
    if info.file_size != header + nbytes:
        raise BadFileError(path, f"'{key}' declares {nbytes} bytes of data, but its entry holds "
                                 f"{info.file_size - header}: truncated or forged")
    if images and len(shape) not in (3, 4):
        raise BadFileError(path, f"'{key}' has shape {shape}, not images N x H x W or N x H x W x C")
    if not images and len(shape) not in (1, 2):
        raise BadFileError(path, f"'{key}' has shape {shape}, not labels N or N x K")
    return shape, dtype


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    _npz_header(path, key, images=key.endswith("_images"))
    with np.load(path, allow_pickle=False) as npz:
        return npz[key]


def _read_npz(path: str, options: dict, limits: Limits) -> RawImage:
    split = options.get("split", "train")
    index = _int_option(path, options, "index", 0)
    key = f"{split}_images"
    shape, _ = _npz_header(path, key, images=True)  # checked before the (cached) array is decompressed
    if not 0 <= index < shape[0]:
        raise BadFileError(path, f"index {index} out of range ({key} holds {shape[0]} images)")
    limits.check(path, shape[1], shape[2])
    if len(shape) == 4 and shape[3] not in (1, 3):
        channel_policy(path, np.zeros((1, 1, shape[3]), np.uint8))  # refuses with the policy's reason
    images = _npz_array(path, key, os.stat(path).st_mtime_ns)
    image, rule = channel_policy(path, np.asarray(images[index]))
    return RawImage(image, {"format": "npz", "split": split, "index": index, "channels": rule})


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
