"""`aeflow benchmark`: several models trained and tested on one split, summed up in one leaderboard.

    run_benchmark(["ae", {"model": "padim", "model_kwargs": {"backbone": "efficientnet_lite0"}}],
                  {"layout": "medmnist", "root": "pneumoniamnist.npz"}, seeds=[0, 1, 2], out_dir="runs/board",
                  image_size=64, epochs=10, batch_size=32)

For every model and seed, `aeflow.training.train` writes a run folder `out_dir/<model>-s<seed>` and
`aeflow.evaluation.assess.evaluate_run` scores it (threshold fitted on validation only). Splits depend only on the
data options and the seed, so every model of a seed sees the same images; the benchmark checks this by comparing
the SHA-256 of each run's splits.json (file list and file checksums) and writes the result into the leaderboard.

What each run adds to its folder (`benchmark.json`), besides `metrics.json`:
- fit time: seconds spent in `train` (data loading, training or fitting, calibration);
- inference images/s: the test images divided by the seconds of one timed `predict_dataset` pass over them (batch
  32, maps not kept, image decoding included, eager PyTorch: not the fast path `aeflow test` takes), on the
  threads the benchmark runs with;
- peak memory: `ru_maxrss` of the process. That figure only ever grows, so each run gets a fresh (spawned) process
  of its own (`isolate=True`) and the figure is that run's peak, imports of torch and lightning included; with
  `isolate=False` it is the peak of the calling process so far, and the leaderboard says so.

A finished run folder is reused when its stored training config equals the one asked for, so an interrupted
benchmark continues where it stopped. The leaderboard (mean ± sample std over seeds, sorted by image AUROC) is
written as leaderboard.md, leaderboard.csv, leaderboard.html (one self-contained page) and leaderboard.json.

Spawned processes import the calling script again: a script that calls `run_benchmark` needs the usual
`if __name__ == "__main__":` guard (the command line and pytest need nothing).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import json
import logging
import math
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import typer

from aeflow.cli_errors import user_errors
from aeflow.errors import ConfigError

log = logging.getLogger("aeflow.evaluation.leaderboard")

RUN_FILE = "benchmark.json"
# Set by the benchmark for every model alike: the same images, split and size for all.
SHARED_OPTIONS = ("data", "seed", "image_size", "channels")
SPEED_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    key: str
    digits: int
    pixel: bool = False


COLUMNS = (
    Column("image AUROC", "image_AUROC", 3),
    Column("AP", "image_AP", 3),
    Column("F1", "image_F1", 3),
    Column("SEN", "image_SEN", 3),
    Column("SPE", "image_SPE", 3),
    Column("pixel AUROC", "pixel_AUROC", 3, pixel=True),
    Column("AUPRO", "pixel_AUPRO", 3, pixel=True),
    Column("fit time (s)", "fit_seconds", 0),
    Column("inference images/s", "test_images_per_second", 0),
    Column("peak memory (MB)", "peak_rss_mb", 0),
)


def run_benchmark(
    models: list[str | dict],
    data: dict,
    *,
    seeds: list[int],
    out_dir: str | Path,
    image_size: int,
    channels: int = 1,
    epochs: int,
    batch_size: int,
    model_kwargs: dict[str, dict] | None = None,
    threshold_rule: str | None = None,
    threshold_params: dict | None = None,
    isolate: bool = True,
) -> Path:
    """Train and evaluate every model for every seed on the same data; write the leaderboard; return out_dir.

    models: registry names, or dicts of TrainConfig fields ({"model": "aeflow", "preset": "chest_xray",
        "max_epochs": 5, ...}) with an optional "name" for the row and folder (default: the model name). The
        shared options (data, seed, image_size, channels) cannot be set per model.
    data: aeflow.data.load_data options, e.g. {"layout": "synthetic", "n_train": 50}.
    model_kwargs: row name -> extra constructor arguments, merged over those of `models`.
    threshold_rule / threshold_params: as for evaluate_run (default: F1-optimal when validation has anomalies,
        else a conformal 5% false-positive rate).
    isolate: run each (model, seed) in its own spawned process, for an honest per-run peak memory.
    """
    if not seeds:
        raise ConfigError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {seeds}")
    out_dir = Path(out_dir)
    entries = _entries(models, model_kwargs or {})
    configs = {
        (name, seed): {"max_epochs": epochs, "batch_size": batch_size, **spec, "data": data, "seed": seed,
                       "image_size": image_size, "channels": channels, "progress_bar": False}
        for name, spec in entries.items() for seed in seeds
    }
    import torch

    from aeflow.training import TrainConfig

    for config in configs.values():  # every mistake in a config shows before hours of training
        TrainConfig.from_dict(config)
    threads = torch.get_num_threads()
    threshold = {"rule": threshold_rule, "params": threshold_params or {}}
    for (name, seed), config in configs.items():
        run_dir = out_dir / f"{name}-s{seed}"
        if run_dir.exists() and any(run_dir.iterdir()):
            why_not = _why_not_reused(run_dir, config, threshold)
            if not why_not:
                log.info("%s: finished earlier with the same config and threshold rule, reused", run_dir)
                continue
            raise ConfigError(f"{run_dir} holds {why_not}: remove it and run the benchmark again")
        job = (config, str(run_dir), threshold, threads)
        if isolate:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                record = pool.submit(run_one, *job).result()
        else:
            record = run_one(*job)
        log.info("%s: image AUROC %.4f, fit %.1f s, %.1f test images/s, peak %.0f MB", run_dir.name,
                 record["image_AUROC"], record["fit_seconds"], record["test_images_per_second"],
                 record["peak_rss_mb"])
    write_leaderboard(out_dir, list(entries), seeds, isolated=isolate)
    return out_dir


def run_one(config: dict, run_dir: str, threshold: dict, threads: int) -> dict:
    """Train, evaluate (with threshold {"rule", "params"}) and time one (model, seed) into `run_dir`; writes and
    returns its benchmark.json record (with the image AUROC, for the progress log). Module-level, so that a
    spawned process can run it."""
    import torch

    from aeflow.evaluation.assess import evaluate_run
    from aeflow.training import train

    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    train(config, run_dir)
    fit_seconds = time.perf_counter() - started
    metrics = evaluate_run(run_dir, rule=threshold["rule"], rule_params=threshold["params"])
    model_config = json.loads((run_dir / "config.json").read_text())["model_config"]
    record = {
        "fit_seconds": fit_seconds,
        "test_images_per_second": _test_images_per_second(run_dir),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "threads": threads,
        "threshold": threshold,
        "splits_sha256": hashlib.sha256((run_dir / "splits.json").read_bytes()).hexdigest(),
        "backbone": model_config.get("backbone"),
        "pretrained": _pretrained(model_config),
    }
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))
    return {**record, "image_AUROC": metrics["image_AUROC"]}


def split_lists_sha256(run_dir: str | Path) -> str:
    """sha256 of a run's split file lists and data checksums (splits.json without the seed, root and options):
    equal lists give equal hashes, whatever seed or folder produced them."""
    from aeflow.data.records import SPLITS_FILE

    document = json.loads((Path(run_dir) / SPLITS_FILE).read_text())
    lists = {"splits": document["splits"], "checksums": document["checksums"]}
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def write_leaderboard(out_dir: str | Path, names: list[str], seeds: list[int], *, isolated: bool = True) -> dict:
    """Aggregate the finished runs `out_dir/<name>-s<seed>` into leaderboard.{md,csv,html,json}; returns the
    JSON document (rows sorted by mean image AUROC, best first)."""
    from aeflow.evaluation.metrics import strict_json, aggregate

    out_dir = Path(out_dir)
    runs = {name: [_read_run(out_dir / f"{name}-s{seed}") for seed in seeds] for name in names}
    rows, digests, setups = [], {}, {}
    for name, model_runs in runs.items():
        for seed in seeds:
            digests.setdefault(str(seed), {})[name] = split_lists_sha256(out_dir / f"{name}-s{seed}")
        _, first_record, first_config = model_runs[0]
        stats = aggregate([{**metrics, **record} for metrics, record, _ in model_runs])
        rows.append({"model": name, "backbone": first_record["backbone"] or "none",
                     "pretrained": first_record["pretrained"], "n_seeds": len(model_runs),
                     "stats": {c.key: stats[c.key] for c in COLUMNS if c.key in stats}})
        setups[name] = {k: first_config["train"][k] for k in ("model", "preset", "max_epochs", "batch_size", "lr")}
        setups[name]["model_config"] = first_config["model_config"]
    rows.sort(key=lambda row: -row["stats"]["image_AUROC"]["mean"])
    metrics, record, config = runs[names[0]][0]
    document = {
        "data": config["train"]["data"],
        "image_size": config["train"]["image_size"],
        "channels": config["train"]["channels"],
        "seeds": seeds,
        "n_test_normal": metrics["n_test_normal"],
        "n_test_anomalous": metrics["n_test_anomalous"],
        "threshold_rule": metrics["threshold_rule"],
        "threads": record["threads"],
        "peak_memory": "per run (own process)" if isolated else "of the benchmark process so far",
        "splits_sha256": digests,
        "same_split_per_seed": {seed: len(set(d.values())) == 1 for seed, d in digests.items()},
        "setups": setups,
        "rows": rows,
    }
    columns = [c for c in COLUMNS if not c.pixel or any(row["stats"].get(c.key, {}).get("n") for row in rows)]
    (out_dir / "leaderboard.json").write_text(json.dumps(strict_json(document), indent=2, allow_nan=False) + "\n")
    (out_dir / "leaderboard.md").write_text(_markdown(document, columns))
    (out_dir / "leaderboard.html").write_text(_html(document, columns))
    with (out_dir / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "backbone", "pretrained", "n_seeds"]
                        + [f"{c.key}_{part}" for c in columns for part in ("mean", "std")])
        for row in rows:
            writer.writerow([row["model"], row["backbone"], row["pretrained"], row["n_seeds"]]
                            + [row["stats"].get(c.key, {}).get(part, math.nan) for c in columns
                               for part in ("mean", "std")])
    return document


# --- command line --------------------------------------------------------------------------------------------


def benchmark_command(
    models: str = typer.Option(..., "--models", help="Comma-separated model names, e.g. aeflow,padim,patchcore."),
    data: str = typer.Option("synthetic", "--data", help="Data layout (see `aeflow data describe`)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Root folder (or .npz file) of the data set."),
    option: list[str] = typer.Option([], "--option", "-o", help="Layout option as key=value (repeatable)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds; every model runs every seed."),
    image_size: int = typer.Option(64, "--image-size", help="Side in pixels, a multiple of 16."),
    channels: int = typer.Option(1, "--channels", help="1 keeps grayscale; 3 repeats it / keeps colour."),
    epochs: int = typer.Option(10, "--epochs", help="Maximum epochs of the gradient-trained models."),
    batch_size: int = typer.Option(32, "--batch-size"),
    model_option: list[str] = typer.Option(
        [], "--model-option", "-m",
        help="MODEL.key=value (repeatable): a constructor argument of that model (padim.backbone=efficientnet_lite0) "
             "or a training option for it (aeflow.preset=chest_xray, draem.max_epochs=5)."),
    intensity: Optional[str] = typer.Option(None, "--intensity", help="Intensity rule for every model, as in "
                                            "`aeflow train --intensity` (default: the layout's auto rule)."),
    rule: Optional[str] = typer.Option(None, "--threshold-rule", help="fpr:ALPHA, f1 or sensitivity:T (long names "
                                                                      "too; default: as `aeflow test`)."),
    rule_option: list[str] = typer.Option([], "--threshold-option", help="Rule parameter as key=value."),
    out: Path = typer.Option(Path("runs/leaderboard"), "--out", help="Folder for the run folders and leaderboard."),
    isolate: bool = typer.Option(True, "--isolate/--in-process", help="One process per run (honest peak memory) "
                                                                      "or all in this one (faster start)."),
):
    """Train and test several models on one split and write a leaderboard (Markdown, CSV, HTML)."""
    from aeflow.cli_options import parse_options

    names = [name.strip() for name in models.split(",") if name.strip()]
    try:
        seed_list = [int(seed) for seed in seeds.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    specs = _model_specs(names, parse_options(model_option))
    data_options = {"layout": data, "root": str(root) if root else None, **parse_options(option)}
    if intensity is not None:  # only when given, so that finished runs without it are still reused
        from aeflow.data.intensity import parse_intensity

        with user_errors():
            data_options["intensity"] = str(parse_intensity(intensity))
    handler = logging.StreamHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with user_errors():
            from aeflow.training.schema import check_model_options

            for spec in specs:  # before any data is read or any model trained
                check_model_options(spec["model"], spec["model_kwargs"], where=f"-m {spec['model']}.*")
            run_benchmark(specs, data_options, seeds=seed_list, out_dir=out, image_size=image_size,
                          channels=channels, epochs=epochs, batch_size=batch_size, threshold_rule=rule,
                          threshold_params=parse_options(rule_option), isolate=isolate)
    finally:
        log.removeHandler(handler)
    typer.echo((out / "leaderboard.md").read_text())
    typer.echo(f"leaderboard: {out / 'leaderboard.md'}, .csv, .html")


# --- helpers -------------------------------------------------------------------------------------------------


def _model_specs(names: list[str], options: dict) -> list[dict]:
    """`-m MODEL.key=value` options -> one TrainConfig dict per model: TrainConfig fields go to the top level,
    anything else into model_kwargs."""
    from aeflow.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    specs = {name: {"model": name, "model_kwargs": {}} for name in names}
    for dotted, value in options.items():
        name, _, key = dotted.partition(".")
        if not key or name not in specs:
            raise typer.BadParameter(f"expected MODEL.key=value with MODEL one of {', '.join(names)}, got {dotted!r}",
                                     param_hint="--model-option")
        if key in fields:
            specs[name][key] = value
        else:
            specs[name]["model_kwargs"][key] = value
    return list(specs.values())


def _entries(models: list[str | dict], model_kwargs: dict[str, dict]) -> dict[str, dict]:
    """Row name -> the model's own TrainConfig fields, with `model_kwargs[name]` merged in."""
    entries: dict[str, dict] = {}
    for item in models:
        spec = {"model": item} if isinstance(item, str) else dict(item)
        if "model" not in spec:
            raise ConfigError(f"a model given as a dict needs a 'model' entry: {item}")
        name = spec.pop("name", spec["model"])
        shared = set(SHARED_OPTIONS) & set(spec)
        if shared:
            raise ConfigError(f"{name}: {', '.join(sorted(shared))} are the same for every model of a benchmark "
                              f"and cannot be set per model")
        if name in entries:
            raise ConfigError(f"model {name!r} is listed twice; give one of them another 'name'")
        spec["model_kwargs"] = {**spec.get("model_kwargs", {}), **model_kwargs.get(name, {})}
        entries[name] = spec
    unknown = set(model_kwargs) - set(entries)
    if unknown:
        raise ConfigError(f"model_kwargs for model(s) not in the benchmark: {', '.join(sorted(unknown))}")
    if not entries:
        raise ConfigError("give at least one model")
    return entries


