"""`aeflow models` says, per model, whether it gives pixel anomaly maps, read from the class without building it."""

from __future__ import annotations

from typer.testing import CliRunner

from aeflow.cli import app
from aeflow.models import available_models
from aeflow.models.base import _REGISTRY, AnomalyModel


class _ScoreOnly(AnomalyModel):
    """One number per image."""

    name = "zz_score_only"
    gives_pixel_maps = False


class _MapsByOption(AnomalyModel):
    """Maps only when asked."""

    name = "zz_maps_by_option"

    def __init__(self, pixel_level: bool = False):
        super().__init__()


def listing(monkeypatch) -> dict[str, str]:
    monkeypatch.setitem(_REGISTRY, _ScoreOnly.name, _ScoreOnly)
    monkeypatch.setitem(_REGISTRY, _MapsByOption.name, _MapsByOption)
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    return {line.split()[0]: line for line in lines}


def test_every_model_line_says_maps_or_no_maps(monkeypatch):
    by_name = listing(monkeypatch)
    assert sorted(by_name) == available_models()
    for name, line in by_name.items():
        assert (" no maps " in line) != (" maps " in line.replace(" no maps ", " ")), line
    assert " no maps " in by_name["zz_score_only"]  # the class attribute
    assert " no maps " in by_name["zz_maps_by_option"]  # an option whose default is off
    assert " no maps " not in by_name["knn"]  # k-NN's patch bank is on by default (pixel_level=True)
    assert " no maps " not in by_name["aeflow"]
