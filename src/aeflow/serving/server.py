"""HTTP service for a trained run: a JSON API and a small web page.

    GET  /         the web page (self-contained: no CDN, works offline)
    GET  /health   {"status": "ok", ...}
    GET  /model    model name, image size, backbone, threshold and rule, training data summary, and the score
                   axis every result is drawn on (`score_axis`, fixed for the run: see `score_axis`)
    GET  /colour_bar.png   the heat map's colour scale, low (left) to high (right)
    POST /predict  multipart/form-data with the image in field "file" (PNG, JPEG, TIFF or DICOM; ?frame=N picks a
                   frame of a multi-frame DICOM or a page of a multi-page TIFF) ->
                   {pred_score, pred_label, threshold, threshold_rule, anomaly_map_png, image_png, map_range,
                    width, height, format}

Uploads are checked before any decoding: the body is streamed with a cap (413 when a declared Content-Length or
the bytes actually received exceed it) and a time limit (408 when the whole body takes longer than
`upload_timeout` seconds), the type is read from the file's magic bytes, not its name (415), and the data layer's
readers check the dimensions the header declares, of the frame or page asked for, before decoding (413 above
`max_pixels`); a file that then fails to decode is a 422, a malformed multipart body or query a 400/422. Every
error body is {"detail": "..."} in words: never a server path, a traceback or a library's internals (an
unexpected failure is a 500 that says only that). The upload lives in memory; the decoders of `aeflow.data` read
a path, so it is handed to them as a private temporary file (in /dev/shm where available, i.e. RAM) that is
removed at once, and whose name is replaced by the upload's in any message.

Every response carries a Content-Security-Policy (the page's own inline script and style only, by hash; no other
origin), X-Frame-Options: DENY, X-Content-Type-Options: nosniff and Referrer-Policy: no-referrer. The API
description (/docs, /openapi.json) is off unless `api_docs=True`, and then /docs is a self-contained page (no CDN).

The model is loaded once, when the app is created, through `aeflow.training.load_run` (safetensors: nothing is
unpickled). Requests are decoded in FastAPI's thread pool; forward passes take a lock (see `LoadedRun.score`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import html
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header

import aeflow
from aeflow.backends import summary
from aeflow.errors import AeflowError, BadFileError, TooLargeError
from aeflow.evaluation.thresholds import Threshold
from aeflow.serving.runtime import OVERLAY_MIN_SIDE, LoadedRun, json_float, png_base64, png_bytes, render_overlay

#: Extension the data layer needs to pick its decoder, by sniffed type.
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}
#: Multipart framing (boundaries, part headers) allowed on top of the file itself.
_MULTIPART_OVERHEAD = 64 * 1024
_MAX_PARTS = 4
#: Per-image scores `aeflow test` writes into the run folder (aeflow.evaluation.assess.write_scores).
SCORES_FILE = "scores.csv"
#: The heat map's colour map (as in runtime.render_overlay) and the percentiles of the map its ends stand for.
COLOUR_MAP = "jet"
MAP_PERCENTILES = (1.0, 99.5)
log = logging.getLogger("aeflow.serving")


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


async def read_upload(request: Request, max_bytes: int, timeout: float = 30.0) -> tuple[str, bytes]:
    """(file name, bytes) of the multipart field "file", streamed with a cap of `max_bytes` (413 beyond it) and
    a limit of `timeout` seconds for the whole body (408 beyond it)."""
    try:
        async with asyncio.timeout(timeout):
            return await _read_upload(request, max_bytes)
    except TimeoutError:
        raise HTTPException(408, f"the upload took longer than {timeout:g} s") from None


async def _read_upload(request: Request, max_bytes: int) -> tuple[str, bytes]:
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
        raise HTTPException(400, f"malformed multipart body ({type(exc).__name__})") from None
    for part in collector.parts:
        if part.disposition.get("name") == "file":
            if len(part.data) > max_bytes:
                raise HTTPException(413, f"file of {len(part.data)} bytes is over the limit of {max_bytes} bytes")
            return _client_name(part.disposition.get("filename", "upload")), bytes(part.data)
    raise HTTPException(400, "no field named 'file' in the form")


def _client_name(name: str) -> str:
    """The upload's own name, as it is echoed in messages: no folders, no control characters, at most 80 long."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", name.replace("\\", "/").rsplit("/", 1)[-1])[:80]
    return name or "upload"


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
        fd, path = tempfile.mkstemp(prefix="aeflow-upload-", suffix=SUFFIXES[kind], dir=self.temp_root)

        def said(text: str) -> str:  # a message about the upload, with the temporary file's name replaced by its own
            return text.replace(path, name).replace(os.path.basename(path), name)

        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            source = path if frame == 0 else f"{path}#frame={frame}"
            sample = self.run.dataset([source], max_pixels=self.max_pixels)[0]
        except TooLargeError as error:
            raise HTTPException(413, f"{name}: {said(error.reason)}") from None
        except BadFileError as error:
            raise HTTPException(422, f"{name}: {said(error.reason)}") from None
        except AeflowError as error:  # e.g. the run's intensity rule needs DICOM window tags the file lacks
            raise HTTPException(422, f"{name}: {said(str(error))}") from None
        except Exception as exc:  # noqa: BLE001 - whatever a decoder raises is the file's problem, said plainly
            log.warning("upload %r could not be decoded: %s", name, exc)
            raise HTTPException(422, f"{name}: cannot decode the {kind} file ({type(exc).__name__})") from None
        finally:
            os.unlink(path)
        result = self.run.score_samples([sample])[0]
        threshold = self.run.threshold
        overlay = render_overlay(sample.image.numpy(), result.anomaly_map, result.pred_score, result.pred_label,
                                 threshold.value)
        low, high = np.percentile(result.anomaly_map, MAP_PERCENTILES)
        height, width = sample.meta["original_size"]
        return {
            "pred_score": json_float(result.pred_score),
            "pred_label": result.pred_label,
            "threshold": json_float(threshold.value),
            "threshold_rule": threshold.rule,
            "anomaly_map_png": png_base64(overlay),
            "image_png": png_base64(render_plain(sample.image.numpy(), overlay.size)),
            "map_range": [json_float(float(low)), json_float(float(high))],
            "width": int(width),
            "height": int(height),
            "format": kind,
            "intensity": sample.meta.get("intensity"),
        }


