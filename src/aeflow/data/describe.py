"""A data set at a glance: counts per split and class, image sizes, raw intensity ranges, skipped files."""

from __future__ import annotations

from collections import Counter


def summarize(data) -> dict:
    """Structured summary of a DataSplits (JSON-serialisable)."""
    splits = {}
    for name, dataset in data.records.splits().items():
        stats = [data.stats[r.source] for r in dataset if r.source in data.stats]
        heights = [s["size"][0] for s in stats]
        widths = [s["size"][1] for s in stats]
        splits[name] = {
            "images": len(dataset),
            "normal": sum(r.label == 0 for r in dataset),
            "anomalous": sum(r.label == 1 for r in dataset),
            "by_type": dict(sorted(Counter(r.anomaly_type for r in dataset).items())),
            "with_pixel_truth": sum(r.has_pixel_truth for r in dataset),
            "sizes": {"distinct": len(set(zip(heights, widths))), "height": _range(heights), "width": _range(widths)}
            if stats else None,
            "raw_dtypes": sorted({s["dtype"] for s in stats}),
            "raw_range": [min(s["min"] for s in stats), max(s["max"] for s in stats)] if stats else None,
            "intensity_rules": sorted({s["intensity"] for s in stats}),
        }
    return {
        "layout": data.records.layout,
        "root": data.records.root,
        "seed": data.records.seed,
        "options": data.records.options,
        "image_size": data.train.image_size,
        "channels": data.train.channels,
        "intensity": data.train.intensity,
        "splits": splits,
        "skipped": [{"path": path, "reason": reason} for path, reason in data.skipped],
    }


def describe(data) -> str:
    """Human-readable summary of a DataSplits, as `aeflow data describe` prints it."""
    summary = summarize(data)
    lines = [f"layout {summary['layout']}  root {summary['root']}  seed {summary['seed']}",
             f"output: {summary['channels']} channel(s), size {summary['image_size'] or 'original'}, "
             f"intensity rule {summary['intensity']}"]
    for name, split in summary["splits"].items():
        types = ", ".join(f"{k} {v}" for k, v in split["by_type"].items())
        lines.append(f"{name:5s}: {split['images']} images ({split['normal']} normal, {split['anomalous']} anomalous"
                     f"; {types or 'empty'}); {split['with_pixel_truth']} with pixel ground truth")
        if split["sizes"]:
            sizes = split["sizes"]
            lines.append(f"       sizes: {sizes['distinct']} distinct, height {_fmt(sizes['height'])}, width "
                         f"{_fmt(sizes['width'])}; raw {'/'.join(split['raw_dtypes'])} values "
                         f"{split['raw_range'][0]:g}..{split['raw_range'][1]:g}; rule {', '.join(split['intensity_rules'])}")
    lines.append(f"skipped: {len(summary['skipped'])} file(s)")
    lines += [f"  {s['path']}: {s['reason']}" for s in summary["skipped"]]
    return "\n".join(lines)


def _range(values: list[int]) -> list[int]:
    return [min(values), max(values)]


def _fmt(bounds: list[int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"
