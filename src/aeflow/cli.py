"""The `aeflow` command line: one verb per step of a user's day.

    aeflow data describe --data <layout> --root <path>   what a data set holds
    aeflow train   --model aeflow --data <layout> ...    train and save a run folder
    aeflow test    --run runs/<name>                      metrics (JSON + CSV) and report.html
    aeflow predict --run runs/<name> <files/folders>      score new images
    aeflow benchmark --models ... --data ...              several models, one split, a leaderboard
    aeflow export  --run runs/<name> --format onnx        a portable model
    aeflow serve   --run runs/<name>                      HTTP API + web page
    aeflow demo                                           all of it on the built-in synthetic set
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from aeflow.cli_errors import user_errors
from aeflow.cli_options import BACKEND_HELP, parse_options
from aeflow.evaluation.leaderboard import benchmark_command
from aeflow.serving.commands import register as register_serving_commands

app = typer.Typer(
    name="aeflow",
    help="Anomaly detection in medical images with AE-FLOW: train on normal images, score and localise anomalies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect data sets and layouts.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _show_version(value: bool) -> None:
    if value:
        import aeflow

        typer.echo(f"aeflow {aeflow.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                          help="Print aeflow's version and exit.")) -> None:
    """Anomaly detection in medical images with AE-FLOW: train on normal images, score and localise anomalies."""


_default_formatwarning = warnings.formatwarning


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """aeflow's own warnings (e.g. a split without anomalies) as one line for the user, not a source location."""
    if category.__module__.startswith("aeflow"):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


warnings.formatwarning = _plain_warning


DATA_HELP = "Data layout: synthetic, medmnist, magnetic_tile, mvtec, btad, chest_xray, oct2017, isic2018, brats2021, miic, folder."
ROOT_HELP = "Root folder (or .npz file) of the data set; not needed for the synthetic set."
OPTION_HELP = "Layout option as key=value (repeatable), e.g. --option size=64 --option difficulty=0.5."


