"""A corpus of malformed (and a few valid) image files, written on demand into a folder: never committed as files.

`build_corpus(folder, mutants_per_seed=N, seed=S)` writes
  - seed files: valid PNG (8/16-bit, gray, LA, RGBA, palette), JPEG, BMP, TIFF (1/2/3/4/5 channels, planar,
    multi-page, float32/float16/uint16), DICOM (mono, multi-frame, RGB, MONOCHROME1), NIfTI-1/2 (3-D, .nii.gz,
    RGB24), MedMNIST npz;
  - crafted cases, one per known way to break a reader: headers declaring huge sizes (NumberOfFrames=999999999,
    NIfTI dims of 1e9 or 32767^3, PNG 1 x 100,000,000), negative or zero counts, 2/5-channel TIFF and npz, planar
    TIFF pages over the pixel limit, npz of strings or declaring gigabytes, odd DICOM BitsAllocated and
    SamplesPerPixel, compressed DICOM with no decoder, truncated files of every kind, names with spaces, unicode,
    '#' and newlines, and a symlink loop;
  - N byte-level mutants of every seed file (truncations, bit flips, overwritten header bytes, inserted and
    deleted runs), drawn with `seed`.

It is shared by the tests (a small subset, `make test`) and `benchmarks/fuzz.py` (the whole corpus).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# --- writers of valid files -------------------------------------------------------------------------------------


def _noise(seed: int, shape, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def _dicom_bytes(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **tags) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("corpus.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    bits = pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_with(pixels: np.ndarray, edit) -> bytes:
    """A DICOM whose dataset `edit(ds)` changed after the pixels were set (to forge headers)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes(pixels)))
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def _tiff_pages(pages: list[tuple[np.ndarray, dict]]) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for array, kwargs in pages:
            tif.write(array, **kwargs)
    return buffer.getvalue()


def _pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _nifti_bytes(volume: np.ndarray, *, version: int = 1) -> bytes:
    import nibabel

    cls = nibabel.Nifti1Image if version == 1 else nibabel.Nifti2Image
    image = cls(volume, np.eye(4))
    return image.to_bytes()