def create_app(run_dir: str | Path, *, max_upload_mb: float = 20, max_pixels: int = 4096 * 4096,
               run: LoadedRun | None = None, upload_timeout: float = 30.0, api_docs: bool = False,
               threshold_rule: str | None = None, backend: str = "auto") -> FastAPI:
    """The FastAPI app serving the run in `run_dir` (loaded now, once; or `run`, already loaded).

    upload_timeout: seconds a client may take to send one upload (408 beyond). api_docs: serve /openapi.json and
    a self-contained /docs page (off by default). threshold_rule: the rule whose threshold (thresholds.json) the
    verdicts use instead of threshold.json's. backend: how the model scores (aeflow.backends), chosen here, before
    the first request, for one image per pass; GET /model reports it.
    """
    run = run or LoadedRun(run_dir, threshold_rule=threshold_rule, backend=backend, batch_size=1)
    log.info(summary(run.predictor.report))
    service = _Service(run, int(max_upload_mb * 1024 * 1024), int(max_pixels))
    axis = score_axis(run.run_dir, run.threshold)
    colour_bar = png_bytes(render_colour_bar())
    page = resources.files("aeflow.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="aeflow", version=aeflow.__version__,
                  description="Anomaly scores and heat maps for medical images from a trained aeflow run.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if api_docs else None)
    headers = security_headers(page)

    @app.middleware("http")
    async def add_security_headers(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a bug must not leak a traceback to the client
            log.exception("unexpected error serving %s %s", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error"}, status_code=500)
        response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in error.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.run.model_name}

    @app.get("/model")
    def model() -> dict:
        return {**public_metadata(service.run.metadata()), "max_upload_bytes": service.max_bytes,
                "max_pixels": service.max_pixels, "score_axis": axis}

    @app.get("/colour_bar.png", include_in_schema=False)
    def colour_bar_png() -> Response:
        return Response(colour_bar, media_type="image/png")

    @app.post("/predict")
    async def predict(request: Request, frame: int = Query(0, ge=0, le=2**16, description="frame or page to score")
                      ) -> dict:
        name, data = await read_upload(request, service.max_bytes, upload_timeout)
        return await run_in_threadpool(service.score_upload, name, data, frame)

    if api_docs:
        @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
        def docs() -> str:
            return api_page(app.openapi())

    return app


def validation_scores(run_dir: str | Path) -> np.ndarray | None:
    """The finite validation scores `aeflow test` kept in the run's scores.csv, or None when it has none (a run not
    tested yet, a file without a 'val' split, a file that does not read as one)."""
    try:
        with open(Path(run_dir) / SCORES_FILE, newline="") as f:
            values = [float(row["pred_score"]) for row in csv.DictReader(f) if row.get("split") == "val"]
    except (OSError, KeyError, TypeError, ValueError, csv.Error):
        return None
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    return values if values.size >= 2 else None


def score_axis(run_dir: str | Path, threshold: Threshold) -> dict:
    """The score axis every result of this run is drawn on, fixed once for the run so that two images' markers can
    be compared: from the 1st to the 99th percentile of the run's validation scores (scores.csv), widened to take
    the threshold, plus 5% on each side. {low, high, source, n_validation}; low and high are None when the run
    has no validation scores (the page then fixes the axis from the threshold and the first image it scores)."""
    scores = validation_scores(run_dir)
    cut = threshold.value if math.isfinite(threshold.value) else None
    if scores is None:
        return {"low": None, "high": None, "n_validation": 0,
                "source": "fixed from the threshold and the first image scored, as the run has no validation "
                          "scores (aeflow test writes them to scores.csv)"}
    low, high = (float(v) for v in np.percentile(scores, (1.0, 99.0)))
    if cut is not None:
        low, high = min(low, cut), max(high, cut)
    pad = 0.05 * (high - low) or 0.25 * abs(high) or 1.0
    return {"low": low - pad, "high": high + pad, "n_validation": int(scores.size),
            "source": f"1st to 99th percentile of the run's {scores.size} validation scores"
                      + (" and the threshold" if cut is not None else "")}


def render_plain(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The model's input (C x H x W or H x W in [0, 1]; gray, or colour for 3 channels), drawn at `size` (the
    overlay's) to sit beside it."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels.transpose(1, 2, 0) if pixels.shape[0] == 3 else pixels.mean(0)
    picture = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8))
    return picture if picture.size == tuple(size) else picture.resize(size, Image.Resampling.BILINEAR)


def render_colour_bar(width: int = OVERLAY_MIN_SIDE, height: int = 14) -> Image.Image:
    """The heat map's colour map from low (left) to high (right), as an image for the page."""
    from matplotlib import colormaps

    row = (colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, width))[:, :3] * 255).round().astype(np.uint8)
    return Image.fromarray(np.repeat(row[None], height, axis=0))


