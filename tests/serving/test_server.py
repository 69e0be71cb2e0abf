"""The HTTP service answers a real client over loopback, refuses malformed uploads with the right 4xx and stays up."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from aeflow.serving.runtime import LoadedRun
from aeflow.serving.server import background_server, create_app, sniff

from .conftest import IMAGE_SIZE, phantoms, write_dicom

MAX_UPLOAD_MB = 1


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height 8-bit gray, with no image data after it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.fixture(scope="module")
def loaded(run_dir):
    return LoadedRun(run_dir)


@pytest.fixture(scope="module")
def url(run_dir, loaded):
    app = create_app(run_dir, max_upload_mb=MAX_UPLOAD_MB, max_pixels=2048 * 2048, run=loaded)
    with background_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_health_and_model_metadata(client, loaded):
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/model").json()
    assert meta["model"] == "aeflow"
    assert meta["backbone"] == "efficientnet_lite0"
    assert meta["image_size"] == IMAGE_SIZE
    assert meta["threshold"] == pytest.approx(loaded.threshold.value)
    assert meta["threshold_rule"] == "conformal_fpr(alpha=0.1)"


def test_predict_matches_direct_scoring(client, loaded, tmp_path):
    """A 16-bit PNG sent over HTTP gets the score the loaded run gives the same file read from disk."""
    image = phantoms(1, seed=5)[0, 0].numpy()
    body = png_bytes((image * 65535).round().astype(np.uint16))
    response = client.post("/predict", files={"file": ("phantom.png", body, "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    (tmp_path / "phantom.png").write_bytes(body)
    expected = loaded.score_samples([loaded.dataset([str(tmp_path / "phantom.png")])[0]])[0]
    assert result["pred_score"] == pytest.approx(expected.pred_score, rel=1e-6)
    assert result["pred_label"] == int(result["pred_score"] > result["threshold"])
    assert (result["width"], result["height"], result["format"]) == (IMAGE_SIZE, IMAGE_SIZE, "png")
    assert result["intensity"] == "dtype"
    overlay = Image.open(io.BytesIO(base64.b64decode(result["anomaly_map_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.width >= IMAGE_SIZE


def test_dicom_and_multipage_tiff_uploads(client, loaded, tmp_path):
    import tifffile

    frames = (phantoms(2, seed=6)[:, 0].numpy() * 4000).astype(np.uint16)
    dicom = write_dicom(tmp_path / "cine.dcm", frames).read_bytes()
    first = client.post("/predict", files={"file": ("upload.bin", dicom, "application/octet-stream")})
    second = client.post("/predict?frame=1", files={"file": ("upload.bin", dicom, "application/octet-stream")})
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["format"] == "dicom" and first.json()["pred_score"] != second.json()["pred_score"]
    assert client.post("/predict?frame=2", files={"file": ("c.dcm", dicom, "application/dicom")}).status_code == 422
    tifffile.imwrite(tmp_path / "pages.tif", frames)
    tiff = client.post("/predict?frame=1", files={"file": ("p.tif", (tmp_path / "pages.tif").read_bytes(),
                                                           "image/tiff")})
    assert tiff.status_code == 200 and tiff.json()["format"] == "tiff"
    page = loaded.score_samples([loaded.dataset([f"{tmp_path / 'pages.tif'}#frame=1"])[0]])[0]
    assert tiff.json()["pred_score"] == pytest.approx(page.pred_score, rel=1e-6)


def test_malformed_uploads_get_4xx_and_service_stays_healthy(client, url):
    good = png_bytes((phantoms(1)[0, 0].numpy() * 255).astype(np.uint8))
    cases = {
        "text renamed .png": (415, {"file": ("notes.png", b"hello, I am not an image" * 10, "image/png")}),
        "truncated PNG": (422, {"file": ("cut.png", good[: len(good) // 2], "image/png")}),
        "huge declared size": (413, {"file": ("bomb.png", png_header_only(100_000, 100_000), "image/png")}),
        "over the pixel limit": (413, {"file": ("big.png", png_header_only(4096, 4096), "image/png")}),
        "no file field": (400, {"other": ("a.png", good, "image/png")}),
    }
    for name, (status, files) in cases.items():
        response = client.post("/predict", files=files)
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"], name
    assert client.post("/predict", content=good, headers={"content-type": "image/png"}).status_code == 415
    oversized = np.random.default_rng(0).integers(0, 255, (1200, 1200), dtype=np.uint8)  # ~1.4 MB as PNG
    response = client.post("/predict", files={"file": ("large.png", png_bytes(oversized), "image/png")})
    assert response.status_code == 413
    # A chunked body (no Content-Length) is cut off by the streaming cap, not read to the end.
    boundary = b"xyz"

    def chunked():
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536
        yield b"\r\n--xyz--\r\n"

    with httpx.Client(base_url=url, timeout=30) as fresh:
        response = fresh.post("/predict", content=chunked(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"})
    assert response.status_code == 413
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", files={"file": ("ok.png", good, "image/png")}).status_code == 200


def test_sniff_reads_content_not_names():
    assert sniff(png_header_only(4, 4)) == "png"
    assert sniff(b"\xff\xd8\xff\xe0" + b"\0" * 10) == "jpeg"
    assert sniff(b"II*\x00" + b"\0" * 10) == "tiff"
    assert sniff(b"\0" * 128 + b"DICM" + b"\0" * 10) == "dicom"
    assert sniff(b"GIF89a" + b"\0" * 200) is None
