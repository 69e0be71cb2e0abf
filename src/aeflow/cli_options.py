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
