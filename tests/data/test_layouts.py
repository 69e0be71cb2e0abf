"""Every layout on a miniature tree; records, datasets, saved split lists and describe."""

import json

import numpy as np
import pytest
import torch
from conftest import noise_image, write_dicom, write_images, write_mask, write_nifti, write_png

from aeflow.data import (ImageDataset, Record, available_layouts, collate, load_data, load_splits, save_splits,
                         scan_inputs)
from aeflow.data.dataset import DataSplits
from aeflow.errors import ConfigError, DataError


def _counts(records):
    return sorted((r.label, r.anomaly_type) for r in records)


def _names(records):
    return sorted(r.source.rsplit("/", 1)[-1] for r in records)


def test_all_layouts_are_registered():
    assert set(available_layouts()) == {"folder", "mvtec", "btad", "miic", "chest_xray", "oct2017", "isic2018",
                                        "brats2021", "medmnist", "magnetic_tile", "synthetic"}


def test_mvtec(tmp_path):
    write_images(tmp_path / "train" / "good", [f"{i:03d}" for i in range(10)])
    write_images(tmp_path / "test" / "good", ["000", "001"], seed=20)
    write_images(tmp_path / "test" / "crack", ["000", "001"], seed=30)
    write_images(tmp_path / "test" / "hole", ["000"], seed=40)
    for kind, stem in (("crack", "000"), ("crack", "001"), ("hole", "000")):
        write_mask(tmp_path / "ground_truth" / kind / f"{stem}_mask.png")
    data = load_data("mvtec", tmp_path, image_size=8, val_fraction=0.2, seed=3)
    assert len(data.train) == 8 and len(data.val) == 2 and all(r.label == 0 for r in data.train.records + data.val.records)
    assert _counts(data.test.records) == [(0, "good"), (0, "good"), (1, "crack"), (1, "crack"), (1, "hole")]
    hole = next(r for r in data.test.records if r.anomaly_type == "hole")
    assert hole.mask == str(tmp_path / "ground_truth" / "hole" / "000_mask.png")
    sample = data.test[data.test.records.index(hole)]
    assert sample.mask.shape == (8, 8) and set(sample.mask.unique().tolist()) == {0.0, 1.0}
    good = data.test[[r.anomaly_type for r in data.test.records].index("good")]
    assert good.label == 0 and good.mask is not None and good.mask.sum() == 0  # known-empty pixel truth
    # the seed fixes the carved validation split
    assert _names(load_data("mvtec", tmp_path, val_fraction=0.2, seed=3).val.records) == _names(data.val.records)


def test_btad_masks_png_or_bmp(tmp_path):
    write_images(tmp_path / "train" / "ok", ["0000", "0001", "0002"])
    write_images(tmp_path / "test" / "ok", ["0100"])
    write_images(tmp_path / "test" / "ko", ["0200", "0201"], suffix=".bmp")
    write_mask(tmp_path / "ground_truth" / "ko" / "0200.png")
    write_mask(tmp_path / "ground_truth" / "ko" / "0201.bmp")
    data = load_data("btad", tmp_path, image_size=8)
    masks = sorted(r.mask.rsplit("/", 1)[-1] for r in data.test.records if r.label == 1)
    assert masks == ["0200.png", "0201.bmp"]
    assert all(data.test[i].mask.sum() > 0 for i, r in enumerate(data.test.records) if r.label == 1)


def test_miic_masks_are_optional(tmp_path):
    write_images(tmp_path / "train" / "good", ["a", "b", "c"])
    write_images(tmp_path / "test" / "good", ["d"])
    write_images(tmp_path / "test" / "defect", ["e", "f"])
    write_mask(tmp_path / "ground_truth" / "defect" / "e_mask.png")
    data = load_data("miic", tmp_path, image_size=8)
    by_name = {r.source.rsplit("/", 1)[-1]: r for r in data.test.records}
    assert by_name["e.png"].mask.endswith("e_mask.png") and by_name["f.png"].mask is None
    assert data.test[data.test.records.index(by_name["f.png"])].mask is None


