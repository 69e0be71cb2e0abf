"""WinCLIP: zero- and few-shot anomaly classification and segmentation (Jeong, Zou, Kim, Zhang, Ravichandran and
Dabeer, CVPR 2023, arXiv:2303.14814), on CLIP models from the open-clip-torch package.

Nothing is trained. CLIP embeds images and sentences in one space, so a sentence that says "damaged" and one that
says "flawless" give two directions, and an image's anomaly score is how much closer it lies to the first.

1. Compositional prompt ensemble (section 4.1): every state word (7 normal: "flawless {}", "{} without defect",
   ...; 4 anomalous: "damaged {}", "{} with flaw", ...) is put into every template ("a cropped photo of the {}.",
   "a photo of a {} for visual inspection.", ... 22 in all; the paper's supplementary lists), with {} the object's
   name. The normalised text embeddings of each state set are averaged into one normal and one anomalous
   embedding. The zero-shot image score is the anomalous class's probability, a softmax of the cosine
   similarities of the image embedding with the two, scaled by CLIP's own logit scale.
2. Window embeddings (section 4.2): a ViT image embedding of a window is obtained by running the transformer on
   the class token and the patch tokens inside the window only (the paper's "window masking"), for every window
   of each scale at stride one patch: 2 x 2 and 3 x 3 patches on ViT-B/16+'s 15 x 15 grid (240 px).
3. Harmonic aggregation (section 4.2, eq. 3): a patch's score at one scale is the harmonic mean of the scores of
   all windows that contain it; the zero-shot map is the harmonic mean over the scales and the image-level score
   (broadcast), so one confident normal window is enough to pull a patch down.
4. Few-shot, WinCLIP+ (section 4.3): with k normal reference images, every window (and every patch token of the
   full image) is also compared with the reference windows of the same scale: its score is (1 - the largest cosine
   similarity) / 2; per scale harmonically aggregated, averaged over scales. The final map is the mean of the
   zero-shot and few-shot maps, the image score the mean of the zero-shot score and the few-shot map's maximum.

The paper's model is ViT-B-16-plus-240 with the LAION-400M weights (open_clip tag laion400m_e31). Weights are read
only from a local file the user names (weights=PATH, --weights PATH): nothing is downloaded. The object name
(`class_name`) is the user's: the paper uses the MVTec class names; for chest X-rays "chest x-ray" is natural.
Departures: none in the method; its details where the paper leaves a choice follow anomalib's public re-
implementation (the window scales, the image score's place in the harmonic mean, the few-shot patch scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeflow.errors import AeflowError, ConfigError, WeightsError
from aeflow.models.base import AnomalyModel, register
from aeflow.nn.blocks import adopt_buffer_shapes, gaussian_blur

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
PAPER_MODEL, PAPER_TAG = "ViT-B-16-plus-240", "laion400m_e31"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's input normalisation (open_clip.constants)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def import_open_clip():
    """open_clip, or an error that says how to install it (it is an optional dependency)."""
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError("WinCLIP needs the open-clip-torch package: pip install 'aeflow[zeroshot]' "
                          f"(import failed: {exc})") from None
    return open_clip


def prompts(class_name: str, states: tuple[str, ...]) -> list[str]:
    """Every state word of `states` with `class_name`, in every template: the compositional prompt ensemble."""
    return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch indices (row-major on the grid) of every size x size window at stride 1: n_windows x size^2."""
    h, w = grid
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"window size {size} does not fit the {h} x {w} patch grid")
    index = torch.arange(h * w).view(h, w)
    windows = index.unfold(0, size, 1).unfold(1, size, 1)  # (h-s+1) x (w-s+1) x s x s
    return windows.reshape(-1, size * size)


def harmonic_aggregation(scores: torch.Tensor, windows: torch.Tensor, patches: int) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows that contain it (paper, eq. 3).

    scores: B x n_windows (in (0, 1]); windows: n_windows x s^2 patch indices. Returns B x patches."""
    covers = torch.zeros(windows.shape[0], patches, dtype=scores.dtype, device=scores.device)
    covers.scatter_(1, windows.to(scores.device), 1.0)
    inverse = (1.0 / scores.clamp_min(1e-12)) @ covers  # B x patches: sum over covering windows of 1 / score
    return covers.sum(0) / inverse


def anomaly_probability(embeddings: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Probability of the anomalous class: softmax over the (normal, anomalous) text embeddings of the scaled cosine
    similarities; embeddings ... x D, text 2 x D (both normalised)."""
    return (logit_scale * embeddings @ text.T).softmax(-1)[..., 1]


