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
    backend = meta["inference_backend"]  # chosen at start-up, with what each candidate measured
    assert backend["backend"] in ("eager", "channels_last", "onnxruntime")
    assert "eager" in backend["candidates"]


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


# --- what the service says, and what it does not ------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_client(run_dir, loaded):
    from fastapi.testclient import TestClient

    with TestClient(create_app(run_dir, max_pixels=10_000, run=loaded)) as c:
        yield c


def tiff_bytes(pages) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for array, kwargs in pages:
            tif.write(array, **kwargs)
    return buffer.getvalue()


def test_every_response_carries_the_security_headers(strict_client):
    page = strict_client.get("/")
    for response in (page, strict_client.get("/health"), strict_client.get("/nowhere"),
                     strict_client.post("/predict", files={"file": ("a.png", b"junk" * 10, "image/png")})):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    script = page.text.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(__import__("hashlib").sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page.headers["content-security-policy"]  # the page's own script, nothing else


def test_api_description_is_off_by_default_and_offline_when_on(run_dir, loaded, strict_client):
    from fastapi.testclient import TestClient

    assert strict_client.get("/docs").status_code == 404
    assert strict_client.get("/openapi.json").status_code == 404
    with TestClient(create_app(run_dir, run=loaded, api_docs=True)) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/predict" in docs.text
        assert "http://" not in docs.text and "https://" not in docs.text  # no CDN: works offline
        assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_no_server_path_in_any_response(run_dir, loaded, tmp_path):
    import json
    import shutil

    from fastapi.testclient import TestClient

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"]["root"] = "/secret/hospital/archive"
    (run / "config.json").write_text(json.dumps(config))
    with TestClient(create_app(run)) as client:
        model = client.get("/model")
        assert model.status_code == 200 and "/secret" not in model.text
        assert model.json()["training"]["data"]["layout"] == "synthetic"
        good = png_bytes((phantoms(1)[0, 0].numpy() * 255).astype(np.uint8))
        for body in (good[:100], b"II*\x00" + b"\xff" * 60, b"\0" * 128 + b"DICM" + b"\x02\x00" * 20):
            response = client.post("/predict", files={"file": ("scan.png", body, "image/png")})
            assert response.status_code == 422, response.text
            assert "aeflow-upload-" not in response.text and str(tmp_path) not in response.text
            assert "/tmp" not in response.text and "/dev/shm" not in response.text
            assert response.json()["detail"].startswith("scan.png: ")


def test_size_limits_hold_for_every_page_and_channel_counts_are_4xx(strict_client):
    small_then_planar = tiff_bytes([(np.zeros((8, 8), np.uint8), {}),
                                    (np.zeros((3, 1200, 1200), np.uint8), {"photometric": "rgb",
                                                                            "planarconfig": "separate",
                                                                            "compression": "zlib"})])
    assert strict_client.post("/predict", files={"file": ("p.tif", small_then_planar)}).status_code == 200
    planar = strict_client.post("/predict?frame=1", files={"file": ("p.tif", small_then_planar)})
    assert planar.status_code == 413 and "page 1 has 1440000 pixels" in planar.json()["detail"]
    for channels in (2, 5):
        body = tiff_bytes([(np.zeros((16, 16, channels), np.uint8), {"photometric": "minisblack",
                                                                      "planarconfig": "contig"})])
        response = strict_client.post("/predict", files={"file": ("c.tif", body)})
        assert response.status_code == 422 and "per pixel" in response.json()["detail"]


def test_malformed_queries_are_4xx_in_words(strict_client):
    good = png_bytes(np.zeros((16, 16), np.uint8))
    for query in ("frame=abc", "frame=-1", "frame=99999999999999999999"):
        response = strict_client.post(f"/predict?{query}", files={"file": ("a.png", good)})
        assert response.status_code == 422 and response.json()["detail"].startswith("frame: ")


def test_a_slow_upload_is_cut_after_the_time_limit(run_dir, loaded):
    import socket
    import time

    app = create_app(run_dir, run=loaded, upload_timeout=0.5)
    with background_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                         b"Content-Length: 100000\r\n\r\n" + body)  # then nothing more: a client that stalls
            started = time.monotonic()
            answer = sock.recv(4096)
            waited = time.monotonic() - started
            while b"}" not in answer.partition(b"\r\n\r\n")[2] and (more := sock.recv(4096)):
                answer += more  # the body may come in a packet of its own
        assert answer.startswith(b"HTTP/1.1 408") and b"longer than 0.5 s" in answer
        assert waited < 3  # the service answered while the client was still holding the upload open
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/health").status_code == 200


def test_a_hand_edited_split_list_does_not_break_the_model_endpoint(run_dir, loaded, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "splits.json").write_text('{"splits": [1, 2, 3]}')  # a list where an object belongs
    with TestClient(create_app(run)) as client:
        response = client.get("/model")
        assert response.status_code == 200 and response.json()["training_data"] is None


@pytest.fixture(scope="module")
def plain_client(run_dir, loaded):
    from fastapi.testclient import TestClient

    with TestClient(create_app(run_dir, run=loaded, max_upload_mb=0.1)) as c:
        yield c


def _multipart(boundary: bytes, headers: bytes, payload: bytes, close: bool) -> bytes:
    return b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + payload + (b"\r\n--" + boundary + b"--\r\n" if close else b"")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12).map(str.encode),
       headers=st.binary(max_size=80),
       payload=st.binary(max_size=300) | st.sampled_from([b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"II*\x00" + b"\1" * 40,
                                                          b"\0" * 128 + b"DICM" + b"\2" * 40]),
       close=st.booleans(), content_type=st.sampled_from(["multipart/form-data; boundary={b}", "multipart/form-data",
                                                          "text/plain", "multipart/form-data; boundary=\"{b}\"", ""]),
       query=st.sampled_from(["", "?frame=0", "?frame=1", "?frame=x", "?frame=", "?frame=1&frame=2", "?other=1"]))
def test_any_malformed_request_is_answered_below_500(plain_client, boundary, headers, payload, close, content_type,
                                                      query):
    body = _multipart(boundary, b'Content-Disposition: form-data; name="file"; filename="f.png"\r\n' + headers,
                      payload, close)
    response = plain_client.post(f"/predict{query}", content=body,
                                 headers={"content-type": content_type.format(b=boundary.decode("latin-1"))})
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and "aeflow-upload-" not in response.text
