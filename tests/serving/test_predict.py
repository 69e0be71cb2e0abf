"""`predict_paths` on real file formats: CSV rows, skipped files, overlays, DICOM frames and NIfTI slices."""

from __future__ import annotations

import csv
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
