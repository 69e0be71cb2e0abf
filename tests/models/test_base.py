"""The model base class records constructor arguments, so config() rebuilds any model without per-model code."""

from __future__ import annotations

from aeflow.models import create_model


def test_config_holds_every_argument_with_defaults_and_lists():
    model = create_model("ae", widths=(8, 16), latent_channels=2)
    assert model.config() == {"in_channels": 1, "widths": [8, 16], "latent_channels": 2, "score": "topk",
                              "topk_fraction": 0.01, "blur_sigma": 2.0}
    assert create_model("ae", **model.config()).config() == model.config()


def test_subclass_arguments_win_and_forwarded_options_get_parent_defaults():
    cevae = create_model("cevae", widths=[8, 16], score="combi")
    assert cevae.config()["score"] == "combi"  # CeVAE passes "elbo" to its parent; its own argument is recorded
    gmm = create_model("aeflow_gmm", backbone="resnet18", pretrained=False, gamma=0.5, flow_steps=2)
    config = gmm.config()
    assert config["gamma"] == 0.5 and config["flow_steps"] == 2 and config["subnet"] == "resnet"
    assert create_model("aeflow_gmm", **config).config() == config