def test_generic_folder_with_masks_and_nifti_slices(tmp_path):
    write_images(tmp_path / "healthy", [f"h{i}" for i in range(10)])
    write_images(tmp_path / "lesion", ["l0", "l1"], seed=20)
    write_mask(tmp_path / "masks" / "l0_mask.png")
    volume = np.random.default_rng(0).normal(size=(12, 10, 3)).astype(np.float32)
    seg = np.zeros((12, 10, 3), dtype=np.uint8)
    seg[2:5, 3:6, 1] = 1
    write_nifti(tmp_path / "lesion" / "case.nii.gz", volume)
    write_nifti(tmp_path / "masks" / "case.nii.gz", seg)
    data = load_data("folder", tmp_path, image_size=(6, 5), normal_dirs=["healthy"], abnormal_dirs="lesion",
                     mask_dir="masks", test_fraction=0.2, val_fraction=0.25)
    assert (len(data.train), len(data.val)) == (6, 2)
    test = {r.source.rsplit("/", 1)[-1]: r for r in data.test.records}
    assert len(test) == 2 + 2 + 3  # 2 normals, 2 PNG lesions, 3 NIfTI slices
    assert test["case.nii.gz#axis=2,slice=1"].mask == f"{tmp_path / 'masks' / 'case.nii.gz'}#axis=2,slice=1"
    assert test["l1.png"].mask is None and test["l0.png"].anomaly_type == "lesion"
    slice_1 = data.test[data.test.records.index(test["case.nii.gz#axis=2,slice=1"])]
    assert slice_1.image.shape == (1, 6, 5) and slice_1.mask.sum() > 0 and slice_1.meta["intensity"] == "percentile:1,99"


def test_generic_folder_reads_dicom_frames(tmp_path):
    write_images(tmp_path / "normal", ["a", "b", "c"])
    write_dicom(tmp_path / "abnormal" / "cine.dcm", np.arange(2 * 12 * 10).reshape(2, 12, 10))
    data = load_data("folder", tmp_path, image_size=8, abnormal_dirs=["abnormal"], test_fraction=0.34, val_fraction=0)
    assert sorted(r.source.rsplit("/", 1)[-1] for r in data.test.records if r.label == 1) == \
        ["cine.dcm#frame=0", "cine.dcm#frame=1"]


def _class_tree(root, splits, classes, n=3):
    for split in splits:
        for k, cls in enumerate(classes):
            write_images(root / split / cls, [f"{split}_{cls}_{i}" for i in range(n)], seed=10 * k)


def test_chest_xray_official_and_carved_validation(tmp_path):
    _class_tree(tmp_path, ("train", "val", "test"), ("NORMAL", "PNEUMONIA"), n=4)
    data = load_data("chest_xray", tmp_path, image_size=8)
    assert len(data.train) == 4 and _counts(data.val.records) == [(0, "good")] * 4 + [(1, "pneumonia")] * 4
    assert _counts(data.test.records) == [(0, "good")] * 4 + [(1, "pneumonia")] * 4
    carved = load_data("chest_xray", tmp_path, image_size=8, val="carve", val_fraction=0.25)
    assert len(carved.train) == 3 and _counts(carved.val.records) == [(0, "good"), (1, "pneumonia")]
    assert all("/train/" in r.source for r in carved.val.records)  # never from test


def test_oct2017_keeps_anomaly_types(tmp_path):
    _class_tree(tmp_path, ("train", "test"), ("NORMAL", "CNV", "DME", "DRUSEN"), n=2)
    data = load_data("oct2017", tmp_path, image_size=8, val_fraction=0.5)
    assert _counts(data.test.records) == [(0, "good")] * 2 + [(1, "cnv")] * 2 + [(1, "dme")] * 2 + [(1, "drusen")] * 2
    assert len(data.train) == 1 and {r.anomaly_type for r in data.val.records} == {"good", "cnv", "dme", "drusen"}


