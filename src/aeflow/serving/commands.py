"""The `predict`, `export` and `serve` verbs of the aeflow command line; `aeflow.cli` adds them with `register(app)`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer

from aeflow.cli_errors import user_errors
from aeflow.cli_options import BACKEND_HELP

RUN_HELP = ("Run folder written by `aeflow train` (config.json, model.safetensors) with threshold.json from "
            "`aeflow test`.")


THRESHOLD_RULE_HELP = ("Use the threshold `aeflow test` fitted for this rule (thresholds.json), e.g. f1, fpr:0.05 "
                       "or 'conformal_fpr(alpha=0.05)', instead of the one in threshold.json.")


def _slice_range(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start or 0), int(stop) if stop else 2**31
    except ValueError:
        raise typer.BadParameter(f"expected START:STOP (e.g. 10:40, :40 or 10:), got {text!r}") from None


def _shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise typer.BadParameter(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}", param_hint="--shard")
    return int(index), int(count)


def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/TIFF/DICOM/NIfTI) or folders (searched "
                                                  "recursively); 'scan.nii.gz#axis=2,slice=40' names one slice."),
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    out: Path = typer.Option(Path("predictions"), "--out", "-o",
                             help="Folder for predictions.csv, skipped.csv and overlays/."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    axis: int = typer.Option(2, "--axis", min=0, max=2, help="NIfTI volumes: slice along this axis."),
    slices: Optional[str] = typer.Option(None, "--slices", help="NIfTI volumes: only slices START:STOP (STOP "
                                                                "excluded), e.g. 20:60."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write heat-map overlay PNGs."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable file instead of listing it "
                                                        "in skipped.csv and going on."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: score only every N-th image starting at I (run "
                                                              "N processes with I = 0..N-1 on a large archive)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results already in --out (without it, a "
                                                              "folder holding results is refused)."),
    threshold_rule: Optional[str] = typer.Option(None, "--threshold-rule", help=THRESHOLD_RULE_HELP),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a pool of model replicas on "
                                                         "a Ray cluster; needs aeflow[distributed])."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the Ray cluster, e.g. auto or "
                                                                  "ray://head:10001 (default: a local instance)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="--engine ray: model replicas (default: "
                                                                         "one per CPU of the cluster)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Score images with a trained run: a CSV of scores and verdicts, and heat-map overlays.

    Example: aeflow predict --run runs/chest a.png scans/ --out preds/
    """
    from aeflow.serving.predict import predict_paths

    with user_errors():
        csv_path = predict_paths(run, list(inputs), out, batch_size=batch_size, skip_bad=not strict,
                                 overlays=overlays, axis=axis, slice_range=_slice_range(slices),
                                 shard=_shard(shard), device=device, overwrite=overwrite,
                                 threshold_rule=threshold_rule, engine=engine, address=address, workers=workers,
                                 backend=backend)
    backend_path = csv_path.with_name(csv_path.name.replace("predictions", "inference_backend", 1)).with_suffix(
        ".json")
    if backend_path.is_file():
        import json

        from aeflow.backends import summary

        typer.echo(summary(json.loads(backend_path.read_text())))
    typer.echo(f"wrote {csv_path}")
    skipped_path = csv_path.with_name(csv_path.name.replace("predictions", "skipped", 1))
    with open(skipped_path, newline="") as f:
        skipped = sum(1 for _ in csv.reader(f)) - 1
    if skipped:
        typer.secho(f"{skipped} file(s) could not be read: see {skipped_path}", fg=typer.colors.YELLOW)


def export(
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    format: str = typer.Option("onnx", "--format", help="Export format (only onnx so far)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: <run>/model.onnx)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
):
    """Export the run's model as a portable file, checked against PyTorch before it is kept.

    The ONNX graph takes float images B x C x H x W in [0, 1] at the run's size (decode, apply the intensity rule
    and resize before it) and returns pred_score and anomaly_map; the threshold is in its metadata.
    """
    if format.lower() != "onnx":
        raise typer.BadParameter(f"unknown format {format!r}; supported: onnx", param_hint="--format")
    from aeflow.serving.export import export_onnx

    with user_errors():
        path = export_onnx(run, out, opset=opset)
    typer.echo(f"wrote {path}")


def serve(
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(20, "--max-upload-mb", min=0.001, help="Largest accepted upload."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", min=1, help="Largest accepted image "
                                                                           "(pixels, all frames together)."),
    upload_timeout: float = typer.Option(30, "--upload-timeout", min=0.1, help="Seconds a client may take to send "
                                                                                "one upload (408 beyond)."),
    api_docs: bool = typer.Option(False, "--api-docs", help="Serve the API description at /docs and "
                                                            "/openapi.json (off by default; served offline)."),
    threshold_rule: Optional[str] = typer.Option(None, "--threshold-rule", help=THRESHOLD_RULE_HELP),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Serve the run over HTTP: a web page at /, and POST /predict, GET /model, GET /health."""
    from aeflow.serving.server import serve as run_server

    with user_errors():
        run_server(run, host, port, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                   upload_timeout=upload_timeout, api_docs=api_docs, threshold_rule=threshold_rule,
                   backend=backend)


def register(app: typer.Typer) -> None:
    """Add `predict`, `export` and `serve` to the aeflow command line."""
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("serve")(serve)
