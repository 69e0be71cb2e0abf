"""What training shows on the terminal: one plain line per epoch, and a progress bar only on a terminal.

    epoch 1/2  train_loss 0.4125  val_loss 0.3981  val_AUROC 0.812  12.4 s

The line fits 80 columns and reads the same in a log file: epochs count from 1 of N, the metrics are the epoch's
(the training loss averaged over the epoch; the validation image AUROC when validation holds anomalies). On a
terminal lightning's rich bar shows the progress inside an epoch, without metrics (they wrapped onto a line each at
80 columns) or lightning's version number; when stdout is not a terminal (a pipe, a log file, a batch job) there
is no bar, since its redrawn frames make a log unreadable, and only the lines are printed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

#: (metric logged by AnomalyModule, name on the line); those missing from an epoch are left out.
EPOCH_COLUMNS = (("train_loss_epoch", "train_loss"), ("val_loss", "val_loss"), ("val_image_AUROC", "val_AUROC"))


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, float], seconds: float) -> str:
    """The line for `epoch` (0-based, as lightning counts) out of `max_epochs`."""
    parts = [f"epoch {epoch + 1}/{max_epochs}" if max_epochs else f"epoch {epoch + 1}"]
    parts += [f"{label} {metrics[key]:.3f}" if "AUROC" in key else f"{label} {metrics[key]:.4g}"
              for key, label in EPOCH_COLUMNS if key in metrics]
    parts.append(f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s")
    return "  ".join(parts)


def show_progress_bar(stream: TextIO | None = None) -> bool:
    """A redrawn bar only where someone watches it: stdout is a terminal."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class EpochLines(L.Callback):
    """Prints `epoch_line` at the end of every training epoch (validation included), on the first process only."""

    def __init__(self, stream: TextIO | None = None):
        self.stream, self.started = stream, time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        line = epoch_line(trainer.current_epoch, trainer.max_epochs, metrics, time.perf_counter() - self.started)
        bar = trainer.progress_bar_callback
        console = getattr(bar, "_console", None) if isinstance(bar, RichProgressBar) else None
        if console is not None and self.stream is None:
            console.print(line, markup=False, highlight=False)  # above the live bar, which rich redraws below
        else:
            print(line, file=self.stream or sys.stdout, flush=True)


class NarrowProgressBar(RichProgressBar):
    """Lightning's rich bar with the description "epoch k/N" and no metrics (`EpochLines` prints them)."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        return {}

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"epoch {current_epoch + 1}/{max_epochs}" if max_epochs and max_epochs > 0 else f"epoch {current_epoch + 1}"
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
