"""The `folder` layout reads a ready-made train / val / test tree as it is, and every layout warns about a
validation or test split that lacks a class."""

import pytest
from conftest import write_images
from typer.testing import CliRunner

from aeflow.data import load_data
from aeflow.data.layouts import SplitWarning, describe_layouts
from aeflow.errors import DataError


def _tree(root, *, val=True, test_normals=True):
    write_images(root / "train" / "normal", [f"t{i}" for i in range(6)])
    if val:
        write_images(root / "val" / "normal", ["vn0", "vn1"], seed=3)
        write_images(root / "val" / "abnormal", ["va0", "va1"], seed=4)
    if test_normals:
        write_images(root / "test" / "normal", ["sn0", "sn1", "sn2"], seed=5)
    write_images(root / "test" / "abnormal", ["sa0", "sa1"], seed=6)


def _names(dataset):
    return sorted((r.source.rsplit("/", 1)[-1], r.label) for r in dataset.records)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_ready_made_split_is_read_as_given_for_every_seed(tmp_path, seed):
    _tree(tmp_path)
    data = load_data("folder", tmp_path, image_size=8, seed=seed)
    assert _names(data.train) == [(f"t{i}.png", 0) for i in range(6)]
    # the abnormal validation images stay in validation (listing folders used to move all of them to test)
    assert _names(data.val) == [("va0.png", 1), ("va1.png", 1), ("vn0.png", 0), ("vn1.png", 0)]
    assert _names(data.test) == [("sa0.png", 1), ("sa1.png", 1), ("sn0.png", 0), ("sn1.png", 0), ("sn2.png", 0)]
    assert {r.anomaly_type for r in data.val.records if r.label} == {"abnormal"}


def test_without_a_val_folder_training_normals_are_held_out_and_the_missing_class_is_warned(tmp_path):
    _tree(tmp_path, val=False)
    with pytest.warns(SplitWarning, match="validation split .* holds no anomalous images; the kept checkpoint"):
        data = load_data("folder", tmp_path, image_size=8, val_fraction=0.34)
    assert (len(data.train), len(data.val)) == (4, 2) and {r.label for r in data.val.records} == {0}
    assert {r.source for r in data.train.records}.isdisjoint(r.source for r in data.val.records)


def test_a_test_split_without_normals_is_warned(tmp_path):
    _tree(tmp_path, test_normals=False)
    with pytest.warns(SplitWarning, match=r"test split \(2 images\) holds no normal images"):
        load_data("folder", tmp_path, image_size=8)


def test_split_carve_keeps_the_old_reading_and_given_checks_its_folders(tmp_path):
    _tree(tmp_path)
    with pytest.warns(SplitWarning):  # carving puts every abnormal image in test: validation is normal-only
        carved = load_data("folder", tmp_path / "train", image_size=8, split="carve", test_fraction=0.34)
    assert len(carved.test) == 2 and len(carved.train) + len(carved.val) == 4
    (tmp_path / "empty" / "train").mkdir(parents=True), (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match="no class folders with images"):
        load_data("folder", tmp_path / "empty", image_size=8, split="given")


def test_layouts_are_listed_with_their_options():
    text = describe_layouts()
    assert "folder\n" in text and "split='auto'" in text and "mvtec\n" in text
    assert all(len(line) <= 80 for line in describe_layouts("folder").splitlines())
    from aeflow.cli import app

    result = CliRunner().invoke(app, ["data", "layouts", "folder"])
    assert result.exit_code == 0 and "split='given' reads a ready-made split" in result.output
