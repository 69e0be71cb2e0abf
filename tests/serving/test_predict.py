"""`predict_paths` on real file formats: CSV rows, skipped files, overlays, DICOM frames and NIfTI slices."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from aeflow.errors import BadFileError, ConfigError
from aeflow.serving.predict import predict_paths
from aeflow.serving.runtime import LoadedRun

from .conftest import phantoms, write_dicom


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def loaded(run_dir):
    return LoadedRun(run_dir)


def as_uint16(image: np.ndarray) -> np.ndarray:
    return (image * 65535).round().astype(np.uint16)


def test_folder_with_dicom_16bit_png_and_corrupt_file(loaded, tmp_path):
    images = phantoms(2, seed=3)[:, 0].numpy()
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    dicom = write_dicom(folder / "chest.dcm", as_uint16(images[0]))
    png = folder / "sub" / "knee.png"
    Image.fromarray(as_uint16(images[1])).save(png)
    good = png.read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("not an image: ignored, not skipped")

    out = tmp_path / "preds"
    csv_path = predict_paths(loaded.run_dir, [folder], out, batch_size=4, run=loaded, progress=False)

    rows = {row["path"]: row for row in read_csv(csv_path)}
    assert set(rows) == {str(dicom), str(png)}
    direct = loaded.score_samples([loaded.dataset([str(dicom), str(png)])[i] for i in range(2)])
    for path, expected in zip((dicom, png), direct):
        row = rows[str(path)]
        assert float(row["pred_score"]) == pytest.approx(expected.pred_score, rel=1e-6)
        assert int(row["pred_label"]) == int(float(row["pred_score"]) > loaded.threshold.value)
        assert float(row["threshold"]) == pytest.approx(loaded.threshold.value)
        assert row["threshold_rule"] == loaded.threshold.rule
        overlay = Image.open(out / row["overlay"])
        assert overlay.mode == "RGB" and overlay.width >= 64
    skipped = read_csv(out / "skipped.csv")
    assert [s["path"] for s in skipped] == [str(folder / "broken.png")]
    assert skipped[0]["reason"]


def test_multiframe_dicom_and_nifti_slices(loaded, tmp_path):
    import nibabel

    frames = as_uint16(phantoms(3, seed=4)[:, 0].numpy())
    cine = write_dicom(tmp_path / "cine.dcm", frames)
    volume = np.stack([phantoms(5, seed=6)[i, 0].numpy() * 1000 for i in range(5)], axis=2)  # 64 x 64 x 5
    nifti = tmp_path / "brain.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(nifti))

    csv_path = predict_paths(loaded.run_dir, [cine, nifti], tmp_path / "out", slice_range=(1, 4), overlays=False,
                             run=loaded, progress=False)
    rows = read_csv(csv_path)
    assert [(r["path"], r["slice"]) for r in rows] == (
        [(str(cine), f"frame={i}") for i in range(3)] + [(str(nifti), f"axis=2,slice={i}") for i in (1, 2, 3)]
    )
    scores = [float(r["pred_score"]) for r in rows]
    assert len(set(scores)) == len(scores)  # different images, different scores: each frame/slice really scored
    assert all(r["overlay"] == "" for r in rows) and not any((tmp_path / "out" / "overlays").iterdir())


def test_strict_mode_stops_at_a_bad_file_and_keeps_earlier_rows(loaded, tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(as_uint16(phantoms(1)[0, 0].numpy())).save(good)
    bad = tmp_path / "b.png"  # a header that reads, pixel data that does not: found when it is decoded
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadFileError) as error:
        predict_paths(loaded.run_dir, [good, bad], tmp_path / "out", batch_size=1, skip_bad=False, run=loaded,
                      progress=False)
    assert error.value.path == str(bad)
    assert [r["path"] for r in read_csv(tmp_path / "out" / "predictions.csv")] == [str(good)]
    backend = json.loads((tmp_path / "out" / "inference_backend.json").read_text())
    assert backend["backend"] == loaded.predictor.name


def test_missing_threshold_says_how_to_make_one(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "threshold.json").unlink()
    with pytest.raises(ConfigError, match="aeflow test --run"):
        LoadedRun(copy)


def test_shards_split_the_work_without_overlap(loaded, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i, image in enumerate(phantoms(5, seed=9)[:, 0].numpy()):
        Image.fromarray(as_uint16(image)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    shards = [predict_paths(loaded.run_dir, [folder], out, shard=(i, 2), run=loaded, progress=False) for i in (0, 1)]
    assert [p.name for p in shards] == ["predictions.0-of-2.csv", "predictions.1-of-2.csv"]
    paths = [[row["path"] for row in read_csv(p)] for p in shards]
    assert len(paths[0]) == 3 and len(paths[1]) == 2
    assert sorted(paths[0] + paths[1]) == sorted(str(folder / f"{i}.png") for i in range(5))
    assert len(list((out / "overlays").iterdir())) == 5


def test_a_folder_with_results_is_refused_unless_overwritten(loaded, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(as_uint16(phantoms(1)[0, 0].numpy())).save(image)
    out = tmp_path / "out"
    predict_paths(loaded.run_dir, [image], out, run=loaded, progress=False)
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds results .*choose a new --out folder, or pass --overwrite"):
        predict_paths(loaded.run_dir, [tmp_path / "missing.png"], out, run=loaded, progress=False)
    assert (out / "predictions.csv").read_bytes() == before  # the earlier results are untouched
    stale = out / "overlays" / "000007_old.png"
    stale.write_bytes(b"an overlay of an earlier run")
    predict_paths(loaded.run_dir, [image], out, run=loaded, progress=False, overwrite=True, overlays=False)
    assert not stale.exists() and not any((out / "overlays").iterdir())  # no overlay of another run beside it


def test_nothing_scored_is_an_error_after_listing_why(loaded, tmp_path):
    from aeflow.errors import DataError

    with pytest.raises(DataError, match=r"nothing could be scored"):
        predict_paths(loaded.run_dir, [tmp_path / "missing.png"], tmp_path / "out", run=loaded, progress=False)
    assert read_csv(tmp_path / "out" / "skipped.csv") == [{"path": str(tmp_path / "missing.png"),
                                                           "reason": "file not found"}]


def test_files_of_odd_channel_counts_are_skipped_and_the_rest_of_the_batch_scored(loaded, tmp_path):
    import tifffile

    folder = tmp_path / "mixed"
    folder.mkdir()
    names = []
    for i, image in enumerate(phantoms(4, seed=5)[:, 0].numpy()):
        Image.fromarray(as_uint16(image)).save(folder / f"{i}_good.png")
        names.append(f"{i}_good.png")
        if i in (1, 2):  # bad files in the middle of a batch: they broke torch.stack before
            tifffile.imwrite(folder / f"{i}_bad.tif", np.zeros((64, 64, 3 + i), np.uint8), photometric="minisblack",
                             planarconfig="contig")
    np.savez(folder / "two.npz", train_images=np.zeros((1, 28, 28, 2), np.uint8))
    csv_path = predict_paths(loaded.run_dir, [folder, folder / "two.npz"], tmp_path / "out", batch_size=8,
                             run=loaded, progress=False, overlays=False)
    assert sorted(r["path"] for r in read_csv(csv_path)) == sorted(str(folder / n) for n in names)
    skipped = {r["path"]: r["reason"] for r in read_csv(tmp_path / "out" / "skipped.csv")}
    assert set(skipped) == {str(folder / "1_bad.tif"), str(folder / "2_bad.tif"), str(folder / "two.npz")}
    assert all("channels per pixel" in reason or "samples per pixel" in reason for reason in skipped.values())


def test_thresholds_are_kept_per_rule_and_the_one_in_use_is_chosen(loaded, tmp_path):
    from aeflow.evaluation.thresholds import (THRESHOLDS_FILE, Threshold, fitted_thresholds, save_threshold,
                                              threshold_in_use)

    run = tmp_path / "run"
    shutil.copytree(loaded.run_dir, run)
    first = threshold_in_use(run)
    other = Threshold(value=first.value + 1.0, rule="f1_optimal", fitted_on="x", n_fit=3)
    assert save_threshold(run, other) is False  # the run has one in use: it is not replaced silently
    assert threshold_in_use(run) == first and set(fitted_thresholds(run)) == {first.rule, "f1_optimal"}
    assert threshold_in_use(run, "f1_optimal") == other
    image = tmp_path / "a.png"
    Image.fromarray(as_uint16(phantoms(1)[0, 0].numpy())).save(image)
    csv_path = predict_paths(run, [image], tmp_path / "out", progress=False, overlays=False,
                             threshold_rule="f1_optimal")
    assert [r["threshold_rule"] for r in read_csv(csv_path)] == ["f1_optimal"]
    with pytest.raises(ConfigError, match=r"no threshold fitted for rule 'target_sensitivity'; fitted: "):
        LoadedRun(run, threshold_rule="target_sensitivity")
    assert save_threshold(run, other, use=True) is True and threshold_in_use(run) == other
    assert (run / THRESHOLDS_FILE).is_file()


def test_a_misspelt_threshold_rule_is_refused_before_anything_is_loaded(tmp_path):
    from aeflow.evaluation.assess import evaluate_run

    with pytest.raises(ConfigError, match=r"unknown threshold rule 'f1_optimum'"):
        evaluate_run(tmp_path / "no-such-run", rule="f1_optimum")
