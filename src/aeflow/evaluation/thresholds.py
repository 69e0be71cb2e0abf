"""Decision thresholds, chosen on validation data only, by construction.

A `ThresholdRule` sees validation scores (and, for some rules, validation labels) in `fit` and returns a frozen
`Threshold`. The test-time `aeflow.evaluation.metrics.evaluate` accepts only such a `Threshold`, never a rule, so
no rule can ever read test labels. Each `Threshold` carries the fingerprint of the scores it was fitted on, and
`evaluate` refuses one fitted on the very scores it is asked to test (the common mistake of public AE-FLOW
reproductions, which picked their F1 threshold on the test set).

One convention everywhere: an image is predicted anomalous iff its score is strictly greater than the threshold
(`Threshold.predict`). That is the direction in which the conformal guarantee P(score > t) <= alpha holds.

Rules:
- `F1Optimal()`: the threshold that maximises F1 on labelled validation scores.
- `TargetSensitivity(target=0.95)`: the highest threshold whose validation sensitivity is at least `target`.
- `ConformalFPR(alpha=0.05)`: from normal validation scores only (split conformal): the ceil((n+1)(1-alpha))-th
  smallest of the n normal scores, so that a new, exchangeable normal image is flagged with probability at most
  alpha. With fewer than ceil(1/alpha) - 1 normals no finite threshold gives that guarantee: the threshold is then
  +inf (nothing is flagged) and `details["finite"]` is False.

For the labelled rules, the threshold is placed midway between the lowest validation score the rule flags and the
next lower validation score, so validation predictions are exactly the optimum's and the cut sits in the gap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.metrics import precision_recall_curve

from aeflow.errors import AeflowError, ConfigError

#: File in a run folder that holds the fitted Threshold (`Threshold.to_dict()` as JSON).
THRESHOLD_FILE = "threshold.json"


class EvaluationError(AeflowError):
    """Scores, labels or thresholds cannot be evaluated as asked (e.g. one class only, a threshold fit on test)."""


def as_scores(scores, what: str = "scores") -> np.ndarray:
    """Validate one score per image: a finite 1-D float array."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise EvaluationError(f"{what} must be a non-empty 1-D array of one score per image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise EvaluationError(f"{what} contain {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def as_labels(labels, n: int, what: str = "labels") -> np.ndarray:
    """Validate image labels: 0 (normal) or 1 (anomalous), one per score."""
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise EvaluationError(f"{what} must have shape ({n},) to match the scores, got {arr.shape}")
    if not np.all(np.isin(arr, (0, 1))):
        raise EvaluationError(f"{what} must be 0 (normal) or 1 (anomalous), got values {sorted(set(arr.tolist()))}")
    return arr.astype(np.int64)


def require_both_classes(labels: np.ndarray, what: str) -> None:
    """AUROC, F1 and sensitivity are undefined with one class: fail loudly rather than average a NaN into a table."""
    n_anomalous = int(labels.sum())
    if n_anomalous == 0 or n_anomalous == labels.size:
        present = "anomalous" if n_anomalous else "normal"
        raise EvaluationError(
            f"{what} contain only {present} images ({labels.size}); this needs both normal (0) and anomalous (1)"
        )


def scores_fingerprint(scores) -> str:
    """A short hash of the score values: lets `evaluate` recognise the scores a threshold was fitted on."""
    arr = np.ascontiguousarray(np.asarray(scores, dtype=np.float64))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Threshold:
    """A fitted, immutable decision threshold: predict anomalous iff score > value.

    rule: the rule and its parameters, e.g. "conformal_fpr(alpha=0.05)".
    fitted_on: `scores_fingerprint` of the validation scores the rule saw.
    n_fit: how many validation scores the rule saw.
    details: what the rule measured on validation data, as sorted (name, value) pairs (a tuple keeps it immutable).
    """

    value: float
    rule: str
    fitted_on: str
    n_fit: int
    details: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self):
        if math.isnan(self.value):
            raise EvaluationError(f"threshold of rule {self.rule} is NaN")

    def predict(self, scores) -> np.ndarray:
        """0/1 predictions for the given scores."""
        return (np.asarray(scores, dtype=np.float64) > self.value).astype(np.int64)

    def to_dict(self) -> dict:
        """JSON-ready form, e.g. to save next to a checkpoint; `from_dict` reads it back."""
        return {"value": _json_float(self.value), "rule": self.rule, "fitted_on": self.fitted_on,
                "n_fit": self.n_fit, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        value = d["value"]
        return cls(value=float(value), rule=d["rule"], fitted_on=d["fitted_on"], n_fit=int(d["n_fit"]),
                   details=tuple(sorted(d.get("details", {}).items())))


def _json_float(x: float) -> float | str:
    """JSON has no infinity: write "inf"/"-inf" strings (float() reads them back)."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _cut_below(lowest_flagged: float, scores: np.ndarray) -> float:
    """A threshold that flags exactly the scores >= lowest_flagged: midway to the next lower score."""
    below = scores[scores < lowest_flagged]
    if below.size == 0:
        return float(np.nextafter(lowest_flagged, -np.inf))
    lower = float(below.max())
    mid = (lowest_flagged + lower) / 2
    return mid if lower < mid < lowest_flagged else lower


def _ceil(x: float) -> int:
    """Ceiling robust to float noise: (99 + 1) * 0.9 is 90.00000000000001, whose ceiling must still be 90."""
    return math.ceil(round(x, 9))


def best_f1_cut(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of `score > threshold` over the given labelled scores; the highest among ties.

    Shared by `F1Optimal` (on validation) and `metrics.oracle_f1_on_test` (on test, labelled as such).
    """
    scores = as_scores(scores)
    labels = as_labels(labels, scores.size)
    require_both_classes(labels, "labels for the F1-optimal threshold")
    precision, recall, cuts = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return _cut_below(float(cuts[best]), scores), float(f1[best])


class ThresholdRule:
    """Chooses a `Threshold` from validation scores; subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    needs_labels: ClassVar[bool]

    def fit(self, val_scores, val_labels=None) -> Threshold:
        scores = as_scores(val_scores, "validation scores")
        labels = None if val_labels is None else as_labels(val_labels, scores.size, "validation labels")
        if self.needs_labels and labels is None:
            raise EvaluationError(f"threshold rule {self.describe()} needs labelled validation data (val_labels)")
        value, details = self._choose(scores, labels)
        return Threshold(value=float(value), rule=self.describe(), fitted_on=scores_fingerprint(scores),
                         n_fit=int(scores.size), details=tuple(sorted(details.items())))

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({params})"

    def _choose(self, scores: np.ndarray, labels: np.ndarray | None) -> tuple[float, dict]:
        raise NotImplementedError


@dataclass(frozen=True)
class F1Optimal(ThresholdRule):
    """Maximise F1 on labelled validation data."""

    name: ClassVar[str] = "f1_optimal"
    needs_labels: ClassVar[bool] = True

    def _choose(self, scores, labels):
        value, f1 = best_f1_cut(scores, labels)
        return value, {"val_F1": f1, "n_val_anomalous": int(labels.sum())}


@dataclass(frozen=True)
class TargetSensitivity(ThresholdRule):
    """The highest threshold (best specificity) whose validation sensitivity is at least `target`."""

    target: float = 0.95
    name: ClassVar[str] = "target_sensitivity"
    needs_labels: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 < self.target <= 1:
            raise ConfigError(f"target sensitivity must be in (0, 1], got {self.target}")

    def _choose(self, scores, labels):
        require_both_classes(labels, "validation labels for the target-sensitivity threshold")
        anomalous = np.sort(scores[labels == 1])[::-1]
        k = _ceil(self.target * anomalous.size)
        value = _cut_below(float(anomalous[k - 1]), scores)
        predicted = scores > value
        return value, {"val_SEN": float(predicted[labels == 1].mean()),
                       "val_SPE": float(1 - predicted[labels == 0].mean()),
                       "n_val_anomalous": int(anomalous.size)}


@dataclass(frozen=True)
class ConformalFPR(ThresholdRule):
    """Split-conformal threshold on normal validation scores: P(new normal score > t) <= alpha.

    Labels are optional: given, only the normal (0) scores are used; absent, all scores are taken as normal.
    """

    alpha: float = 0.05
    name: ClassVar[str] = "conformal_fpr"
    needs_labels: ClassVar[bool] = False

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ConfigError(f"conformal alpha (target false-positive rate) must be in (0, 1), got {self.alpha}")

    def _choose(self, scores, labels):
        normal = np.sort(scores if labels is None else scores[labels == 0])
        n = normal.size
        if n == 0:
            raise EvaluationError("conformal threshold needs normal validation scores; the labels have none")
        k = _ceil((n + 1) * (1 - self.alpha))
        details = {"alpha": self.alpha, "n_calibration": n, "rank": k, "finite": k <= n}
        if k > n:
            details["warning"] = (f"{n} normal scores are too few for alpha={self.alpha}: at least "
                                  f"{_ceil(1 / self.alpha) - 1} are needed; nothing will be flagged")
            return math.inf, details
        return float(normal[k - 1]), details


def conformal_p_values(calibration_scores, scores) -> np.ndarray:
    """Conformal p-values p(s) = (1 + #{calibration normal scores >= s}) / (n + 1).

    For an exchangeable new normal image, P(p <= alpha) <= alpha; `p <= alpha` flags exactly the scores above the
    `ConformalFPR(alpha)` threshold fitted on the same calibration scores (when those have no ties).
    """
    calibration = np.sort(as_scores(calibration_scores, "calibration scores"))
    s = np.asarray(scores, dtype=np.float64)
    n_at_least = calibration.size - np.searchsorted(calibration, s, side="left")
    return (1 + n_at_least) / (calibration.size + 1)


RULES: dict[str, type[ThresholdRule]] = {r.name: r for r in (F1Optimal, TargetSensitivity, ConformalFPR)}


#: Short names of the rules and the one parameter a "NAME:VALUE" spelling sets.
RULE_ALIASES = {"fpr": "conformal_fpr", "f1": "f1_optimal", "sensitivity": "target_sensitivity"}
_SHORT_PARAMETER = {"conformal_fpr": "alpha", "target_sensitivity": "target"}
RULE_SYNTAX = ("fpr:ALPHA (= conformal_fpr:ALPHA, conformal_fpr(alpha=ALPHA)), f1 (= f1_optimal), "
               "sensitivity:TARGET (= target_sensitivity:TARGET)")


def make_rule(name: str, **params) -> ThresholdRule:
    """A rule from the one vocabulary shared by the API, the command line and the run folder's files.

    Every spelling names the same rule: make_rule("fpr:0.05") == make_rule("conformal_fpr:0.05") ==
    make_rule("conformal_fpr", alpha=0.05) == make_rule("conformal_fpr(alpha=0.05)") (the form `describe` writes
    into threshold.json); likewise "f1" / "f1_optimal" and "sensitivity:0.95" / "target_sensitivity(target=0.95)".
    Keyword parameters (the command line's --threshold-option key=value) may not repeat one the text gives.
    """
    text = str(name).strip()
    given: dict[str, Any] = {}
    if text.endswith(")") and "(" in text:
        text, _, inner = text[:-1].partition("(")
        for pair in filter(None, (p.strip() for p in inner.split(","))):
            key, eq, value = pair.partition("=")
            if not eq:
                raise ConfigError(f"threshold rule {name!r}: expected NAME(key=value, ...); use {RULE_SYNTAX}")
            given[key.strip()] = _rule_number(name, value)
    elif ":" in text:
        text, _, value = text.partition(":")
        rule = RULE_ALIASES.get(text.strip(), text.strip())
        if rule not in _SHORT_PARAMETER:
            raise ConfigError(f"threshold rule {name!r}: '{text}' takes no parameter; use {RULE_SYNTAX}")
        given[_SHORT_PARAMETER[rule]] = _rule_number(name, value)
    rule = RULE_ALIASES.get(text.strip(), text.strip())
    if rule not in RULES:
        raise ConfigError(f"unknown threshold rule {name!r}; use {RULE_SYNTAX}")
    repeated = set(given) & set(params)
    if repeated:
        raise ConfigError(f"threshold rule {name!r}: {', '.join(sorted(repeated))} given twice")
    try:
        return RULES[rule](**given, **params)
    except TypeError as e:
        raise ConfigError(f"threshold rule {name!r}: {e}") from None


def _rule_number(rule: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"threshold rule {rule!r}: the parameter must be a number, got {value.strip()!r}") from None


# --- the run folder's thresholds: one per rule, and the one in use ---------------------------------------------------

#: Every threshold `aeflow test` has fitted for a run, keyed by rule (e.g. "conformal_fpr(alpha=0.05)").
THRESHOLDS_FILE = "thresholds.json"


def _read_thresholds(path: Path) -> list[Threshold]:
    try:
        document = json.loads(path.read_text())
        entries = [document] if path.name == THRESHOLD_FILE else list(document.values())
        # a threshold may hold just {"value", "rule"}; the fit's provenance fields are optional here
        return [Threshold.from_dict({"fitted_on": "", "n_fit": 0, **entry}) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a threshold file with a numeric 'value' and a 'rule' ({exc})") from exc


def fitted_thresholds(run_dir: str | Path) -> dict[str, Threshold]:
    """The run's thresholds by rule: thresholds.json, plus threshold.json's for a run tested before thresholds
    were kept per rule; ConfigError for a file that cannot be read."""
    run_dir = Path(run_dir)
    found: dict[str, Threshold] = {}
    for path in (run_dir / THRESHOLD_FILE, run_dir / THRESHOLDS_FILE):
        if path.is_file():
            found.update((t.rule, t) for t in _read_thresholds(path))
    return found


def save_threshold(run_dir: str | Path, threshold: Threshold, *, use: bool | None = None) -> bool:
    """Keep `threshold` in thresholds.json next to the rules fitted before (a re-fit of the same rule replaces
    it), and make it the one predict and serve use (threshold.json) when `use` is True, or when the run has none
    yet and `use` is None. Returns whether threshold.json now holds it. Both files are replaced atomically."""
    run_dir = Path(run_dir)
    kept = {rule: t.to_dict() for rule, t in fitted_thresholds(run_dir).items()}
    in_use = (run_dir / THRESHOLD_FILE).is_file()
    kept[threshold.rule] = threshold.to_dict()
    _write_json(run_dir / THRESHOLDS_FILE, kept)
    if use or (use is None and not in_use):
        _write_json(run_dir / THRESHOLD_FILE, threshold.to_dict())
        return True
    return False


def threshold_in_use(run_dir: str | Path, rule: str | None = None) -> Threshold:
    """The threshold predict and serve apply: threshold.json, or with `rule` the one fitted for that rule
    (by its full name, "conformal_fpr(alpha=0.05)", any spelling of it that make_rule reads, "fpr:0.05", or its
    base name, "conformal_fpr" / "fpr", when only one of that name was fitted)."""
    run_dir = Path(run_dir)
    if rule is None:
        path = run_dir / THRESHOLD_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the run has no decision threshold fitted on validation data. "
                              f"Run `aeflow test --run {run_dir}` to fit one, or retrain the run")
        return _read_thresholds(path)[0]
    fitted = fitted_thresholds(run_dir)
    if rule in fitted:
        return fitted[rule]
    try:  # any spelling of make_rule's vocabulary: "fpr:0.05" finds "conformal_fpr(alpha=0.05)"
        canonical = make_rule(rule).describe()
    except ConfigError:
        canonical = None
    if canonical in fitted and (":" in rule or "(" in rule):
        return fitted[canonical]
    base = RULE_ALIASES.get(rule, rule)
    matches = [t for name, t in fitted.items() if name.split("(")[0] == base]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(sorted(fitted)) or "none (run `aeflow test` first)"
    what = f"{len(matches)} thresholds of rule" if matches else "no threshold fitted for rule"
    raise ConfigError(f"{run_dir}: {what} {rule!r}; fitted: {choices}")


def _write_json(path: Path, document) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, path)
