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
from pathlib import Path
from typing import Optional

import typer

from aeflow.errors import AeflowError

app = typer.Typer(
    name="aeflow",
    help="Anomaly detection in medical images with AE-FLOW: train on normal images, score and localise anomalies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect data sets and layouts.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def parse_options(pairs: list[str]) -> dict:
    """Turn repeated `--option key=value` flags into a dict; values are parsed as JSON when they can be."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


DATA_HELP = "Data layout: synthetic, medmnist, magnetic_tile, mvtec, btad, chest_xray, oct2017, isic2018, brats2d, miic, folder."
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

    try:
        splits = load_data(data, root, image_size=None, skip_bad=skip_bad, **parse_options(option))
    except AeflowError as err:
        _fail(err)
    typer.echo(json.dumps(summarize(splits), indent=2, default=str) if as_json else describe(splits))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