def _nifti_forged(*, version: int, dims: tuple[int, ...], datatype: int = 2, bitpix: int = 8,
                  payload: bytes = b"\0" * 64) -> bytes:
    """A NIfTI header claiming `dims`, written by hand (nibabel refuses to write such headers)."""
    if version == 1:
        header = bytearray(348)
        struct.pack_into("<i", header, 0, 348)
        dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
        struct.pack_into("<8h", header, 40, *dim)
        struct.pack_into("<hh", header, 70, datatype, bitpix)
        struct.pack_into("<8f", header, 76, *([1.0] * 8))
        struct.pack_into("<f", header, 108, 352.0)
        header[344:348] = b"n+1\0"
        return bytes(header) + b"\0" * 4 + payload
    header = bytearray(540)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<hh", header, 12, datatype, bitpix)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8q", header, 16, *dim)
    struct.pack_into("<8d", header, 104, *([1.0] * 8))
    struct.pack_into("<q", header, 168, 544)
    return bytes(header) + b"\0" * 4 + payload


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _npz_forged_header(key: str, shape: tuple[int, ...], dtype: str = "|u1", data: bytes = b"") -> bytes:
    """An npz whose entry declares `shape` in its .npy header but holds `data` (deflated)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{key}.npy", npy)
    return buffer.getvalue()


def _png_header(width: int, height: int, *, bit_depth: int = 8, colour: int = 0, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def _long_thin_png(width: int) -> bytes:
    """A real 1 x `width` 8-bit gray PNG (the pixel data compresses to almost nothing)."""
    row = b"\0" + b"\x80" * width
    return _png_header(width, 1, idat=zlib.compress(row, 9))


# --- the corpus ---------------------------------------------------------------------------------------------------


def seed_files() -> dict[str, bytes]:
    """Valid files of every format and flavour the readers take: the starting points of the mutants."""
    gray8, gray16 = _noise(1, (24, 20)), _noise(2, (24, 20), np.uint16)
    rgb = _noise(3, (24, 20, 3))
    return {
        "gray8.png": _pil_bytes(gray8, "PNG"),
        "gray16.png": _pil_bytes(gray16, "PNG"),
        "rgb.png": _pil_bytes(rgb, "PNG"),
        "rgba.png": _pil_bytes(_noise(4, (24, 20, 4)), "PNG"),
        "la.png": _pil_bytes(gray8, "PNG", mode="LA"),
        "palette.png": _pil_bytes(rgb, "PNG", mode="P"),
        "gray.jpg": _pil_bytes(gray8, "JPEG"),
        "rgb.jpeg": _pil_bytes(rgb, "JPEG"),
        "gray.bmp": _pil_bytes(gray8, "BMP"),
        "rgb.bmp": _pil_bytes(rgb, "BMP"),
        "gray16.tif": _tiff_bytes(gray16),
        "float32.tif": _tiff_bytes(_noise(5, (24, 20), np.float32)),
        "float16.tif": _tiff_bytes(_noise(6, (24, 20), np.float16)),
        "rgb.tif": _tiff_bytes(rgb, photometric="rgb"),
        "rgb_planar.tif": _tiff_bytes(np.moveaxis(rgb, 2, 0).copy(), photometric="rgb", planarconfig="separate"),
        "rgba.tif": _tiff_bytes(_noise(7, (24, 20, 4)), photometric="rgb", extrasamples=["unassalpha"]),
        "two_channel_alpha.tif": _tiff_bytes(_noise(8, (24, 20, 2)), photometric="minisblack", planarconfig="contig",
                                             extrasamples=["unassalpha"]),
        "multipage.tif": _tiff_pages([(gray8, {}), (gray8[::-1].copy(), {})]),
        "deflate.tif": _tiff_bytes(gray16, compression="zlib"),
        "mono.dcm": _dicom_bytes(gray16, WindowCenter=30000, WindowWidth=20000),
        "multiframe.dcm": _dicom_bytes(_noise(9, (3, 24, 20), np.uint16)),
        "mono1.dcm": _dicom_bytes(gray16, photometric="MONOCHROME1"),
        "rgb.dcm": _dicom_bytes(rgb, photometric="RGB"),
        "gray8.dcm": _dicom_bytes(gray8),
        "volume.nii": _nifti_bytes(_noise(10, (20, 24, 3), np.int16)),
        "volume.nii.gz": gzip.compress(_nifti_bytes(_noise(11, (20, 24, 3), np.float32))),
        "volume2.nii": _nifti_bytes(_noise(12, (20, 24, 2), np.uint8), version=2),
        "slice2d.nii": _nifti_bytes(_noise(13, (20, 24), np.float32)),
        "medmnist.npz": _npz_bytes(train_images=_noise(14, (3, 28, 28)), train_labels=np.zeros((3, 1), np.uint8)),
    }


#: Crafted files that are odd but valid: they must be read (names with '#', spaces, newlines, unicode; colour
#: NIfTI; planar and multi-page TIFF under the limits; highly compressed but honest sizes). Every other crafted
#: file must be refused with its reason.
VALID_CRAFTED = frozenset({
    "name with spaces.png", "ünïcødé_名前.png", "hash#frame=1.png", "hash#1.dcm", "new\nline.png",
    "comma,and;semicolon.tif", "nifti1_rgb24.nii", "nifti1_rgba32.nii", "planar_3x1200x1200.tif",
    "small_page0_planar_page1.tif", "zeros_deflated.png", "declares_megabyte_but_deflate.nii.gz",
    "tiff_ifd_loop.tif",  # its one page is read; the loop back to it is not followed
})


def crafted_files() -> dict[str, bytes]:
    """One file per known way to break a reader (see the module docstring)."""
    gray8, gray16 = _noise(20, (24, 20)), _noise(21, (24, 20), np.uint16)
    rgb24 = np.zeros((20, 24, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgba32 = np.zeros((20, 24, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    big_zeros = zlib.compress(b"\0" * (1 << 20), 9)  # a megabyte of zeros, ~1 KB deflated

    def frames(value):
        def edit(ds):
            ds.NumberOfFrames = value
        return edit

    def tag(name, value):
        def edit(ds):
            setattr(ds, name, value)
        return edit

    def delete(name):
        def edit(ds):
            delattr(ds, name)
        return edit

    def garbage_syntax(uid):
        def edit(ds):
            from pydicom.encaps import encapsulate

            ds.file_meta.TransferSyntaxUID = uid
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
            ds["PixelData"].VR = "OB"
        return edit

    files = {
        # hangs: sizes declared by headers
        "frames_999999999.dcm": _dicom_with(gray16, frames(999999999)),
        "frames_minus3.dcm": _dicom_with(gray16, frames(-3)),
        "frames_zero.dcm": _dicom_with(gray16, frames(0)),
        "frames_100000.dcm": _dicom_with(gray16, frames(100000)),
        "frames_2_data_for_1.dcm": _dicom_with(gray16, frames(2)),
        "rows_huge.dcm": _dicom_with(gray16, tag("Rows", 65535)),
        "rows_zero.dcm": _dicom_with(gray16, tag("Rows", 0)),
        "no_rows.dcm": _dicom_with(gray16, delete("Rows")),
        "no_pixels.dcm": _dicom_with(gray16, delete("PixelData")),
        "bits_12.dcm": _dicom_with(gray16, tag("BitsAllocated", 12)),
        "bits_0.dcm": _dicom_with(gray16, tag("BitsAllocated", 0)),
        "bits_1.dcm": _dicom_with(gray16, tag("BitsAllocated", 1)),
        "samples_2.dcm": _dicom_with(gray16, tag("SamplesPerPixel", 2)),
        "samples_4.dcm": _dicom_with(gray16, tag("SamplesPerPixel", 4)),
        "palette_no_lut.dcm": _dicom_with(gray8.astype(np.uint16), tag("PhotometricInterpretation", "PALETTE COLOR")),
        "jpeg2000_garbage.dcm": _dicom_with(gray16, garbage_syntax("1.2.840.10008.1.2.4.90")),
        "jpeg_baseline_garbage.dcm": _dicom_with(gray16, garbage_syntax("1.2.840.10008.1.2.4.50")),
        "rle_garbage.dcm": _dicom_with(gray16, garbage_syntax("1.2.840.10008.1.2.5")),
        "no_preamble.dcm": _dicom_bytes(gray16)[132:],
        "dicm_only.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00",
        "nifti2_1x1x1e9.nii": _nifti_forged(version=2, dims=(1, 1, 10**9)),
        "nifti1_32767_cubed.nii": _nifti_forged(version=1, dims=(32767, 32767, 32767)),
        "nifti1_100000_slices_of_1.nii": _nifti_forged(version=1, dims=(1, 1, 30000)),
        "nifti1_zero_slices.nii": _nifti_forged(version=1, dims=(20, 24, 0)),
        "nifti1_negative.nii": _nifti_forged(version=1, dims=(20, -24, 3)),
        "nifti1_4d.nii": _nifti_bytes(_noise(22, (8, 8, 2, 3), np.uint8)),
        "nifti1_rgb24.nii": _nifti_bytes(rgb24),
        "nifti1_rgba32.nii": _nifti_bytes(rgba32),
        "nifti1_complex.nii": _nifti_forged(version=1, dims=(4, 4, 2), datatype=32, bitpix=64, payload=b"\0" * 256),
        "nifti1_truncated.nii": _nifti_bytes(_noise(23, (20, 24, 3), np.int16))[:600],
        "nifti1_truncated.nii.gz": gzip.compress(_nifti_bytes(_noise(24, (20, 24, 3), np.int16)))[:300],
        "nifti_gz_not_gzip.nii.gz": b"not gzip at all" * 10,
        # channel counts
        "two_channel.tif": _tiff_bytes(_noise(25, (24, 20, 2)), photometric="minisblack", planarconfig="contig"),
        "five_channel.tif": _tiff_bytes(_noise(26, (24, 20, 5)), photometric="minisblack", planarconfig="contig"),
        "five_planar.tif": _tiff_bytes(_noise(27, (5, 24, 96)), photometric="minisblack", planarconfig="separate"),
        "four_no_alpha.tif": _tiff_bytes(_noise(28, (24, 20, 4)), photometric="minisblack", planarconfig="contig"),
        "two_channel.npz": _npz_bytes(train_images=_noise(29, (2, 28, 28, 2)), train_labels=np.zeros(2, np.uint8)),
        "five_channel.npz": _npz_bytes(train_images=_noise(30, (2, 28, 28, 5)), train_labels=np.zeros(2, np.uint8)),
        # tracebacks
        "strings.npz": _npz_bytes(train_images=np.array([["a", "b"], ["c", "d"]]), train_labels=np.zeros(2)),
        "complex.npz": _npz_bytes(train_images=np.zeros((2, 4, 4), np.complex64), train_labels=np.zeros(2)),
        "images_1d.npz": _npz_bytes(train_images=np.zeros(5, np.uint8), train_labels=np.zeros(5)),
        "no_images.npz": _npz_bytes(other=np.zeros(3)),
        "empty_split.npz": _npz_bytes(train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros(0)),
        "declares_4gb.npz": _npz_forged_header("train_images", (4096, 1024, 1024), data=b"\0" * 64),
        "declares_1gb_zeros.npz": _npz_forged_header("train_images", (1024, 1024, 1024), data=b"\0" * 1024),
        "not_a_zip.npz": b"PK\x03\x04" + b"\0" * 100,
        "png_1x100000000.png": _long_thin_png(100_000_000),
        "png_header_65535x65535.png": _png_header(65535, 65535),
        "png_header_only_16bit_rgb.png": _png_header(30000, 30000, bit_depth=16, colour=2),
        "png_zero_width.png": _png_header(0, 10),
        "jpeg_truncated.jpg": _pil_bytes(gray8, "JPEG")[:120],
        "bmp_huge_header.bmp": b"BM" + struct.pack("<IHHI", 1000, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 60000,
                                                                                      60000, 1, 24, 0, 0, 0, 0, 0, 0),
        # size limits walked around
        "planar_3x1200x1200.tif": _tiff_bytes(np.zeros((3, 1200, 1200), np.uint8), photometric="rgb",
                                              planarconfig="separate", compression="zlib"),
        "small_page0_planar_page1.tif": _tiff_pages([(gray8, {}), (np.zeros((3, 1200, 1200), np.uint8),
                                                     {"photometric": "rgb", "planarconfig": "separate",
                                                      "compression": "zlib"})]),
        "depth_tiff.tif": _tiff_bytes(np.zeros((4, 24, 20), np.uint8), volumetric=True, photometric="minisblack"),
        "complex.tif": _tiff_bytes(np.zeros((24, 20), np.complex64)),
        "tiff_truncated.tif": _tiff_bytes(gray16)[:100],
        "tiff_ifd_loop.tif": _tiff_ifd_loop(),
        "tiff_strip_beyond_eof.tif": _tiff_bytes(np.zeros((600, 600), np.uint16))[:2000],
        "zeros_deflated.png": _png_header(4000, 4000, idat=zlib.compress(b"\0" * (4001 * 4000), 9)),
        "declares_megabyte_but_deflate.nii.gz": gzip.compress(_nifti_forged(version=1, dims=(1024, 1024, 1),
                                                                             payload=zlib.decompress(big_zeros))),
        # names
        "name with spaces.png": _pil_bytes(gray8, "PNG"),
        "ünïcødé_名前.png": _pil_bytes(gray8, "PNG"),
        "hash#frame=1.png": _pil_bytes(gray8, "PNG"),
        "hash#1.dcm": _dicom_bytes(_noise(31, (2, 24, 20), np.uint16)),
        "new\nline.png": _pil_bytes(gray8, "PNG"),
        "comma,and;semicolon.tif": _tiff_bytes(gray16),
        # empty and junk
        "empty.png": b"",
        "junk.png": b"\x00" * 50,
        "text.dcm": b"hello, I am not a DICOM file\n" * 20,
        "html.tif": b"<html><body>not a tiff</body></html>",
        "unknown_suffix.gif": b"GIF89a" + b"\0" * 100,
    }
    return files


def _tiff_ifd_loop() -> bytes:
    """A TIFF whose first IFD names itself as the next one: a reader that follows the chain never ends."""
    data = bytearray(_tiff_bytes(np.zeros((8, 8), np.uint8)))
    offset = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[offset:offset + 2])[0]
    following = offset + 2 + 12 * entries
    data[following:following + 4] = struct.pack("<I", offset)
    return bytes(data)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random byte-level mutation of a file: truncation, bit flips, overwritten header bytes, inserted or
    deleted runs, or a duplicated block."""
    buffer = bytearray(data)
    kind = int(rng.integers(6))
    n = len(buffer)
    if kind == 0:  # truncate
        return bytes(buffer[: int(rng.integers(0, max(n, 1)))])
    if kind == 1:  # flip bits anywhere
        for position in rng.integers(0, n, size=int(rng.integers(1, 16))):
            buffer[position] ^= 1 << int(rng.integers(8))
        return bytes(buffer)
    if kind == 2:  # overwrite header bytes with extreme values
        for position in rng.integers(0, min(n, 600), size=int(rng.integers(1, 8))):
            buffer[position] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80]))
        return bytes(buffer)
    if kind == 3:  # insert a random run
        position = int(rng.integers(0, n + 1))
        return bytes(buffer[:position] + rng.bytes(int(rng.integers(1, 64))) + buffer[position:])
    if kind == 4:  # delete a run
        start = int(rng.integers(0, max(n, 1)))
        return bytes(buffer[:start] + buffer[start + int(rng.integers(1, 64)):])
    start, length = int(rng.integers(0, max(n, 1))), int(rng.integers(1, 256))  # duplicate a block
    return bytes(buffer[: start + length] + buffer[start: start + length] + buffer[start + length:])


