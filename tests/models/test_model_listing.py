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


def test_a_named_model_is_described_in_full_with_its_options():
    result = CliRunner().invoke(app, ["models", "fastflow"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.splitlines()[0] == "fastflow"
    assert "weights: wide_resnet50_2; pixel anomaly maps" in text
    assert "arXiv:2111.07677" in text  # past the 24 characters the table has room for
    assert "Deviation from the paper" in text  # every paragraph of the module docstring, not only the first
    assert "flow_steps=8" in text and "clamp=2.0" in text
    assert all(len(line) <= 80 for line in text.splitlines() if not line.startswith("      "))


def test_inherited_options_show_the_defaults_the_model_uses():
    """aeflow_gmm forwards **options to AE-FLOW and changes one default (reference): the listing says what a run
    gets, and it matches the built model's attribute."""
    from aeflow.models import create_model
    from aeflow.models.catalog import model_facts

    facts = model_facts("aeflow_gmm")
    assert facts.options["gamma"] == "validated"  # its own
    assert facts.options["stages"] == (8, 16)  # AE-FLOW's, forwarded
    built = create_model("aeflow_gmm", backbone="efficientnet_lite0", pretrained=False, flow_steps=1,
                         decoder_widths=[8, 8, 8])
    assert facts.options["reference"] == built.reference == "position"
    assert model_facts("aeflow").options["reference"] == "memory"


def test_an_unknown_model_name_is_an_error_that_lists_the_models():
    result = CliRunner().invoke(app, ["models", "fastflw"])
    assert result.exit_code != 0
    assert "unknown model 'fastflw'" in result.output and "fastflow" in result.output
