"""Probes of PneumoniaMNIST that explain the AE-FLOW numbers: how far simple image statistics get, and how the
flow bottleneck alone scores validation and test at several input sizes.

1. Global statistics (no training). AUROC on validation and test of single per-image statistics (standard
   deviation = contrast, mean, 5th percentile), and of an unsupervised score: the Mahalanobis distance of
   (mean, std, 5/25/50/75/95th percentiles) to a Gaussian fitted on the 1214 normal training images. A single
   statistic needs its sign chosen by someone who knows the disease (here: lower contrast = pneumonia), so it is
   a shortcut, not a method; it says how much of a score's AUROC contrast alone can explain.
2. Flow only (`--flow-sizes`): AE-FLOW's flow bottleneck (8 AllInOne steps, conv coupling) trained for
   `--epochs` on frozen EfficientNet-Lite0 stride-16 features of the normal training images (features are
   computed once), scored by the per-dimension NLL of z' (the paper's flow score, up to a monotone map) and by
   the full NLL of z (log-determinant included). Validation and test AUROC after every epoch.

    OMP_NUM_THREADS=1 python benchmarks/pneumonia_probe.py --flow-sizes 128,256 --intensities auto,percentile:1,99
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from common import emit_table, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


def global_statistics(data) -> list[str]:
    def stats(images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
        return np.c_[x.mean(1), x.std(1), np.percentile(x, [5, 25, 50, 75, 95], axis=1).T]

    train = stats(data["train_images"][data["train_labels"][:, 0] == 0])
    mean = train.mean(0)
    precision = np.linalg.inv(np.cov(train.T) + 1e-9 * np.eye(train.shape[1]))
    rows = ["| score | val AUROC | test AUROC |", "|---|---|---|"]
    scores = {
        "-std (low contrast = anomalous; sign chosen by hand)": lambda s: -s[:, 1],
        "mean intensity": lambda s: s[:, 0],
        "5th percentile": lambda s: s[:, 2],
        "Mahalanobis of 7 global statistics (unsupervised, fitted on train normals)":
            lambda s: np.einsum("ij,jk,ik->i", s - mean, precision, s - mean),
    }
    for name, score in scores.items():
        cells = []
        for split in ("val", "test"):
            s, y = stats(data[f"{split}_images"]), data[f"{split}_labels"][:, 0]
            cells.append(f"{roc_auc_score(y, score(s)):.3f}")
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


def flow_only(size: int, intensity: str, epochs: int, seed: int) -> list[str]:
    from aeflow.data import collate, load_data
    from aeflow.nn.backbones import create_backbone
    from aeflow.nn.flow import FlowBottleneck, bits_per_dim, standard_normal_log_prob

    torch.manual_seed(seed)
    np.random.seed(seed)  # FrEIA draws its permutations from numpy
    splits = load_data("medmnist", NPZ, image_size=size, intensity=intensity)
    encoder = create_backbone("efficientnet_lite0", pretrained=True, frozen=True).eval()

    @torch.no_grad()
    def features(dataset) -> tuple[torch.Tensor, np.ndarray]:
        batch = collate(list(dataset))
        feats = torch.cat([encoder(batch.image[i : i + 64]) for i in range(0, len(batch.image), 64)])
        return feats, batch.label.numpy()

    (train, _), (val, y_val), (test, y_test) = features(splits.train), features(splits.val), features(splits.test)
    # The scale a per-image feature norm removes: each image's feature std over (C, h, w), high = anomalous.
    print(f"size {size}, {intensity}: per-image feature std alone, val AUROC "
          f"{roc_auc_score(y_val, val.flatten(1).std(1).numpy()):.3f}, test AUROC "
          f"{roc_auc_score(y_test, test.flatten(1).std(1).numpy()):.3f}", flush=True)
    flow = FlowBottleneck(train.shape[1], 8, "conv")
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3, weight_decay=1e-5)

    @torch.no_grad()
    def nll(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        flow.eval()
        z_prime, log_det = flow(feats)
        log_p = standard_normal_log_prob(z_prime).flatten(1)
        return (-log_p.mean(1)).numpy(), (-(log_p.sum(1) + log_det) / log_p.shape[1]).numpy()

    rows = []
    for epoch in range(epochs):
        flow.train()
        for idx in torch.randperm(len(train)).split(32):
            z_prime, log_det = flow(train[idx])
            bits = bits_per_dim(standard_normal_log_prob(z_prime).flatten(1).sum(1), log_det, z_prime[0].numel())
            optimizer.zero_grad()
            bits.mean().backward()
            optimizer.step()
        (v_prime, v_full), (t_prime, t_full) = nll(val), nll(test)
        rows.append(f"| {size} | {intensity} | {epoch + 1} | {roc_auc_score(y_val, v_prime):.3f} | "
                    f"{roc_auc_score(y_test, t_prime):.3f} | {roc_auc_score(y_val, v_full):.3f} | "
                    f"{roc_auc_score(y_test, t_full):.3f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow-sizes", default="", help="comma-separated input sizes for the flow-only probe")
    parser.add_argument("--intensities", default="auto", help="comma-separated intensity rules for the flow probe")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Markdown file to write the tables to")
    args = parser.parse_args()
    if not NPZ.is_file():
        sys.exit(f"PneumoniaMNIST not found at {NPZ}")
    lines = [f"Machine: {machine()}", "", "Global image statistics (28 px originals):", ""]
    lines += global_statistics(np.load(NPZ))
    sizes = [int(s) for s in args.flow_sizes.split(",") if s]
    if sizes:
        lines += ["", f"Flow only on frozen EfficientNet-Lite0 features, seed {args.seed} (AUROC after each epoch):",
                  "", "| size | intensity | epoch | val, z' NLL | test, z' NLL | val, full NLL | test, full NLL |",
                  "|---|---|---|---|---|---|---|"]
        for size in sizes:
            for intensity in _split_rules(args.intensities):
                lines += flow_only(size, intensity, args.epochs, args.seed)
    table = "\n".join(lines)
    emit_table(table, args.out)


def _split_rules(text: str) -> list[str]:
    """'auto,percentile:1,99' -> ['auto', 'percentile:1,99']: a comma starts a new rule only before a letter."""
    rules: list[str] = []
    for part in text.split(","):
        if rules and part[:1].isdigit():
            rules[-1] += "," + part
        else:
            rules.append(part)
    return rules


if __name__ == "__main__":
    main()