def build_corpus(folder: str | Path, *, mutants_per_seed: int = 0, seed: int = 0) -> list[Path]:
    """Write the corpus into `folder` (flat) and return the paths of its inputs (a symlink loop included)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds, crafted = seed_files(), crafted_files()
    contents = {**{f"seed_{k}": v for k, v in seeds.items()}, **{f"crafted_{k}": v for k, v in crafted.items()}}
    rng = np.random.default_rng(seed)
    for name, data in seeds.items():
        stem, dot, suffix = name.partition(".")
        for i in range(mutants_per_seed):
            contents[f"mutant_{stem}_{i:04d}.{suffix}"] = mutate(data, rng)
    paths = []
    for name, data in contents.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    loop = folder / "crafted_symlink_loop.png"
    if not loop.is_symlink():
        os.symlink(loop.name, loop)  # a link to itself: every open fails with ELOOP
    paths.append(loop)
    return paths


# --- the harness: every input through every reader, predict (with and without --strict), describe and the service ---

#: What each stage of `check_file` can say about one input.
OUTCOMES = ("ok", "refused", "traceback", "silent_drop", "unnamed", "5xx", "leak")
STAGES = ("read", "predict", "strict", "describe", "service")


def check_file(path: Path, context: dict) -> dict[str, str]:
    """Run one input through every stage; stage -> outcome (see OUTCOMES), with ': detail' for failures.

    read      expand_source, then read_raw and the run's own decoding (intensity, channels, resize) of each source
    predict   predict_paths(skip_bad=True): the input must be in predictions.csv or skipped.csv
    strict    predict_paths(skip_bad=False): scored, or the project's error
    describe  load_data('folder') over a folder of good images plus this input (skip_bad): listed or skipped
    service   POST /predict (and ?frame=1): any status below 500, no server path in the body
    """
    import csv
    import shutil
    import traceback

    from aeflow.data import ImageDataset, Record, expand_source, load_data, read_raw
    from aeflow.data.readers import READABLE_SUFFIXES, split_source
    from aeflow.errors import AeflowError, BadFileError
    from aeflow.serving.predict import predict_paths

    run, client, scratch = context["run"], context["client"], Path(context["scratch"])
    name = str(path)
    result: dict[str, str] = {}

    def names_it(error: Exception) -> bool:
        text = str(error)
        return name in text or path.name in text or (isinstance(error, BadFileError)
                                                     and split_source(error.path)[0] in (name, str(path.parent)))

    def attempt(stage: str, fn) -> None:
        try:
            outcome = fn()
            result[stage] = outcome or "ok"
        except AeflowError as error:
            result[stage] = "refused" if names_it(error) or stage == "predict" else f"unnamed: {error}"[:300]
        except Exception as error:  # noqa: BLE001 - the point: anything else is a traceback a user would see
            frames = traceback.extract_tb(error.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            result[stage] = f"traceback: {type(error).__name__} at {where}: {error}"[:300]

    def read() -> None:
        sources = expand_source(path)
        dataset = ImageDataset([Record(s, -1) for s in sources[:3]], image_size=run.image_size,
                               channels=run.channels, intensity=run.intensity)
        for source in sources[:3]:
            read_raw(source)
        for i in range(len(dataset)):
            dataset[i]

    def listed(out: Path) -> str:
        rows = {}
        for table in ("predictions.csv", "skipped.csv"):
            if (out / table).is_file():
                with open(out / table, newline="") as f:
                    rows[table] = {r["path"] for r in csv.DictReader(f)}
        if name in rows.get("predictions.csv", ()):
            return "ok"
        if name in rows.get("skipped.csv", ()):
            return "refused"
        return "silent_drop: in neither predictions.csv nor skipped.csv"

    def predict() -> str:
        out = scratch / "predict"
        shutil.rmtree(out, ignore_errors=True)
        try:
            predict_paths(run.run_dir, [path], out, run=run, progress=False, overlays=False, skip_bad=True)
        except AeflowError as error:
            if "nothing could be scored" not in str(error):
                raise
        return listed(out)

    def strict() -> None:
        out = scratch / "strict"
        shutil.rmtree(out, ignore_errors=True)
        predict_paths(run.run_dir, [path], out, run=run, progress=False, overlays=False, skip_bad=False)

    def describe() -> str:
        if not path.name.lower().endswith(READABLE_SUFFIXES):
            return "ok"  # folder layouts read image files only; other endings are not theirs (documented)
        root = scratch / "describe"
        shutil.rmtree(root, ignore_errors=True)
        (root / "normal").mkdir(parents=True)
        for good in context["good"]:
            shutil.copy(good, root / "normal" / Path(good).name)
        target = root / "normal" / path.name
        if path.is_symlink():
            os.symlink(target.name, target)  # the loop, moved along
        else:
            shutil.copy(path, target)
        splits = load_data("folder", root, image_size=None, skip_bad=True, test_fraction=0.2, val_fraction=0.2)
        splits.describe()
        sources = {r.source for recs in splits.records.splits().values() for r in recs}
        if str(target) in {split_source(s)[0] for s in sources}:
            return "ok"
        if str(target) in {p for p, _ in splits.skipped}:
            return "refused"
        return "silent_drop: neither read nor skipped by load_data"

    def service() -> str:
        data = b"" if path.is_symlink() else path.read_bytes()
        statuses = []
        for query in ("", "?frame=1"):
            response = client.post(f"/predict{query}", files={"file": (path.name, data)})
            if response.status_code >= 500:
                return f"5xx: {response.status_code} {response.text[:200]}"
            if "aeflow-upload-" in response.text or str(scratch) in response.text:
                return f"leak: {response.text[:200]}"
            statuses.append(response.status_code)
        return "ok" if statuses[0] == 200 else "refused"

    for stage, fn in (("read", read), ("predict", predict), ("strict", strict), ("describe", describe),
                      ("service", service)):
        attempt(stage, fn)
    return result


def _worker(run_dir: str, scratch: str) -> None:
    """Read JSON-encoded paths from stdin, answer one JSON line each on the original stdout."""
    import json
    import sys
    import warnings

    warnings.simplefilter("ignore")
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    import torch
    from fastapi.testclient import TestClient

    import aeflow.data.readers as readers
    from aeflow.serving.runtime import LoadedRun
    from aeflow.serving.server import create_app

    torch.set_num_threads(1)
    run = LoadedRun(run_dir)
    good = []
    for i in range(4):
        good_path = Path(scratch) / f"good_{i}.png"
        Image.fromarray(_noise(100 + i, (32, 32))).save(good_path)
        good.append(good_path)
    with TestClient(create_app(run_dir, run=run, max_pixels=4096 * 4096)) as client:
        context = {"run": run, "client": client, "scratch": scratch, "good": good}
        check_file(good[0], context)  # warm up: the first call pays for lazy imports
        protocol.write(json.dumps({"ready": _rss_mb(os.getpid())}) + "\n")
        for line in sys.stdin:
            path = Path(json.loads(line))
            readers._npz_array.cache_clear()
            readers._nifti_volume.cache_clear()
            _reset_peak()
            outcome = check_file(path, context)
            protocol.write(json.dumps({"result": outcome, "peak_mb": _peak_mb()}) + "\n")


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, so the peak is this input's
    except OSError:
        pass


def _peak_mb() -> float:
    return _rss_mb(os.getpid(), "VmHWM")


class _Worker:
    def __init__(self, run_dir: Path, scratch: Path):
        import subprocess
        import sys

        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
        self.process = subprocess.Popen([sys.executable, "-c", f"import fuzz_corpus; fuzz_corpus._worker("
                                         f"{str(run_dir)!r}, {str(scratch)!r})"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        ready = self._answer(120.0, None)
        if "ready" not in ready:
            raise RuntimeError(f"the fuzz worker did not start: {ready}")
        self.baseline = ready["ready"]

    def _answer(self, timeout: float, memory_mb: float | None) -> dict:
        import json
        import select
        import time

        deadline = time.monotonic() + timeout
        while True:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.02)
            if readable:
                line = self.process.stdout.readline()
                return json.loads(line) if line else {"dead": self.process.poll()}
            if memory_mb is not None and _rss_mb(self.process.pid) - self.baseline > memory_mb:
                return {"memory": _rss_mb(self.process.pid)}
            if time.monotonic() > deadline:
                return {"hang": timeout}

    def check(self, path: Path, timeout: float, memory_mb: float) -> dict:
        import json

        self.process.stdin.write(json.dumps(str(path)) + "\n")
        self.process.stdin.flush()
        return self._answer(timeout, memory_mb)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def run_fuzz(paths: list[Path], run_dir: Path, scratch: Path, *, workers: int = 1, timeout: float = 10.0,
             memory_mb: float = 1024.0) -> dict:
    """Every input through `check_file` in worker processes, each input bounded by `timeout` seconds and
    `memory_mb` of memory above the worker's resting size (a worker over either is killed and replaced).

    Returns {"files": {path: {stage: outcome} | {"hang"|"memory"|"dead": ...}}, "peak_mb": max over inputs}.
    """
    import threading

    queue = list(paths)
    lock = threading.Lock()
    files: dict[str, dict] = {}
    peak = [0.0]

    def serve(index: int) -> None:
        worker = _Worker(run_dir, scratch / f"worker{index}")
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    path = queue.pop(0)
                answer = worker.check(path, timeout, memory_mb)
                if "result" in answer:
                    files[str(path)] = answer["result"]
                    peak[0] = max(peak[0], answer["peak_mb"] - worker.baseline)
                else:
                    files[str(path)] = answer
                    worker.stop()
                    worker = _Worker(run_dir, scratch / f"worker{index}")
        finally:
            worker.stop()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"files": files, "peak_mb": peak[0]}


def counts(report: dict) -> dict[str, dict[str, int]]:
    """stage -> outcome -> number of inputs; the stage 'process' counts hangs, memory kills and deaths."""
    table = {stage: dict.fromkeys(OUTCOMES, 0) for stage in STAGES}
    table["process"] = {"hang": 0, "memory": 0, "dead": 0}
    for result in report["files"].values():
        for key in ("hang", "memory", "dead"):
            if key in result:
                table["process"][key] += 1
        for stage in STAGES:
            if stage in result:
                table[stage][result[stage].split(":", 1)[0]] += 1
    return table


def failures(report: dict) -> dict[str, dict]:
    """The inputs with any outcome besides ok/refused, and what happened."""
    bad = {}
    for path, result in report["files"].items():
        wrong = {k: v for k, v in result.items() if k not in STAGES or v.split(":", 1)[0] not in ("ok", "refused")}
        if wrong:
            bad[path] = wrong
    return bad


def batch_predict(paths: list[Path], run_dir: Path, out: Path, *, strict: bool = False, timeout: float = 600.0) -> dict:
    """`aeflow predict` on every input at once, as a user would run it on an archive (a subprocess).

    Returns the exit code, whether a traceback was printed, the inputs scored and skipped, and those in neither.
    """
    import csv
    import subprocess
    import sys

    command = [sys.executable, "-c", "from aeflow.cli import app; app()", "predict", "--run", str(run_dir),
               "--out", str(out), "--no-overlays", *map(str, paths)] + (["--strict"] if strict else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    tables = {}
    for table in ("predictions.csv", "skipped.csv"):
        if (out / table).is_file():
            with open(out / table, newline="") as f:
                tables[table] = {row["path"] for row in csv.DictReader(f)}
    scored, skipped = tables.get("predictions.csv", set()), tables.get("skipped.csv", set())
    return {"exit": done.returncode, "traceback": "Traceback" in done.stderr + done.stdout,
            "stderr": done.stderr[-2000:], "scored": scored, "skipped": skipped,
            "neither": {str(p) for p in paths} - scored - skipped}