def association_score(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(1 - largest cosine similarity with any reference embedding) / 2: B x n x D against M x D -> B x n."""
    return (1 - (embeddings @ reference.T).amax(-1)) / 2


@register("winclip")
class WinCLIP(AnomalyModel):
    """WinCLIP / WinCLIP+ on an open_clip ViT.

    clip_model: open_clip model name (the paper: ViT-B-16-plus-240). weights: local file of its weights (the paper's:
    the laion400m_e31 file). clip_config: an open_clip model configuration (embed_dim, vision_cfg, text_cfg) to
    build instead of the named one, e.g. a tiny one for tests. pretrained=False: random weights (for tests only).
    class_name: the object named in the prompts. window_sizes: window sides in patches (the paper: 2 and 3).
    k_shot: number of normal reference images taken from the training images by fit() (0: zero-shot).
    blur_sigma: smoothing of the up-sampled map in image pixels (0: none, as the paper).
    """

    trained_by_gradient = False

    def __init__(
        self,
        clip_model: str = PAPER_MODEL,
        pretrained: bool = True,
        weights: str | None = None,
        clip_config: dict | None = None,
        class_name: str = "object",
        window_sizes: tuple[int, ...] = (2, 3),
        k_shot: int = 0,
        blur_sigma: float = 0.0,
    ):
        super().__init__()
        open_clip = import_open_clip()
        if weights is not None and not pretrained:
            raise ConfigError("a weights file was given with pretrained=False; drop one of the two")
        if k_shot < 0:
            raise ConfigError(f"k_shot must be >= 0; got {k_shot}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0; got {blur_sigma}")
        config = clip_config if clip_config is not None else open_clip.get_model_config(clip_model)
        if config is None:
            raise ConfigError(f"open_clip knows no model {clip_model!r}; choose one of open_clip.list_models() "
                              "or give clip_config")
        path = resolve_clip_weights(clip_model, weights) if pretrained else None  # fail before building
        self.clip = open_clip.model.CLIP(**config)
        if path is not None:
            try:
                open_clip.load_checkpoint(self.clip, str(path), strict=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure to load means the file does not fit
                raise WeightsError(f"{path}: cannot be loaded into open_clip model {clip_model!r} "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        self.clip.eval().requires_grad_(False)
        self.context_length = config.get("text_cfg", {}).get("context_length", 77)
        visual = self.clip.visual
        self.grid = tuple(visual.grid_size)
        self.image_size = tuple(visual.image_size)
        self.windows = [window_indices(self.grid, s) for s in window_sizes]
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        self._text: torch.Tensor | None = None  # 2 x D, computed on first use (not on the meta device)
        # WinCLIP+'s reference memory: patch tokens (k P x D) and window embeddings per scale (k n_w x D).
        self.register_buffer("reference_patches", torch.empty(0))
        for i in range(len(window_sizes)):
            self.register_buffer(f"reference_windows{i}", torch.empty(0))

    # --- text side -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_embeddings(self) -> torch.Tensor:
        """2 x D: the normalised mean of the normalised embeddings of the normal and of the anomalous prompts."""
        if self._text is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=self.context_length)
            device = self.mean.device
            rows = []
            for states in (NORMAL_STATES, ANOMALOUS_STATES):
                tokens = tokenizer(prompts(self._config["class_name"], states)).to(device)
                embedded = F.normalize(self.clip.encode_text(tokens), dim=-1)
                rows.append(F.normalize(embedded.mean(0), dim=-1))
            self._text = torch.stack(rows)
        return self._text.to(self.mean.device)

    # --- image side ------------------------------------------------------------------------------------------

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"WinCLIP takes B x 1 x H x W or B x 3 x H x W images, got {tuple(images.shape)}")
        x = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Normalised embeddings: the image (B x D), its patch tokens (B x P x D) and, per window scale, every
        window's (B x n_windows x D), each window encoded from the class token and its own patch tokens only."""
        visual = self.clip.visual
        tokens = visual._embeds(self._prepare(images))  # B x (1 + P) x width, position embeddings added
        pooled, patches = visual._pool(visual.transformer(tokens))
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        b = tokens.shape[0]
        windows = []
        for index in self.windows:
            n, s2 = index.shape
            selected = tokens[:, 1:][:, index.to(tokens.device).flatten()].view(b * n, s2, -1)
            cls = tokens[:, :1].repeat_interleave(n, dim=0)
            window_pooled, _ = visual._pool(visual.transformer(torch.cat([cls, selected], dim=1)))
            if visual.proj is not None:
                window_pooled = window_pooled @ visual.proj
            windows.append(F.normalize(window_pooled.view(b, n, -1), dim=-1))
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1), windows

    # --- few-shot memory -------------------------------------------------------------------------------------

    def reference_windows(self) -> list[torch.Tensor]:
        return [getattr(self, f"reference_windows{i}") for i in range(len(self.windows))]

    @torch.no_grad()
    def fit(self, loader) -> None:
        """Zero-shot: nothing to do. WinCLIP+ (k_shot > 0): embed the first k_shot training images as the
        reference of normality."""
        k = self._config["k_shot"]
        if k == 0:
            return
        images = []
        for batch in loader:
            images.append(batch.image[: k - sum(len(i) for i in images)])
            if sum(len(i) for i in images) >= k:
                break
        images = torch.cat(images).to(self.mean.device) if images else torch.empty(0)
        if len(images) < k:
            raise AeflowError(f"WinCLIP+ with k_shot={k} needs {k} normal training images; got {len(images)}")
        _, patches, windows = self.embed(images)
        self.reference_patches = patches.flatten(0, 1)
        for i, w in enumerate(windows):
            setattr(self, f"reference_windows{i}", w.flatten(0, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adopt_buffer_shapes(self, state_dict, prefix,
                            ["reference_patches"] + [f"reference_windows{i}" for i in range(len(self.windows))])
        self._text = None  # new weights, new text embeddings
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- scores ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._config["k_shot"] and self.reference_patches.numel() == 0:
            raise AeflowError("WinCLIP+ (k_shot > 0) has no reference images: call fit(loader) on normal images")
        text, scale = self.text_embeddings(), self.clip.logit_scale.exp()
        image, patches, windows = self.embed(images)
        b, p = patches.shape[:2]
        image_score = anomaly_probability(image, text, scale)  # B
        per_scale = [image_score[:, None].expand(b, p)]
        per_scale += [harmonic_aggregation(anomaly_probability(w, text, scale), index, p)
                      for w, index in zip(windows, self.windows)]
        zero_shot = len(per_scale) / (1.0 / torch.stack(per_scale).clamp_min(1e-12)).sum(0)  # B x P
        out = {"score_zero_shot": image_score}
        patch_map, score = zero_shot, image_score
        if self._config["k_shot"]:
            few = [association_score(patches, self.reference_patches)]
            few += [harmonic_aggregation(association_score(w, ref).clamp_min(1e-6), index, p)
                    for w, ref, index in zip(windows, self.reference_windows(), self.windows)]
            few_shot = torch.stack(few).mean(0)
            patch_map = (zero_shot + few_shot) / 2
            score = (image_score + few_shot.amax(1)) / 2
            out["score_few_shot"] = few_shot.amax(1)
        grid = patch_map.view(b, 1, *self.grid)
        anomaly_map = F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        anomaly_map = gaussian_blur(anomaly_map, self._config["blur_sigma"])
        return {"pred_score": score, "anomaly_map": anomaly_map, **out}


def resolve_clip_weights(clip_model: str, weights: str | None):
    """The local weights file, or a WeightsError that says how to get one (nothing is downloaded)."""
    from pathlib import Path

    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} for CLIP model {clip_model!r} does not exist")
        return path
    tag = PAPER_TAG if clip_model == PAPER_MODEL else "<tag>"
    raise WeightsError(
        f"WinCLIP needs pretrained CLIP weights for {clip_model!r} and reads them only from a local file.\n"
        f"To fix: on a machine with internet run\n"
        f"  pip install open_clip_torch && python -c \"import open_clip; "
        f"open_clip.create_model('{clip_model}', pretrained='{tag}')\"\n"
        f"(the paper's weights: {PAPER_MODEL} with tag {PAPER_TAG}; open_clip.list_pretrained() lists the tags), "
        "copy the downloaded open_clip_pytorch_model.bin or open_clip_model.safetensors from "
        "~/.cache/huggingface/hub/ (the folder of that model) to this machine,\n"
        "and pass it: weights=PATH (on the command line --weights PATH).\n"
        "(pretrained=False gives random weights, if that is really what you want.)"
    )