@data_app.command("describe")
def data_describe(
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="List unreadable files and go on instead of stopping."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Print counts per split and class, image sizes, intensity ranges and skipped files."""
    from aeflow.data import describe, load_data, summarize

    with user_errors():
        splits = load_data(data, root, image_size=None, skip_bad=skip_bad, **parse_options(option))
    typer.echo(json.dumps(summarize(splits), indent=2, default=str) if as_json else describe(splits))


@data_app.command("layouts")
def data_layouts(layout: Optional[str] = typer.Argument(None, help="One layout, described in full.")):
    """List the data layouts with their options (-o key=value) and defaults."""
    from aeflow.data.layouts import describe_layouts

    with user_errors():
        typer.echo(describe_layouts(layout))


RUNS = Path("runs")


def _train_config(
    *, model, preset, data, root, option, model_option, image_size, channels, intensity, epochs, batch_size, lr,
    weight_decay, patience, seed, precision, accelerator, devices, backbone, weights, freeze_encoder, subnet,
    skip_bad, strategy="auto", num_nodes=1,
) -> dict:
    """Command-line flags -> a TrainConfig dict; flags left unset keep the preset's (or TrainConfig's) value."""
    values: dict = {"model": model, "seed": seed, "precision": precision, "accelerator": accelerator,
                    "devices": devices, "strategy": strategy, "num_nodes": num_nodes}
    if preset:
        values["preset"] = preset
    for key, value in (("image_size", image_size), ("channels", channels), ("max_epochs", epochs),
                       ("batch_size", batch_size), ("lr", lr), ("weight_decay", weight_decay),
                       ("patience", patience)):
        if value is not None:
            values[key] = value
    model_kwargs = parse_options(model_option)
    for key, value in (("backbone", backbone), ("weights", str(weights) if weights else None),
                       ("freeze_encoder", freeze_encoder), ("subnet", subnet)):
        if value is not None:
            model_kwargs[key] = value
    values["model_kwargs"] = model_kwargs
    values["data"] = {"layout": data, "root": str(root) if root else None, "skip_bad": skip_bad,
                      "intensity": intensity, **parse_options(option)}
    return values


@app.command()
def train(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON file of these options (keys as "
                                               "the flags without --, e.g. epochs: 10, option: {size: 64}); flags "
                                               "given on the command line override it. A run's config.json works too."),
    from_run: Optional[Path] = typer.Option(None, "--from", help="Repeat the run in this folder: its config.json, "
                                            "with any flag given here changed (default --name: <run>-repeat)."),
    logger: str = typer.Option("csv", "--logger", help="csv (curves/metrics.csv), tensorboard (also tensorboard/) "
                                                       "or mlflow (also mlruns/, a local file store)."),
    data: str = typer.Option("synthetic", "--data", help=DATA_HELP),
    root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
    model: str = typer.Option("aeflow", "--model", help="Registered model name (see `aeflow models`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named set-up: paper, paper_chest_xray, chest_xray, quick."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name under --runs (default: <model>-<data>-s<seed>)."),
    runs: Path = typer.Option(RUNS, "--runs", help="Folder that holds run folders."),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
    model_option: list[str] = typer.Option([], "--model-option", "-m", help="Model argument as key=value (repeatable), e.g. -m flow_steps=4."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Side in pixels, a multiple of 16."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 keeps grayscale; 3 repeats it / keeps colour."),
    intensity: str = typer.Option("auto", "--intensity", help="Intensity rule: auto, dtype, minmax, window, window:C,W, percentile:1,99."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum number of epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without a lower validation loss."),
    seed: int = typer.Option(0, "--seed"),
    precision: str = typer.Option("32-true", "--precision", help="32-true or bf16-mixed."),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto, cpu or gpu."),
    devices: str = typer.Option("auto", "--devices", help="Number of devices (processes) per node, or auto (one device "
                                                      "unless a DDP strategy is given)."),
    strategy: str = typer.Option("auto", "--strategy", help="auto, ddp or ddp_spawn: several processes, each on its "
                                                        "share of every epoch; --batch-size is per process (see "
                                                        "docs/distributed.md)."),
    num_nodes: int = typer.Option(1, "--num-nodes", min=1, help="Machines taking part (DDP)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="wide_resnet50_2, resnet18 or efficientnet_lite0."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local file of pretrained backbone weights."),
    freeze_encoder: Optional[bool] = typer.Option(None, "--freeze-encoder/--train-encoder", help="Keep the pretrained encoder fixed, or fine-tune it."),
    subnet: Optional[str] = typer.Option(None, "--subnet", help="Flow coupling network: conv or resnet."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="List unreadable files in the run folder and go on."),
    labelled_anomalies: int = typer.Option(0, "--labelled-anomalies", min=0, help="Semi-supervised (--model aeflow_gmm): take K labelled anomalous images from the training pool (never from val/test), chosen with the seed and recorded in the run."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the named folder from its last checkpoint."),
):
    """Train a model on normal images and save a run folder (config, split lists, checkpoints, curves, log)."""
    from aeflow.training import train as train_run
    from aeflow.training.config_file import merge_options, read_options

    if config_file is not None and from_run is not None:
        raise typer.BadParameter("give --config FILE or --from RUN, not both")
    with user_errors():
        stored = read_options(from_run / "config.json" if from_run else config_file) \
            if config_file or from_run else None
    explicit = {k for k in ctx.params  # typer vendors click: its ParameterSource is compared by name
                if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    if stored is not None and stored.flags is not None:  # a file of flags: the command line's win
        unknown = set(stored.flags) - set(ctx.params) - {"config", "from"}
        if unknown:
            raise typer.BadParameter(f"{config_file}: unknown option(s) {', '.join(sorted(unknown))}; the keys are "
                                     f"`aeflow train` flags without -- (see aeflow train --help)")
        flags = merge_options(ctx.params, stored.flags, explicit)
        data, root, model, preset, name = flags["data"], flags["root"], flags["model"], flags["preset"], flags["name"]
        runs, option, model_option, image_size = Path(flags["runs"]), flags["option"], flags["model_option"], flags["image_size"]
        channels, intensity, epochs, batch_size = flags["channels"], flags["intensity"], flags["epochs"], flags["batch_size"]
        lr, weight_decay, patience, seed = flags["lr"], flags["weight_decay"], flags["patience"], flags["seed"]
        precision, accelerator, devices = flags["precision"], flags["accelerator"], str(flags["devices"])
        strategy, num_nodes, backbone, weights = flags["strategy"], flags["num_nodes"], flags["backbone"], flags["weights"]
        freeze_encoder, subnet, skip_bad = flags["freeze_encoder"], flags["subnet"], flags["skip_bad"]
        labelled_anomalies, resume, logger = flags["labelled_anomalies"], flags["resume"], flags["logger"]
        root = Path(root) if root else None
        weights = Path(weights) if weights else None

    values = _train_config(
        model=model, preset=preset, data=data, root=root, option=option, model_option=model_option,
        image_size=image_size, channels=channels, intensity=intensity, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, patience=patience, seed=seed, precision=precision, accelerator=accelerator,
        devices=int(devices) if devices.isdigit() else devices, backbone=backbone, weights=weights,
        freeze_encoder=freeze_encoder, subnet=subnet, skip_bad=skip_bad, strategy=strategy, num_nodes=num_nodes,
    )
    if labelled_anomalies:
        values["labelled_anomalies"] = labelled_anomalies
    values["logger"] = logger
    if stored is not None and stored.train is not None:  # a run's config: the flags given here change it
        values = stored.with_overrides(values, explicit)
        model, data, seed = values["model"], values.get("data", {}).get("layout", data), values.get("seed", seed)
    default_name = f"{from_run.name}-repeat" if from_run else f"{model}-{data}-s{seed}"
    run_dir = runs / (name or default_name)
    from aeflow.training import TrainConfig
    from aeflow.training.schema import check_model_options

    with user_errors():
        config = TrainConfig.from_dict(values)  # every option is checked before any data is read
        check_model_options(config.model, config.model_kwargs, where="-m/--model-option")
        typer.echo(_resolved(config, run_dir))
        train_run(config, run_dir, resume=resume)
    typer.echo(f"run saved in {run_dir}\n"
               f"next: aeflow test --run {run_dir}              (metrics, thresholds, report.html)\n"
               f"      aeflow predict --run {run_dir} IMAGES...  (score new images)")


def _resolved(config, run_dir: Path) -> str:
    """The resolved training config, as YAML a --config file may hold (under `train:`)."""
    import dataclasses

    import yaml

    text = yaml.safe_dump({"train": dataclasses.asdict(config)}, sort_keys=False, default_flow_style=None, width=78)
    return f"training {config.model} into {run_dir} with:\n{text.rstrip()}"


@app.command("test")
def test_run(
    run: Path = typer.Option(..., "--run", help="Run folder written by `aeflow train`."),
    rule: Optional[str] = typer.Option(None, "--threshold-rule", help="fpr:ALPHA (conformal_fpr), f1 (f1_optimal) or sensitivity:T (target_sensitivity); default: f1 when validation has anomalies, else fpr:0.05."),
    rule_option: list[str] = typer.Option([], "--threshold-option", help="Rule parameter as key=value, e.g. alpha=0.05 or target=0.95."),
    root: Optional[Path] = typer.Option(None, "--root", help="Where the data lives now, if it moved since training."),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    use_threshold: Optional[bool] = typer.Option(None, "--use-threshold/--keep-threshold", help="Make this rule's "
                                                 "threshold the one predict and serve use (threshold.json), or keep "
                                                 "the one in use; by default only a run without one gets it. Every "
                                                 "rule's threshold is kept in thresholds.json either way."),
    knn_audit: bool = typer.Option(False, "--knn-audit", help="Add a 1-nearest-neighbour detector on pooled "
                                   "EfficientNet-Lite0 features of the training normals to the shortcut audit."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Score the run's validation and test splits; write thresholds.json (threshold.json), metrics.json/.csv,
    scores.csv and report.html, with the shortcut audit (trivial image statistics beside the model)."""
    from aeflow.evaluation.assess import evaluate_run

    with user_errors():
        metrics = evaluate_run(run, rule=rule, rule_params=parse_options(rule_option), root=root,
                               batch_size=batch_size, device=device, use_threshold=use_threshold,
                               knn_audit=knn_audit, backend=backend)
    _print_metrics(metrics)
    if not metrics["threshold_in_use"]:
        typer.secho(f"kept {run / 'threshold.json'} as it was: predict and serve still use its rule; pass "
                    f"--use-threshold to use {metrics['threshold_rule']} (kept in thresholds.json)",
                    fg=typer.colors.YELLOW)
    typer.echo(f"report: {metrics['report']}")


