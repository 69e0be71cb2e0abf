"""HTTP service for a trained run: a JSON API and a small web page.

    GET  /         the web page (self-contained: no CDN, works offline)
    GET  /health   {"status": "ok", ...}
    GET  /model    model name, image size, backbone, threshold and rule, training data summary
    POST /predict  multipart/form-data with the image in field "file" (PNG, JPEG, TIFF or DICOM; ?frame=N picks a
                   frame of a multi-frame DICOM or a page of a multi-page TIFF) ->
                   {pred_score, pred_label, threshold, threshold_rule, anomaly_map_png, width, height, format}

Uploads are checked before any decoding: the body is streamed with a cap (413 when a declared Content-Length or
the bytes actually received exceed it), the type is read from the file's magic bytes, not its name (415), and
the image dimensions from its header (413 above `max_pixels`); a file that then fails to decode is a 422, a
malformed multipart body a 400. The upload lives in memory; the decoders of `aeflow.data` read a path, so it is
handed to them as a private temporary file (in /dev/shm where available, i.e. RAM) that is removed at once.

The model is loaded once, when the app is created, through `aeflow.training.load_run` (safetensors: nothing is
unpickled). Requests are decoded in FastAPI's thread pool; forward passes take a lock (see `LoadedRun.score`).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from python_multipart.multipart import MultipartParser, parse_options_header

import aeflow
from aeflow.errors import AeflowError, BadFileError
from aeflow.serving.runtime import LoadedRun, json_float, png_base64, render_overlay

#: Extension the data layer needs to pick its decoder, by sniffed type.
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
#: Multipart framing (boundaries, part headers) allowed on top of the file itself.
_MULTIPART_OVERHEAD = 64 * 1024
_MAX_PARTS = 4


def sniff(data: bytes) -> str | None:
    """The image type from the first bytes of the file: 'png', 'jpeg', 'tiff', 'dicom' or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF, both byte orders
        return "tiff"
    if data[128:132] == b"DICM":  # DICOM Part 10: 128-byte preamble, then the magic
        return "dicom"
    return None


def declared_pixels(data: bytes, kind: str) -> int:
    """Pixels the file's header says it holds (all frames together), read without decoding any pixel data.

    Raises BadFileError when the header itself cannot be read.
    """
    try:
        if kind == "png":  # the IHDR chunk must come first: width and height at bytes 16-23, big-endian
            if data[12:16] != b"IHDR":
                raise ValueError("the first chunk is not IHDR")
            width, height = struct.unpack(">II", data[16:24])
            return width * height
        if kind == "jpeg":
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller's limit decides
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        return im.width * im.height
                except Image.DecompressionBombError:  # PIL refuses headers over 2 x MAX_IMAGE_PIXELS outright
                    return 2 * Image.MAX_IMAGE_PIXELS + 1
        if kind == "tiff":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                return int(page.imagewidth) * int(page.imagelength)
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:  # noqa: BLE001 - every header-parsing failure is "undecodable"
        raise BadFileError("upload", f"cannot read the {kind} header: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    @property
    def disposition(self) -> dict[str, str]:
        _, params = parse_options_header(self.headers.get("content-disposition", ""))
        return {k.decode("latin-1"): v.decode("utf-8", "replace") for k, v in params.items()}


class _FormCollector:
    """Callbacks for python-multipart's streaming parser that keep the parts in memory."""

    def __init__(self):
        self.parts: list[_Part] = []
        self._field, self._value = bytearray(), bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self.parts[-1].data.extend(data[start:end]),
        }

    def _begin(self) -> None:
        if len(self.parts) >= _MAX_PARTS:
            raise HTTPException(400, f"too many form fields (at most {_MAX_PARTS}); send the image in field 'file'")
        self.parts.append(_Part())

    def _header_end(self) -> None:
        self.parts[-1].headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()


