"""Load test of `aeflow serve`: concurrent clients against a loopback server this script starts itself.

    python benchmarks/load_test.py --run runs/<name> [--clients 16] [--requests 400] [--seconds 120]
    python benchmarks/load_test.py --tiny-run --clients 50 --requests 2000 --mixed --upload-timeout 2

Starts the service in a subprocess on a free loopback port, waits for /health, then N concurrent clients send
POST /predict with one PNG until the request budget or the time budget runs out. Prints p50/p99 latency,
throughput and the error count; then sends malformed uploads (wrong type, truncated PNG, oversized body, a PNG
header declaring 100000 x 100000 pixels) and checks each gets its 4xx, and ends with a health check.
A run folder comes from `aeflow train ...` followed by `aeflow test --run ...` (which writes threshold.json);
`--tiny-run` uses the tests' untrained 64 px AE-FLOW instead (the service is under test, not the model).

With `--mixed`, every 10th request of a client is a malformed upload (the crafted files of tests/fuzz_corpus.py
that must be refused, in turn; each must get a 4xx) and every 25th a slow one (a raw connection that sends the headers and the start of
the body, then stalls: the server must answer 408 after --upload-timeout); valid, malformed and slow requests are
counted apart, and latency percentiles are of the valid ones.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, threads: int, upload_timeout: float = 30.0) -> subprocess.Popen:
    code = ("import torch, sys; torch.set_num_threads(int(sys.argv[3])); from aeflow.serving.server import serve; "
            "serve(sys.argv[1], '127.0.0.1', int(sys.argv[2]), upload_timeout=float(sys.argv[4]))")
    return subprocess.Popen([sys.executable, "-c", code, str(run), str(port), str(threads), str(upload_timeout)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited during start-up:\n{server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy in time")


def test_image(size: int) -> bytes:
    from aeflow.data.synthetic import make_phantom

    image = make_phantom(0, 1, size=size, anomaly="bright_lesion")[0]
    buffer = io.BytesIO()
    Image.fromarray((image * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


async def load(url: str, body: bytes, clients: int, requests: int, seconds: float, *,
               bad: list[tuple[str, bytes]] = (), slow_timeout: float | None = None) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    malformed_status: dict[str, int] = {}
    slow: list[tuple[int, float]] = []
    issued = 0
    deadline = time.monotonic() + seconds
    host, port = url.removeprefix("http://").split(":")

    async def stall() -> None:
        """A client that sends the headers and a little of the body, then nothing: it must be cut with a 408."""
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                         b"Content-Length: 100000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                         b"filename=\"slow.png\"\r\n\r\n\x89PNG")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout=slow_timeout + 30)
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else -1
        except (asyncio.TimeoutError, OSError):
            status = -1
        finally:
            writer.close()
        slow.append((status, time.perf_counter() - start))

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal issued
        turn = 0
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            turn += 1
            if slow_timeout is not None and turn % 25 == 1:
                await stall()
                continue
            if bad and turn % 10 == 0:
                name, data = bad[(index * 7 + turn) % len(bad)]
                try:
                    status = str((await http.post("/predict", files={"file": (name, data)})).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                malformed_status[status] = malformed_status.get(status, 0) + 1
                continue
            start = time.perf_counter()
            try:
                response = await http.post("/predict", files={"file": ("scan.png", body, "image/png")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"ok": len(latencies), "errors": errors, "seconds": elapsed, "throughput": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "malformed": malformed_status, "slow": slow}


def png_header(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def malformed(url: str, good: bytes, max_upload_mb: float = 20) -> list[tuple[str, int, int]]:
    """(case, expected status, status received) for each malformed upload."""
    cases = [
        ("text named .png", 415, b"this is not an image" * 50),
        ("truncated PNG", 422, good[: len(good) // 2]),
        ("PNG header 100000 x 100000", 413, png_header(100_000, 100_000)),
        ("oversized body", 413, os.urandom(int((max_upload_mb + 1) * 1024 * 1024))),
    ]
    results = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, expected, body in cases:
            try:
                status = http.post("/predict", files={"file": ("x.png", body, "image/png")}).status_code
            except httpx.HTTPError as exc:  # a server may close the connection on an oversized body
                status = -1 if not isinstance(exc, httpx.RemoteProtocolError) else 0
            results.append((name, expected, status))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder with threshold.json")
    parser.add_argument("--tiny-run", action="store_true", help="use the tests' untrained 64 px AE-FLOW run")
    parser.add_argument("--mixed", action="store_true", help="mix malformed and slow uploads into the load")
    parser.add_argument("--upload-timeout", type=float, default=30.0, help="the server's --upload-timeout")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=120, help="time budget of the load phase")
    parser.add_argument("--image-size", type=int, default=256, help="side of the uploaded PNG (16-bit)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in the server")
    args = parser.parse_args()
    if (args.run is None) == (not args.tiny_run):
        parser.error("give --run RUN or --tiny-run")
    if args.tiny_run:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from serving.conftest import build_run

        args.run = build_run(Path(tempfile.mkdtemp(prefix="aeflow-load-")) / "run")
    bad = []
    if args.mixed:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from fuzz_corpus import VALID_CRAFTED, crafted_files

        bad = sorted((name, data) for name, data in crafted_files().items() if name not in VALID_CRAFTED)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.run, port, args.threads, args.upload_timeout)
    try:
        wait_healthy(url, server)
        body = test_image(args.image_size)
        httpx.post(url + "/predict", files={"file": ("warm.png", body, "image/png")}, timeout=120)  # warm-up
        result = asyncio.run(load(url, body, args.clients, args.requests, args.seconds, bad=bad,
                                  slow_timeout=args.upload_timeout if args.mixed else None))
        checks = malformed(url, body)
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"machine: {machine()}; server torch threads: {args.threads}")
    print(f"run: {args.run}; upload: {len(body)} byte 16-bit PNG, {args.image_size} x {args.image_size}")
    print(f"{args.clients} clients, {result['ok']} ok requests in {result['seconds']:.1f} s: "
          f"throughput {result['throughput']:.1f} req/s, latency p50 {result['p50_ms']:.0f} ms, "
          f"p99 {result['p99_ms']:.0f} ms, errors {sum(result['errors'].values())} {result['errors'] or ''}")
    mixed_failed = False
    if args.mixed:
        statuses = result["malformed"]
        not_4xx = {k: v for k, v in statuses.items() if not (k.isdigit() and 400 <= int(k) < 500)}
        cut = [seconds for status, seconds in result["slow"] if status == 408]
        print(f"malformed uploads mixed in: {sum(statuses.values())}, statuses {dict(sorted(statuses.items()))}, "
              f"not 4xx: {sum(not_4xx.values())}")
        print(f"slow uploads mixed in: {len(result['slow'])}, cut with 408: {len(cut)}, time to the cut "
              f"{min(cut, default=float('nan')):.2f}..{max(cut, default=float('nan')):.2f} s "
              f"(--upload-timeout {args.upload_timeout:g} s)")
        mixed_failed = bool(not_4xx) or len(cut) != len(result["slow"])
    for name, expected, status in checks:
        print(f"malformed: {name:<28} expected {expected}, got {status}  {'ok' if status == expected else 'FAIL'}")
    print(f"final health check: {'ok' if healthy else 'FAILED'}")
    if not healthy or any(status != expected for _, expected, status in checks) or result["errors"] or mixed_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