def _isic_split(root, name, classes):
    folder = root / f"ISIC2018_Task3_{name}_Input"
    rows = ["image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"]
    for i, cls in enumerate(classes):
        stem = f"ISIC_{name}_{i:03d}"
        write_png(folder / f"{stem}.jpg", np.stack([noise_image(i)] * 3, axis=2))
        rows.append(stem + "," + ",".join("1.0" if c == cls else "0.0"
                                          for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")))
    (folder / "ATTRIBUTION.txt").write_text("ignored")
    gt = root / f"ISIC2018_Task3_{name}_GroundTruth"
    gt.mkdir()
    (gt / f"ISIC2018_Task3_{name}_GroundTruth.csv").write_text("\n".join(rows) + "\n")


def test_isic2018_csv_labels(tmp_path):
    _isic_split(tmp_path, "Training", ["NV", "NV", "NV", "NV", "MEL", "BCC"])
    _isic_split(tmp_path, "Test", ["NV", "MEL", "VASC"])
    data = load_data("isic2018", tmp_path, image_size=8, val_fraction=0.25)
    val = _counts(data.val.records)  # a quarter of the training NV images and of the training anomalies
    assert len(data.train) == 3 and len(val) == 2 and val[0] == (0, "good") and val[1] in [(1, "mel"), (1, "bcc")]
    assert _counts(data.test.records) == [(0, "good"), (1, "mel"), (1, "vasc")]
    _isic_split(tmp_path, "Validation", ["NV", "DF"])
    official = load_data("isic2018", tmp_path, image_size=8)
    assert len(official.train) == 4 and _counts(official.val.records) == [(0, "good"), (1, "df")]


def test_isic2018_bad_csv_row(tmp_path):
    _isic_split(tmp_path, "Training", ["NV", "NV"])
    _isic_split(tmp_path, "Test", ["NV", "MEL"])
    csv = tmp_path / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    csv.write_text(csv.read_text().replace("ISIC_Test_001,1.0", "ISIC_Test_001,0.0"))
    with pytest.raises(DataError, match=r"GroundTruth\.csv, line 3: expected exactly one class set to 1"):
        load_data("isic2018", tmp_path)


def test_brats2021_bmad_layout(tmp_path):
    write_images(tmp_path / "train" / "good" / "img", [f"00{i}_60" for i in range(5)])
    for split in ("valid", "test"):
        write_images(tmp_path / split / "good" / "img", ["00100_70"], seed=9)
        write_images(tmp_path / split / "Ungood" / "img", ["00124_60", "00124_70"], seed=19)
        write_mask(tmp_path / split / "Ungood" / "label" / "00124_60.png")
        write_mask(tmp_path / split / "Ungood" / "label" / "00124_70.png", box=(0, 2, 0, 2))
    data = load_data("brats2021", tmp_path, image_size=8)
    assert len(data.train) == 5
    for split in (data.val, data.test):
        assert _counts(split.records) == [(0, "good"), (1, "tumor"), (1, "tumor")]
        assert [split[i].mask.sum().item() > 0 for i in range(3)] == [r.label == 1 for r in split.records]
    carved = load_data("brats2021", tmp_path, val="carve", val_fraction=0.2)
    assert len(carved.train) == 4 and _counts(carved.val.records) == [(0, "good")]


def test_medmnist_label_mapping(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, labels in (("train", [0, 1, 2, 0, 2]), ("val", [0, 1]), ("test", [2, 0, 1])):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array(labels).reshape(-1, 1)
    np.savez(tmp_path / "tinymnist.npz", **arrays)
    data = load_data("medmnist", tmp_path / "tinymnist.npz", image_size=28, normal_labels=[0, 2],
                     label_names={1: "tumour"})
    assert len(data.train) == 4 and _counts(data.test.records) == [(0, "good"), (0, "good"), (1, "tumour")]
    sample = data.test[0]
    np.testing.assert_allclose(sample.image[0].numpy(), arrays["test_images"][0] / 255.0, atol=1e-6)
    assert load_data("medmnist", tmp_path, image_size=28).records.test[0].anomaly_type == "class_2"


def test_magnetic_tile_convention(tmp_path):
    def tile(cls, stems, masked):
        for i, stem in enumerate(stems):
            write_png(tmp_path / cls / "Imgs" / f"{stem}.jpg", noise_image(i, (14, 9)))
            write_mask(tmp_path / cls / "Imgs" / f"{stem}.png", shape=(14, 9), box=(1, 4, 1, 4) if masked else (0, 0, 0, 0))
    tile("MT_Free", [f"f{i:02d}" for i in range(20)], masked=False)
    tile("MT_Crack", ["c1", "c2"], masked=True)
    tile("MT_Uneven", ["u1"], masked=True)
    data = load_data("magnetic_tile", tmp_path, image_size=8, seed=1)
    normals = data.train.records + data.val.records + [r for r in data.test.records if r.label == 0]
    assert (len(data.train), len(data.val), len(normals)) == (14, 2, 20)
    assert _counts([r for r in data.test.records if r.label == 1]) == [(1, "crack"), (1, "crack"), (1, "uneven")]
    assert all(data.test[i].mask.sum() > 0 for i, r in enumerate(data.test.records) if r.label == 1)
    again = load_data("magnetic_tile", tmp_path, image_size=8, seed=1)
    assert _names(again.test.records) == _names(data.test.records)
    assert _names(load_data("magnetic_tile", tmp_path, seed=2).test.records) != _names(data.test.records)

    # labelled_pool: a share of each defect type leaves the test split for the labelled training pool; nothing else moves.
    tile("MT_Crack", [f"c{i}" for i in range(3, 11)], masked=True)
    plain = load_data("magnetic_tile", tmp_path, image_size=8, seed=1)
    pooled = load_data("magnetic_tile", tmp_path, image_size=8, seed=1, labelled_pool=0.5, labelled_anomalies=3)
    pool_draw = load_data("magnetic_tile", tmp_path, image_size=8, seed=1, labelled_pool=0.5, labelled_anomalies=5)
    assert _names(pooled.train.records) == _names(plain.train.records)
    assert _names(pooled.val.records) == _names(plain.val.records)
    test_names = set(_names(pooled.test.records))
    assert test_names < set(_names(plain.test.records))
    moved = set(_names(plain.test.records)) - test_names  # 5 of the 10 cracks; the one uneven stays in test
    assert len(moved) == 5 and {r.anomaly_type for r in pooled.labelled.records} == {"crack"}
    assert set(_names(pooled.labelled.records)) < set(_names(pool_draw.labelled.records)) == moved
    with pytest.raises(ConfigError, match="labelled_pool"):
        load_data("magnetic_tile", tmp_path, image_size=8, labelled_anomalies=1)


def test_dataset_channels_resize_and_collate(tmp_path):
    gray = noise_image(0, (20, 30))
    colour = np.stack([gray, 255 - gray, gray // 2], axis=2).astype(np.uint8)
    write_png(tmp_path / "g.png", gray)
    write_png(tmp_path / "c.png", colour)
    write_mask(tmp_path / "m.png", shape=(20, 30), box=(0, 10, 0, 15))
    records = [Record(str(tmp_path / "g.png"), 1, "x", mask=str(tmp_path / "m.png")), Record(str(tmp_path / "c.png"), 0)]
    one = ImageDataset(records, image_size=(10, 15), channels=1)
    three = ImageDataset(records, image_size=10, channels=3)
    assert one[0].image.shape == (1, 10, 15) and three[0].image.shape == (3, 10, 10)
    assert torch.equal(three[0].image[0], three[0].image[2])  # grayscale repeated
    np.testing.assert_allclose(one[1].image[0].mean().item(),
                               (colour.astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114])).mean(), atol=0.01)
    assert one[1].meta["color_to_gray"] == "bt601" and three[1].image.shape == (3, 10, 10)
    mask = one[0].mask
    assert mask[:5, :7].min() == 1 and mask[5:, :].max() == 0 and set(mask.unique().tolist()) == {0.0, 1.0}
    native = ImageDataset(records, image_size=None)
    np.testing.assert_allclose(native[0].image[0].numpy(), gray / 255.0, atol=1e-6)
    batch = collate([one[0], one[1]])
    assert batch.image.shape == (2, 1, 10, 15) and batch.has_mask.tolist() == [True, False]


def test_save_and_load_splits_repeat_a_run(tmp_path):
    write_images(tmp_path / "data" / "train" / "good", [f"{i}" for i in range(6)])
    write_images(tmp_path / "data" / "test" / "good", ["t"])
    write_images(tmp_path / "data" / "test" / "cut", ["x"])
    write_mask(tmp_path / "data" / "ground_truth" / "cut" / "x_mask.png")
    data = load_data("mvtec", tmp_path / "data", image_size=8, seed=5)
    path = save_splits(data, tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["layout"] == "mvtec" and saved["seed"] == 5 and len(saved["checksums"]) == 9
    assert saved["splits"]["test"][0]["mask"] == "ground_truth/cut/x_mask.png"  # test/cut sorts before test/good
    records = load_splits(tmp_path / "run")
    assert records.splits() == data.records.splits()
    again = DataSplits.from_records(records, image_size=8)
    assert torch.equal(again.test[0].image, data.test[0].image) and torch.equal(again.test[0].mask, data.test[0].mask)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    assert load_splits(tmp_path / "run", root=moved).train[0].source.startswith(str(moved))
    write_png(moved / "test" / "cut" / "x.png", noise_image(99))
    with pytest.raises(DataError, match=r"data differs from the saved run: .*x\.png \(content changed\)"):
        load_splits(tmp_path / "run", root=moved)


def test_npz_and_synthetic_splits_are_saved(tmp_path):
    np.savez(tmp_path / "m.npz", **{f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": np.array([[0], [1]]) for s in ("train", "val", "test")})
    medmnist = load_data("medmnist", tmp_path / "m.npz", image_size=28)
    saved = json.loads(save_splits(medmnist, tmp_path / "run1").read_text())
    assert list(saved["checksums"]) == ["m.npz"] and saved["root"] == str(tmp_path)
    assert load_splits(tmp_path / "run1").test == medmnist.records.test
    synth = load_data("synthetic", n_train=3, n_val=2, n_test=2, size=32)
    save_splits(synth, tmp_path / "run2")
    assert load_splits(tmp_path / "run2").splits() == synth.records.splits()


def test_describe_reports_counts_sizes_and_ranges(tmp_path):
    data = load_data("synthetic", image_size=32, n_train=5, n_val=4, n_test=6, anomaly_fraction=0.5, size=48)
    text = data.describe()
    assert "train: 5 images (5 normal, 0 anomalous" in text
    assert "test : 6 images (3 normal, 3 anomalous" in text
    assert "height 48, width 48" in text and "skipped: 0 file(s)" in text
    from aeflow.data import summarize
    summary = summarize(data)
    assert summary["splits"]["val"]["anomalous"] == 2 and summary["splits"]["test"]["with_pixel_truth"] == 6
    assert 0.0 <= summary["splits"]["train"]["raw_range"][0] < summary["splits"]["train"]["raw_range"][1] <= 1.0
    json.dumps(summary)


def test_scan_inputs_for_prediction(tmp_path):
    write_images(tmp_path / "in" / "sub", ["a", "b"])
    (tmp_path / "in" / "notes.txt").write_text("x")
    write_nifti(tmp_path / "vol.nii", np.zeros((4, 5, 3), np.float32))
    records, skipped = scan_inputs([tmp_path / "in", tmp_path / "vol.nii", tmp_path / "gone.png"], skip_bad=True)
    assert [r.source.rsplit("/", 1)[-1] for r in records] == ["a.png", "b.png"] + \
        [f"vol.nii#axis=2,slice={k}" for k in range(3)]
    assert all(r.label == -1 for r in records) and skipped == [(str(tmp_path / "gone.png"), "file not found")]
