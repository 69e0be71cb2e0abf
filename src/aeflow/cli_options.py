"""Parsing of the command line's repeated `key=value` options, shared by every command (cli.py and the benchmark
command in aeflow.evaluation.leaderboard), so that nothing below the command line imports aeflow.cli."""

from __future__ import annotations

import json

import typer


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


BACKEND_HELP = ("How the model scores: auto (the fastest of eager PyTorch, channels-last and onnxruntime on this "
                "machine whose outputs match eager's within 1e-4, measured once per loaded model), eager, "
                "channels_last or onnxruntime.")