async def read_upload(request: Request, max_bytes: int) -> tuple[str, bytes]:
    """(file name, bytes) of the multipart field "file", streamed with a cap of `max_bytes` (413 beyond it)."""
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, "send the image as multipart/form-data in a field named 'file'")
    limit = max_bytes + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    collector = _FormCollector()
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, f"upload is over the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    for part in collector.parts:
        if part.disposition.get("name") == "file":
            if len(part.data) > max_bytes:
                raise HTTPException(413, f"file of {len(part.data)} bytes is over the limit of {max_bytes} bytes")
            return part.disposition.get("filename", "upload"), bytes(part.data)
    raise HTTPException(400, "no field named 'file' in the form")


class _Service:
    """The loaded run plus the upload limits; `score_upload` is the blocking part of POST /predict."""

    def __init__(self, run: LoadedRun, max_bytes: int, max_pixels: int):
        self.run, self.max_bytes, self.max_pixels = run, max_bytes, max_pixels
        shm = Path("/dev/shm")
        self.temp_root = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None

    def score_upload(self, name: str, data: bytes, frame: int) -> dict:
        kind = sniff(data)
        if kind is None:
            raise HTTPException(415, f"{name}: not a PNG, JPEG, TIFF or DICOM file (judged by its content, "
                                     "not its name)")
        try:
            pixels = declared_pixels(data, kind)
        except BadFileError as error:
            raise HTTPException(422, f"{name}: {error.reason}") from None
        if pixels > self.max_pixels:
            raise HTTPException(413, f"{name}: {pixels} pixels, over the limit of {self.max_pixels}")
        fd, path = tempfile.mkstemp(prefix="aeflow-upload-", suffix=SUFFIXES[kind], dir=self.temp_root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            source = path if frame == 0 else f"{path}#frame={frame}"
            sample = self.run.dataset([source], max_pixels=self.max_pixels)[0]
        except BadFileError as error:
            raise HTTPException(422, f"{name}: {error.reason}") from None
        except AeflowError as error:  # e.g. the run's intensity rule needs DICOM window tags the file lacks
            raise HTTPException(422, f"{name}: {error}") from None
        finally:
            os.unlink(path)
        result = self.run.score_samples([sample])[0]
        threshold = self.run.threshold
        overlay = render_overlay(sample.image.numpy(), result.anomaly_map, result.pred_score, result.pred_label,
                                 threshold.value)
        height, width = sample.meta["original_size"]
        return {
            "pred_score": json_float(result.pred_score),
            "pred_label": result.pred_label,
            "threshold": json_float(threshold.value),
            "threshold_rule": threshold.rule,
            "anomaly_map_png": png_base64(overlay),
            "width": int(width),
            "height": int(height),
            "format": kind,
            "intensity": sample.meta.get("intensity"),
        }


def create_app(run_dir: str | Path, *, max_upload_mb: float = 20, max_pixels: int = 4096 * 4096,
               run: LoadedRun | None = None) -> FastAPI:
    """The FastAPI app serving the run in `run_dir` (loaded now, once; or `run`, already loaded)."""
    service = _Service(run or LoadedRun(run_dir), int(max_upload_mb * 1024 * 1024), int(max_pixels))
    page = resources.files("aeflow.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="aeflow", version=aeflow.__version__,
                  description="Anomaly scores and heat maps for medical images from a trained aeflow run.")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.run.model_name}

    @app.get("/model")
    def model() -> dict:
        return {**service.run.metadata(), "max_upload_bytes": service.max_bytes, "max_pixels": service.max_pixels}

    @app.post("/predict")
    async def predict(request: Request, frame: int = Query(0, ge=0, description="frame or page to score")) -> dict:
        name, data = await read_upload(request, service.max_bytes)
        return await run_in_threadpool(service.score_upload, name, data, frame)

    return app


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port of `host`; yields its base URL, stops it on exit.

    For tests, benchmarks and notebooks; `serve` is the way to run the service for real.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, max_upload_mb: float = 20,
          max_pixels: int = 4096 * 4096) -> None:
    """Load the run and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(run_dir, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    uvicorn.run(app, host=host, port=port, log_level="info")
