"""A run folder's config.json is checked against the schema when the run is loaded: a crafted config loads or is a
ConfigError / CheckpointError naming the key, never a traceback or a huge allocation."""

from __future__ import annotations

import copy
import json
import resource
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving.conftest import build_run
from typer.testing import CliRunner

from aeflow.cli import app
from aeflow.errors import CheckpointError, ConfigError
from aeflow.training import load_run
from aeflow.training.run import CONFIG_FILE, MODEL_FILE
from aeflow.training.schema import MAX_MODEL_INT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("schema") / "run")


@pytest.fixture(scope="module")
def document(run_dir):
    return json.loads((run_dir / CONFIG_FILE).read_text())


def with_config(run_dir, target, document) -> object:
    """A copy of the run whose config.json is `document` (the weights are linked, not copied)."""
    target.mkdir(exist_ok=True)
    weights = target / MODEL_FILE
    if not weights.exists():
        weights.symlink_to(run_dir / MODEL_FILE)
    (target / CONFIG_FILE).write_text(json.dumps(document) if not isinstance(document, str) else document)
    return target


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edited(document, section, key, value):
    changed = copy.deepcopy(document)
    changed[section][key] = value
    return changed


@pytest.mark.parametrize("section, key, value, message", [
    ("model_config", "decoder_widths", [200000] * 3, r"model_config: decoder_widths item 0 is 200000, outside"),
    ("model_config", "flow_steps", 10**9, r"model_config: flow_steps is 1000000000, outside"),
    ("model_config", "flow_step", 4, r"model 'aeflow' has no option 'flow_step'; its options are: .*flow_steps"),
    ("model_config", "backbone", "x" * 300, r"backbone is a string of 300 characters"),
    ("model_config", "backbone", {"nested": 1}, r"model_config does not build a 'aeflow' model"),
    ("model_config", "decoder_widths", [[[[[1]]]]], r"decoder_widths item 0 item 0 item 0 item 0 is nested too "),
    ("train", "image_size", -16, r"train.image_size must be in 16..4096, got -16"),
    ("train", "image_size", 200000, r"train.image_size must be in 16..4096, got 200000"),
    ("train", "image_size", 72, r"train.image_size must be a multiple of 16"),
    ("train", "channels", 5, r"train.channels must be one of 1, 3"),
    ("train", "lr", "fast", r"train.lr must be a finite number"),
    ("train", "model", "resnet_magic", r"unknown model 'resnet_magic'"),
    ("train", "unknown_keyword", 1, r"unknown training setting\(s\) 'unknown_keyword'"),
])
def test_each_violation_is_a_config_error_naming_the_key(run_dir, tmp_path, document, section, key, value, message):
    folder = with_config(run_dir, tmp_path / "run", edited(document, section, key, value))
    before = peak_rss_mb()
    with pytest.raises(ConfigError, match=message) as error:
        load_run(folder)
    assert str(folder / CONFIG_FILE) in str(error.value)
    assert peak_rss_mb() - before < 200  # [200000] * 3 decoder widths alone would be about 1.4 TB


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("train"), r"no 'train' section"),
    (lambda d: d.update(model_config=[1, 2]), r"'model_config' must be an object"),
    (lambda d: d["train"].pop("image_size"), r"training setting\(s\) 'image_size' missing"),
])
def test_missing_or_mistyped_sections_are_config_errors(run_dir, tmp_path, document, change, message):
    changed = copy.deepcopy(document)
    change(changed)
    with pytest.raises(ConfigError, match=message):
        load_run(with_config(run_dir, tmp_path / "run", changed))


def test_not_json_or_not_an_object_is_a_checkpoint_error(run_dir, tmp_path):
    for text in ("{not json", "[1, 2, 3]", "1" * 10):
        with pytest.raises(CheckpointError, match="config"):
            load_run(with_config(run_dir, tmp_path / "run", text))


def test_a_config_within_bounds_that_does_not_fit_the_weights_is_refused_before_building(run_dir, tmp_path,
                                                                                        document, monkeypatch):
    import aeflow.training.run as run_module

    folder = with_config(run_dir, tmp_path / "run", edited(document, "model_config", "decoder_widths",
                                                           [MAX_MODEL_INT] * 3))
    monkeypatch.setattr(run_module, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(CheckpointError, match=r"weights do not fit the model in config.json: .*of another shape"):
        load_run(folder)


def test_the_unchanged_config_loads(run_dir, tmp_path, document):
    model, config = load_run(with_config(run_dir, tmp_path / "run", document))
    assert config == document and not model.training


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=True)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutated_config_loads_or_raises_the_projects_error(run_dir, tmp_path, document, data):
    changed = copy.deepcopy(document)
    section = data.draw(st.sampled_from(["train", "model_config", None]))
    target = changed if section is None else changed[section]
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=10))
    if data.draw(st.booleans()) and key in target:
        del target[key]
    else:
        target[key] = data.draw(_json)
    before = peak_rss_mb()
    try:
        load_run(with_config(run_dir, tmp_path / "run", changed))
    except (ConfigError, CheckpointError):
        pass
    assert peak_rss_mb() - before < 300


def test_train_refuses_a_misspelt_model_option_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--runs", str(tmp_path), "--name", "r",
                                      "-m", "flow_step=4"])
    assert result.exit_code == 2
    assert "model 'aeflow' has no option 'flow_step'; its options are:" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_copy_of_a_run_still_loads(run_dir, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(run_dir, copy_dir)
    assert load_run(copy_dir)[1]["train"]["model"] == "aeflow"


def test_every_registered_model_fits_its_own_saved_config(tmp_path):
    """The meta-device check accepts what training writes, for every model (placeholder buffers included)."""
    from aeflow.models import available_models, create_model
    from aeflow.models.base import _REGISTRY
    from aeflow.training import save_checkpoint
    from aeflow.training.checkpoint import checkpoint_shapes
    from aeflow.training.schema import check_model_options, check_weights_fit, model_keywords

    checked = []
    for name in available_models():
        parameters, _ = model_keywords(_REGISTRY[name])
        kwargs = {k: v for k, v in (("pretrained", False), ("backbone", "efficientnet_lite0")) if k in parameters}
        try:
            model = create_model(name, **kwargs)
        except ConfigError as error:
            # The zero-shot models need their optional extra; without it they refuse to build, saying how to get it.
            if "pip install 'aeflow[zeroshot]'" in str(error):
                continue
            raise
        checked.append(name)
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint({"model": name, "config": model.config(), "state_dict": model.state_dict()}, path)
        config = json.loads(json.dumps(model.config()))  # as config.json holds it
        check_model_options(name, config)
        check_weights_fit(name, {**config, **kwargs}, checkpoint_shapes(path, model_file=True), path, "config.json")
    assert {"aeflow", "padim", "patchcore", "supervised_probe"} <= set(checked)
