"""SAA: Segment Any Anomaly without training via hybrid prompt regularization (Cao, Xu, Sun, Cheng, Du, Gao and
Shen, 2023, arXiv:2305.10724), on the Segment Anything Model from the segment-anything package.

Nothing is trained. SAA chains foundation models: an anomaly region generator proposes candidate regions, an
anomaly region refiner (SAM) turns them into masks, and SAA+ regularises the candidates with hybrid prompts:

1. Expert-knowledge prompts (section 3.3): properties of the object and its defects, here the largest area a
   defect may cover (candidates above `max_area` of the image are the object or the background, not a defect;
   the paper's area prompt) and how many defects an image may hold (the top `max_regions` candidates are kept).
2. Context prompts (section 3.4): visual saliency, how unlike the rest of its own image a position is, as the
   mean distance of its feature to its `saliency_neighbours` nearest features within the image, min-max scaled
   per image (the paper computes it on ImageNet features; here on a frozen backbone of aeflow.nn.backbones); and
   the confidence of each candidate. A region's score is its confidence times its mean saliency.

The anomaly map is, at each pixel, the highest score of the kept regions that cover it (0 where none does), and
the image score its maximum.

Departure: the paper's region generator is Grounding DINO prompted with defect words. It is not integrated yet.
A pure-Python build is on PyPI (groundingdino-gml 0.1.2, no compiled extension), but its text branch loads BERT and
BERT's tokenizer through transformers' from_pretrained (a hub name, or a local folder the user would have to fetch
too) besides the detector's own checkpoint, and it needs transformers, opencv, supervision and pycocotools. Here SAM
proposes the candidates itself, with its automatic mask generator (a grid of point prompts; its predicted IoU is the
confidence), and the hybrid prompts do the rest. SAA's language prompts have no counterpart without a
text-conditioned detector.

The paper's SAM is ViT-H (sam_vit_h_4b8939.pth); ViT-B and ViT-L are the same architecture, smaller. Weights are
read only from a local file the user names (weights=PATH, --weights PATH): nothing is downloaded.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aeflow.errors import ConfigError, WeightsError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import FeatureStages

# SAM's three image encoders (segment_anything.build_sam) and the files Meta publishes for them.
SAM_ENCODERS = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
}
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
# The rest of SAM's configuration (the same for all three), overridable through sam_config (tiny test models).
SAM_DEFAULTS = dict(image_size=1024, patch_size=16, prompt_embed_dim=256, window_size=14, mask_in_chans=16,
                    decoder_depth=2, decoder_mlp_dim=2048, decoder_heads=8, iou_head_depth=3, iou_head_hidden_dim=256)


def import_segment_anything():
    try:
        import segment_anything
    except ImportError as exc:
        raise ConfigError("SAA needs the segment-anything package: pip install 'aeflow[zeroshot]' "
                          f"(import failed: {exc})") from None
    return segment_anything


def build_sam(sam_model: str, sam_config: dict | None = None):
    """SAM built from segment_anything's modules exactly as its build_sam does, with `sam_config` overriding
    any setting (its keys: those of SAM_ENCODERS and SAM_DEFAULTS)."""
    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if sam_model not in SAM_ENCODERS:
        raise ConfigError(f"unknown SAM model {sam_model!r}; choose one of {', '.join(SAM_ENCODERS)}")
    c = {**SAM_ENCODERS[sam_model], **SAM_DEFAULTS, **(sam_config or {})}
    unknown = set(c) - set(SAM_ENCODERS[sam_model]) - set(SAM_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown sam_config key(s): {', '.join(sorted(unknown))}")
    grid = c["image_size"] // c["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=c["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=c["encoder_global_attn_indexes"], window_size=c["window_size"],
            out_chans=c["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=c["prompt_embed_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(c["image_size"], c["image_size"]),
                                     mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=c["prompt_embed_dim"],
                                          mlp_dim=c["decoder_mlp_dim"], num_heads=c["decoder_heads"]),
            transformer_dim=c["prompt_embed_dim"], iou_head_depth=c["iou_head_depth"],
            iou_head_hidden_dim=c["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def resolve_sam_weights(sam_model: str, weights: str | None) -> Path:
    """The local SAM checkpoint, or a WeightsError that says how to get one (nothing is downloaded)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} for SAM model {sam_model!r} does not exist")
        return path
    name = SAM_FILES.get(sam_model, SAM_FILES["vit_h"])
    raise WeightsError(
        f"SAA needs the Segment Anything checkpoint for {sam_model!r} ({name}) and reads it only from a local file.\n"
        f"To fix: download {name} on a machine with internet (the segment-anything repository's README links "
        f"the three checkpoints: vit_h, the paper's, vit_l and vit_b), copy it here,\n"
        "and pass it: weights=PATH (on the command line --weights PATH).\n"
        "(pretrained=False gives random weights, if that is really what you want.)"
    )


# --- context prompt: visual saliency ---------------------------------------------------------------------------


def visual_saliency(features: torch.Tensor, neighbours: int) -> torch.Tensor:
    """B x C x h x w -> B x h x w in [0, 1]: the mean distance of each position's feature to its `neighbours`
    nearest other positions of the same image, min-max scaled per image (high = unlike the rest of the image)."""
    b, c, h, w = features.shape
    flat = features.flatten(2).transpose(1, 2)  # B x P x C
    distances = torch.cdist(flat, flat)
    distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    k = max(1, min(neighbours, h * w - 1))
    saliency = distances.topk(k, dim=2, largest=False).values.mean(2)
    low, high = saliency.amin(1, keepdim=True), saliency.amax(1, keepdim=True)
    return ((saliency - low) / (high - low).clamp_min(1e-12)).view(b, h, w)