def _print_metrics(metrics: dict) -> None:
    keys = ["image_AUROC", "image_AP", "image_F1", "image_ACC", "image_SEN", "image_SPE", "pixel_AUROC",
            "pixel_AUPRO", "threshold_rule", "threshold", "inference_backend"]
    keys += sorted(k for k in metrics if k.startswith("component/") and k.endswith("AUROC"))
    keys += sorted(k for k in metrics if k.startswith("shortcut/") and k.endswith("_test_AUROC"))
    keys += ["shortcut/best"]
    for key in keys:
        if key in metrics and metrics[key] is not None:
            value = metrics[key]
            typer.echo(f"  {key:32s} {value:.4f}" if isinstance(value, float) else f"  {key:32s} {value}")
    if metrics.get("shortcut/warning"):
        typer.secho(f"warning: {metrics['shortcut/warning']}", fg=typer.colors.YELLOW)


@app.command()
def demo(
    runs: Path = typer.Option(RUNS, "--runs", help="Folder that holds run folders."),
    epochs: int = typer.Option(10, "--epochs"),
):
    """Everything offline on the built-in synthetic phantoms: train AE-FLOW briefly, evaluate, write the report."""
    from aeflow.evaluation.assess import evaluate_run
    from aeflow.training import train as train_run

    run_dir = runs / "demo"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    values = {
        "preset": "quick", "image_size": 128, "max_epochs": epochs, "batch_size": 16, "seed": 0,
        "data": {"layout": "synthetic", "root": None, "n_train": 200, "n_val": 60, "n_test": 120, "size": 128},
    }
    with user_errors():
        train_run(values, run_dir)
        metrics = evaluate_run(run_dir)
    _print_metrics(metrics)
    typer.echo(f"report: {Path(metrics['report']).resolve()}")


@app.command("models")
def list_models(name: Optional[str] = typer.Argument(None, help="One model, described in full.")):
    """List the registered models: a line each with the pretrained weights it needs, whether it gives pixel
    anomaly maps ('maps') or only an image score ('no maps'), and its paper; with a NAME, that model in full
    (its method, departures from the paper, and its options with their defaults)."""
    from aeflow.models.catalog import describe_model, list_models

    with user_errors():
        typer.echo(describe_model(name) if name else list_models())


app.command("benchmark")(benchmark_command)
register_serving_commands(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
