"""Honest evaluation: thresholds fitted on validation data only, image and pixel metrics, seeds, HTML report.

    rule = ConformalFPR(alpha=0.05)                  # or F1Optimal(), TargetSensitivity(0.95), make_rule(name)
    threshold = rule.fit(val_scores, val_labels)     # sees validation data only
    metrics = evaluate(test_scores, test_labels, threshold, anomaly_types=..., anomaly_maps=..., masks=...)
    write_metrics(metrics, run_dir)
    aeflow.evaluation.report.write_report(run_dir, title=..., test_scores=..., test_labels=..., threshold=threshold,
                                          metrics=metrics)

The report module (matplotlib, jinja2) is not imported here, so that serving can use thresholds without it.
"""

from aeflow.evaluation.metrics import (
    aggregate,
    evaluate,
    image_metrics,
    metrics_at_threshold,
    oracle_f1_on_test,
    per_type_metrics,
    pixel_metrics,
    write_aggregate,
    write_metrics,
)
from aeflow.evaluation.thresholds import (
    RULES,
    ConformalFPR,
    EvaluationError,
    F1Optimal,
    TargetSensitivity,
    Threshold,
    ThresholdRule,
    conformal_p_values,
    make_rule,
    scores_fingerprint,
)

__all__ = [
    "RULES", "ConformalFPR", "EvaluationError", "F1Optimal", "TargetSensitivity", "Threshold",
    "ThresholdRule", "aggregate", "conformal_p_values", "evaluate", "image_metrics",
    "make_rule", "metrics_at_threshold", "oracle_f1_on_test", "per_type_metrics", "pixel_metrics",
    "scores_fingerprint", "write_aggregate", "write_metrics",
]