# --- hybrid prompt regularisation of the candidate regions ------------------------------------------------------


def score_regions(masks: torch.Tensor, confidence: torch.Tensor, saliency: torch.Tensor, max_area: float,
                  max_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of candidate regions and the indices of those kept, best first.

    masks: R x H x W booleans; confidence: R; saliency: H x W. A region larger than `max_area` (a fraction of the
    image) or empty is dropped (the area prompt); the score of the others is confidence x mean saliency inside
    (the context prompts); the best `max_regions` are kept (the count prompt)."""
    area = masks.flatten(1).float().mean(1)
    inside = (masks.flatten(1).float() * saliency.flatten()[None]).sum(1) / masks.flatten(1).sum(1).clamp_min(1)
    scores = confidence * inside
    allowed = (area > 0) & (area <= max_area)
    order = torch.argsort(torch.where(allowed, scores, torch.full_like(scores, -1.0)), descending=True)
    kept = order[allowed[order]][:max_regions]
    return scores, kept


def region_map(masks: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H x W: the highest score of the kept regions covering each pixel, 0 where none does."""
    if len(kept) == 0:
        return torch.zeros(size)
    weighted = masks[kept].float() * scores[kept, None, None]
    return weighted.amax(0)


@register("saa")
class SAA(AnomalyModel):
    """SAA+ with SAM's automatic mask generator as region generator (see the module docstring).

    sam_model: "vit_h" (the paper's), "vit_l" or "vit_b". weights: local SAM checkpoint. sam_config: overrides of
    SAM's configuration (tiny models for tests). pretrained=False: random SAM weights (tests only).
    points_per_side, pred_iou_threshold, stability_threshold: the automatic mask generator's settings (SAM's
    defaults 32, 0.88, 0.95). max_area: largest defect area as a fraction of the image. max_regions: defects kept
    per image. saliency_backbone: frozen backbone for the saliency features (stride 8), with saliency_pretrained;
    saliency_neighbours: nearest neighbours averaged.
    """

    trained_by_gradient = False

    def __init__(
        self,
        sam_model: str = "vit_h",
        pretrained: bool = True,
        weights: str | None = None,
        sam_config: dict | None = None,
        points_per_side: int = 32,
        pred_iou_threshold: float = 0.88,
        stability_threshold: float = 0.95,
        max_area: float = 0.3,
        max_regions: int = 5,
        saliency_backbone: str = "efficientnet_lite0",
        saliency_pretrained: bool = True,
        saliency_neighbours: int = 400,
    ):
        super().__init__()
        if weights is not None and not pretrained:
            raise ConfigError("a weights file was given with pretrained=False; drop one of the two")
        if not 0 < max_area <= 1:
            raise ConfigError(f"max_area must be in (0, 1]; got {max_area}")
        if max_regions < 1 or points_per_side < 1 or saliency_neighbours < 1:
            raise ConfigError("max_regions, points_per_side and saliency_neighbours must be >= 1")
        path = resolve_sam_weights(sam_model, weights) if pretrained else None  # fail before building
        self.sam = build_sam(sam_model, sam_config)
        if path is not None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.sam.load_state_dict(state, strict=True)
            except Exception as exc:  # noqa: BLE001 - any failure to load means the file does not fit
                raise WeightsError(f"{path}: cannot be loaded into SAM {sam_model!r} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        self.sam.eval().requires_grad_(False)
        self.saliency_features = FeatureStages(saliency_backbone, pretrained=saliency_pretrained)

    def fit(self, loader) -> None:
        """Nothing to fit: SAA is zero-shot."""

    def saliency(self, images: torch.Tensor) -> torch.Tensor:
        """B x H x W visual saliency at the input resolution (from the backbone's stride-8 stage)."""
        features = self.saliency_features(images)[1]
        s = visual_saliency(features, self._config["saliency_neighbours"])
        return F.interpolate(s[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def candidates(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's automatic masks of one C x H x W image in [0, 1]: (R x H x W booleans, R predicted IoUs)."""
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(
            self.sam, points_per_side=self._config["points_per_side"],
            pred_iou_thresh=self._config["pred_iou_threshold"],
            stability_score_thresh=self._config["stability_threshold"])
        rgb = image.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().cpu().numpy()
        found = generator.generate(np.ascontiguousarray(rgb))
        h, w = image.shape[-2:]
        if not found:
            return torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0)
        masks = torch.from_numpy(np.stack([f["segmentation"] for f in found]))
        return masks, torch.tensor([float(f["predicted_iou"]) for f in found])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        saliency = self.saliency(images).cpu()
        maps = []
        for image, s in zip(images, saliency):
            masks, confidence = self.candidates(image)
            scores, kept = score_regions(masks, confidence, s, self._config["max_area"], self._config["max_regions"])
            maps.append(region_map(masks, scores, kept, tuple(image.shape[-2:])))
        anomaly_map = torch.stack(maps).to(images.device)
        return {"pred_score": anomaly_map.flatten(1).amax(1), "anomaly_map": anomaly_map}