def _why_not_reused(run_dir: Path, config: dict, threshold: dict) -> str:
    """Empty when `run_dir` holds a finished benchmark run of exactly `config`, evaluated with `threshold`, whose
    model is the one the code builds now; else what the folder holds instead. A run trained before one of its
    model's defaults changed records the same train config but another model config: it is not reused."""
    from aeflow.models.base import saved_model_options
    from aeflow.training import TrainConfig
    from aeflow.training.run import model_config_now, without_weight_source

    if not all((run_dir / name).is_file() for name in (RUN_FILE, "metrics.json", "config.json")):
        return "an unfinished run"
    document = json.loads((run_dir / "config.json").read_text())
    train_config = TrainConfig.from_dict(config)
    if document["train"] != json.loads(json.dumps(dataclasses.asdict(train_config), default=str)):
        return "a run with another config"
    if json.loads((run_dir / RUN_FILE).read_text()).get("threshold") != threshold:
        return "a run evaluated with another threshold rule"
    recorded = without_weight_source(saved_model_options(train_config.model, document["model_config"]))
    now = model_config_now(train_config, recorded.get("anomaly_types") or [])
    changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed)
        return f"a run of the same config whose model has since changed its defaults ({shown})"
    return ""


def _read_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """(metrics.json, benchmark.json, config.json) of a finished run; null metrics (undefined) become NaN."""
    try:
        metrics, record, config = (json.loads((run_dir / name).read_text())
                                   for name in ("metrics.json", RUN_FILE, "config.json"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{run_dir}: not a finished benchmark run ({Path(exc.filename).name} missing)") from None
    return {k: math.nan if v is None else v for k, v in metrics.items()}, record, config


def _test_images_per_second(run_dir: Path) -> float:
    """Test images per second of one `predict_dataset` pass over the run's test split (decoding included), in eager
    PyTorch: the column compares the models' own code, and stays comparable with boards built before the fast
    inference path (aeflow.backends)."""
    from aeflow.data import DataSplits, load_splits
    from aeflow.inference import predict_dataset
    from aeflow.training import load_run

    model, config = load_run(run_dir)
    train_config = config["train"]
    test = DataSplits.from_records(load_splits(run_dir), image_size=train_config["image_size"],
                                   channels=train_config["channels"],
                                   intensity=train_config["data"].get("intensity", "auto"), validate=False).test
    started = time.perf_counter()
    predict_dataset(model, test, batch_size=SPEED_BATCH_SIZE, keep_maps=False, backend="eager")
    return len(test) / (time.perf_counter() - started)


def _pretrained(model_config: dict) -> str:
    if not model_config.get("pretrained"):
        return "no"
    return "yes (frozen)" if model_config.get("freeze_encoder", True) else "yes (fine-tuned)"


def _cell(stat: dict | None, digits: int) -> str:
    if not stat or not stat["n"]:
        return "n/a"
    if math.isnan(stat["std"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _table(document: dict, columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "backbone", "pretrained"] + [c.title for c in columns] + ["n seeds"]
    body = [[row["model"], row["backbone"], row["pretrained"]]
            + [_cell(row["stats"].get(c.key), c.digits) for c in columns] + [str(row["n_seeds"])]
            for row in document["rows"]]
    return header, body


def _notes(document: dict) -> list[str]:
    """The set-up in sentences, shared by the Markdown and the HTML page."""
    data = {k: v for k, v in document["data"].items() if v is not None}
    same = document["same_split_per_seed"]
    split_lines = [
        f"seed {seed}: file lists sha256 {next(iter(digests.values()))[:16]} for all {len(digests)} models"
        if same[seed] else f"seed {seed}: THE SPLITS DIFFER between models: {digests}"
        for seed, digests in document["splits_sha256"].items()
    ]
    every_seed = {d for digests in document["splits_sha256"].values() for d in digests.values()}
    if len(every_seed) == 1 and len(split_lines) > 1:
        split_lines = [f"file lists sha256 {every_seed.pop()[:16]} for every seed and model (the layout's own "
                       f"split; the seed changes the training only)"]
    return [
        f"Data: {json.dumps(data)}; {document['image_size']} px, {document['channels']} channel(s); test set "
        f"{document['n_test_normal']} normal / {document['n_test_anomalous']} anomalous images.",
        f"Seeds {', '.join(map(str, document['seeds']))}; cells are mean ± sample std over seeds. Threshold: "
        f"{document['threshold_rule']}, fitted on the validation split only. Sorted by image AUROC.",
        "Same split for every model: " + "; ".join(split_lines) + ".",
        f"Fit time: seconds in train() (data loading, training or fitting, calibration). Inference: test images / "
        f"seconds of one predict_dataset pass (batch {SPEED_BATCH_SIZE}, decoding included, eager PyTorch). "
        f"{document['threads']} thread(s). Peak memory: ru_maxrss {document['peak_memory']}, imports included.",
    ]


def _setup_lines(document: dict) -> list[str]:
    return [f"{name}: {json.dumps(setup)}" for name, setup in document["setups"].items()]


def _markdown(document: dict, columns: list[Column]) -> str:
    header, body = _table(document, columns)
    lines = [f"# Leaderboard: {document['data'].get('layout')}", ""]
    lines += [f"- {note}" for note in _notes(document)] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "Set-ups (training options and constructor arguments):", ""]
    lines += [f"- `{line}`" for line in _setup_lines(document)]
    return "\n".join(lines) + "\n"


def _html(document: dict, columns: list[Column]) -> str:
    header, body = _table(document, columns)
    esc = html.escape
    head = "".join(f"<th>{esc(title)}</th>" for title in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>" for cells in body)
    notes = "".join(f"<li>{esc(note)}</li>" for note in _notes(document))
    setups = "".join(f"<li><code>{esc(line)}</code></li>" for line in _setup_lines(document))
    title = esc(f"Leaderboard: {document['data'].get('layout')}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; }}
td:nth-child(-n+3), th:nth-child(-n+3) {{ text-align: left; }}
tbody tr:first-child {{ font-weight: bold; }}
li {{ margin: 0.2em 0; }}
</style></head>
<body><h1>{title}</h1>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<ul>{notes}</ul>
<h2>Set-ups</h2><ul>{setups}</ul>
</body></html>
"""

