"""The supervised probe (baseline of the semi-supervised mode): fitted on normal phantoms plus K labelled lesion
phantoms it separates unseen lesions, its logit is the logistic regression it fitted, it refuses to fit without
labels, and it travels through its config and buffers.

The bound: image AUROC >= 0.7 on 20 normal vs 20 lesion test images (null sd 0.092 for 20 vs 20, so 0.7 is over 2
sd above chance). This set-up (frozen EfficientNet-Lite0, 64 px, difficulty 0, K = 30 labelled lesions) gave 0.83:
the phantoms' lesions sit anywhere, and pooled statistics see them weakly (fewer labels gave less), which is what a
per-position model is for.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from aeflow.data import Batch, collate, load_data
from aeflow.errors import DataError
from aeflow.models import create_model


def _batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    n, _, h, w = images.shape
    return Batch(image=images, label=labels, mask=torch.zeros(n, h, w), has_mask=torch.zeros(n, dtype=torch.bool),
                 path=[f"p{i}" for i in range(n)], anomaly_type=["x"] * n)


@pytest.fixture(scope="module")
def phantoms():
    data = load_data("synthetic", None, image_size=64, size=64, n_train=48, n_val=0, n_test=100, difficulty=0.0,
                     seed=0)
    test = collate(list(data.test))
    lesion = (test.label == 1).nonzero().flatten()
    normal = (test.label == 0).nonzero().flatten()
    # 30 lesion images become the labelled anomalies; 20 + 20 others are the test set.
    return {"train": collate(list(data.train)).image, "labelled": test.image[lesion[:30]],
            "test": torch.cat([test.image[normal[:20]], test.image[lesion[30:50]]]),
            "label": torch.cat([torch.zeros(20), torch.ones(20)]).long()}


def _fitted(phantoms, **kwargs):
    torch.manual_seed(0)
    model = create_model("supervised_probe", **kwargs).eval()
    images = torch.cat([phantoms["train"], phantoms["labelled"]])
    labels = torch.cat([torch.zeros(len(phantoms["train"])), torch.ones(len(phantoms["labelled"]))]).long()
    order = torch.randperm(len(images))
    model.fit([_batch(images[order[i:i + 16]], labels[order[i:i + 16]]) for i in range(0, len(images), 16)])
    return model


def test_probe_separates_lesions_from_a_few_labels(phantoms):
    model = _fitted(phantoms)
    out = model.predict(phantoms["test"])
    assert out["anomaly_map"].shape == (40, 64, 64)
    assert roc_auc_score(phantoms["label"].numpy(), out["pred_score"].numpy()) >= 0.7


def test_probe_score_is_the_fitted_logistic_regression(phantoms):
    """The logit equals w . standardised(descriptor) + b recomputed by hand, and the mean over positions of the
    (un-upsampled) per-position term equals the mean features' share of it."""
    model = _fitted(phantoms)
    images = phantoms["test"][:4]
    descriptors, features = model.describe(images)
    by_hand = ((descriptors - model.input_mean) / model.input_scale) @ model.weight + model.bias
    assert torch.allclose(model.predict(images)["pred_score"], by_hand, atol=1e-5)
    c = features.shape[1]
    mean_share = ((descriptors[:, :c] - model.input_mean[:c]) / model.input_scale[:c]) @ model.weight[:c]
    per_position = torch.einsum("bchw,c->bhw", features - model.input_mean[:c, None, None],
                                model.weight[:c] / model.input_scale[:c])
    assert torch.allclose(per_position.flatten(1).mean(1), mean_share, atol=1e-4)


def test_probe_needs_labelled_anomalies(phantoms):
    model = create_model("supervised_probe").eval()
    batch = _batch(phantoms["train"][:16], torch.zeros(16, dtype=torch.long))
    with pytest.raises(DataError, match="labelled-anomalies"):
        model.fit([batch])


def test_probe_travels_through_config_and_buffers(phantoms):
    model = _fitted(phantoms)
    rebuilt = create_model("supervised_probe", **{**model.config(), "pretrained": False}).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = phantoms["test"][:3]
    assert torch.equal(model.predict(images)["pred_score"], rebuilt.predict(images)["pred_score"])