def security_headers(page: str) -> dict[str, str]:
    """Headers sent with every response; the CSP allows the web page's own inline script and style by hash."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src 'self' {hashes('script')}; style-src 'self' {hashes('style')}; "
              "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
              "frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def public_metadata(metadata: dict) -> dict:
    """The run's metadata without anything that names a place on the server (data roots, weight files, paths)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in ("root", "weights", "path", "paths")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and ("/" in value or "\\" in value):
            return "(a path, not shown)"
        return value

    return clean(metadata)


def api_page(schema: dict) -> str:
    """A self-contained page describing the API from its OpenAPI schema (no script, no CDN)."""
    rows = []
    for route, methods in sorted(schema.get("paths", {}).items()):
        for method, operation in methods.items():
            parameters = ", ".join(p["name"] for p in operation.get("parameters", []))
            rows.append(f"<tr><td>{html.escape(method.upper())}</td><td>{html.escape(route)}</td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{html.escape(parameters)}</td></tr>")
    info = schema.get("info", {})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', 'API'))} API"
            f"</title></head><body><h1>{html.escape(info.get('title', ''))} {html.escape(info.get('version', ''))}"
            f"</h1><p>{html.escape(info.get('description', ''))}</p><p>The full description: "
            f"<a href='/openapi.json'>/openapi.json</a>.</p><table><tr><th>method</th><th>path</th><th>summary</th>"
            f"<th>parameters</th></tr>{''.join(rows)}</table></body></html>")


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
          max_pixels: int = 4096 * 4096, upload_timeout: float = 30.0, api_docs: bool = False,
          threshold_rule: str | None = None, backend: str = "auto") -> None:
    """Load the run and serve it with uvicorn until interrupted (idle connections are closed after 5 s)."""
    import uvicorn

    app = create_app(run_dir, max_upload_mb=max_upload_mb, max_pixels=max_pixels, upload_timeout=upload_timeout,
                     api_docs=api_docs, threshold_rule=threshold_rule, backend=backend)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5, server_header=False)
