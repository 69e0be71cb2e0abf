"""Train a model into a run folder, resume it after a crash, and load it back.

A run folder holds everything needed to use and to repeat the run:

    config.json            the full TrainConfig, the model's constructor arguments, seed, library versions,
                           and the sources of the labelled training anomalies (semi-supervised runs)
    splits.json            the file list of every split with checksums (aeflow.data.save_splits); a
                           semi-supervised run lists its labelled anomalies as the split "labelled"
    checkpoints/last.safetensors, checkpoints/best.safetensors
                           lightning checkpoints in aeflow's safe format (aeflow.training.checkpoint), written
                           atomically at the end of every epoch; best = highest validation image AUROC when the
                           validation split has labelled anomalies, else lowest validation loss on normals
    model.safetensors      the best weights plus the score calibration, what `load_run` reads
    selection.json         what was chosen on validation data: the criterion, the kept epoch and its value, and
                           the score blend weights of models that fit them (AE-FLOW)
    curves/metrics.csv     training curves (aeflow.training.curves, saved atomically); tensorboard/ or mlruns/
                           with --logger
    train.log              what happened, in words

Several processes (DDP through lightning: `strategy`, `devices`, `num_nodes`; launched by lightning itself, by
torchrun or by SLURM's srun, see docs/distributed.md) write ONE run folder: rank 0 writes every file, the
other ranks train and return. `batch_size` is per process, so the global batch is batch_size x processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

import aeflow
from aeflow.data import load_data, save_splits
from aeflow.data.sample import collate
from aeflow.errors import CheckpointError, ConfigError
from aeflow.models.base import MIN_VALIDATION_PER_CLASS, AnomalyModel, create_model, saved_model_options
from aeflow.training.checkpoint import (SafeCheckpointIO, load_checkpoint, model_state, newest_valid_checkpoint,
                                       save_checkpoint)
from aeflow.training.distributed import STRATEGIES, ShardSampler, WholeSplitSampler, launched_rank
from aeflow.training.console import EpochLines, NarrowProgressBar, show_progress_bar
from aeflow.training.curves import Curves, CurvesLogger
from aeflow.training.module import AnomalyModule
from aeflow.training.presets import preset
from aeflow.training.sampler import LabelledBatchSampler

log = logging.getLogger("aeflow.training")

CONFIG_FILE = "config.json"
SELECTION_FILE = "selection.json"
SELECT_ON = ("auto", "val_loss")
#: Experiment loggers besides the CSV curves every run keeps (curves/metrics.csv): TensorBoard event files in
#: tensorboard/, or an MLflow file store in mlruns/ (both local, offline).
LOGGERS = ("csv", "tensorboard", "mlflow")
MODEL_FILE = "model.safetensors"
# Settings a resumed run may change: they say how to run, not what is trained.
RESUMABLE_CHANGES = {"max_epochs", "patience", "progress_bar", "num_workers", "accelerator", "devices", "strategy",
                     "num_nodes"}


@dataclass
class TrainConfig:
    """Everything `train` needs; JSON-serialisable, stored in the run folder's config.json.

    model / model_kwargs: registry name and constructor arguments (see aeflow.models). `in_channels` is
        filled in from `channels` when the model takes it and model_kwargs does not say.
    data: arguments of aeflow.data.load_data besides image_size, channels and seed, e.g.
        {"layout": "synthetic", "root": None}.
    patience: epochs without a better selection metric (`selection_metric`) before stopping early; None trains
        max_epochs.
    precision: lightning's precision string, "32-true" or "bf16-mixed".
    preset: name of the preset (aeflow.training.presets) the other fields started from, if any.
    labelled_anomalies: K > 0 adds K labelled anomalous images from the layout's TRAINING pool (drawn with
        `seed`, never from val or test; see aeflow.data.load_data) for models that learn from them
        (`learns_from_labelled_anomalies`, e.g. "aeflow_gmm"); every training batch then holds some of them
        (aeflow.training.sampler.LabelledBatchSampler).
    select_on: what picks the kept checkpoint: "auto" (`selection_metric`: validation image AUROC when the
        validation split holds >= MIN_VALIDATION_PER_CLASS images of each class, else the validation loss of
        normals) or "val_loss" always.
    strategy, devices, num_nodes: lightning's; "ddp" or "ddp_spawn" (or devices / num_nodes above 1) train in
        several processes, each on its share of every epoch (aeflow.training.distributed.ShardSampler) with
        `batch_size` images per step. With strategy "auto", devices "auto" means ONE device: more than one
        process only when asked. Memory-bank models (PaDiM, PatchCore) fit on shards under "ddp".
    logger: "csv" (curves/metrics.csv only), "tensorboard" (also tensorboard/) or "mlflow" (also mlruns/, a local
        file store); the CSV curves are written in every case.
    """

    model: str = "aeflow"
    model_kwargs: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    image_size: int = 256
    channels: int = 1
    seed: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    max_epochs: int = 100
    patience: int | None = None
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    num_workers: int = 0
    progress_bar: bool = True
    preset: str | None = None
    labelled_anomalies: int = 0
    select_on: str = "auto"
    logger: str = "csv"

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict; with "preset", the preset's values come first and the dict overrides them
        (model_kwargs are merged key by key)."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        merged = preset(values["preset"]) if values.get("preset") else {}
        merged.update({k: v for k, v in values.items() if k != "model_kwargs"})
        merged["model_kwargs"] = {**merged.get("model_kwargs", {}), **values.get("model_kwargs", {})}
        config = cls(**merged)
        config.validate()
        return config

    @property
    def multiprocess(self) -> bool:
        """Whether more than one training process was asked for (any DDP strategy, node or device count > 1)."""
        return self.strategy != "auto" or self.num_nodes > 1 or str(self.devices) not in ("1", "auto")

    def validate(self) -> None:
        if self.image_size % 16 or not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.precision not in ("32-true", "bf16-mixed", "16-mixed"):
            raise ConfigError(f"precision must be '32-true', 'bf16-mixed' or '16-mixed', got {self.precision!r}")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1 or None, got {self.patience}")
        if isinstance(self.labelled_anomalies, bool) or not isinstance(self.labelled_anomalies, int) \
                or self.labelled_anomalies < 0:
            raise ConfigError(f"labelled_anomalies must be an integer >= 0, got {self.labelled_anomalies!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"num_nodes must be an integer >= 1, got {self.num_nodes!r}")
        if self.logger not in LOGGERS:
            raise ConfigError(f"logger must be one of {', '.join(LOGGERS)}, got {self.logger!r}")
        _check_logger_installed(self.logger)
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if "labelled_anomalies" in self.data:
            raise ConfigError("give labelled_anomalies as a training option, not inside data")


def train(config: dict | TrainConfig, run_dir: str | Path, *, data=None, resume: bool = False) -> Path:
    """Train `config` into `run_dir` and return it.

    data: an aeflow.data.DataSplits; by default loaded with aeflow.data.load_data from config.data,
        config.image_size, config.channels and config.seed.
    resume: continue the run in `run_dir` from checkpoints/last.safetensors (after a crash or a kill), with
        the stored config; only RESUMABLE_CHANGES may differ in `config`. Without resume, a folder that
        already holds a run is refused rather than overwritten.
    """
    run_dir = Path(run_dir)
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    config.validate()
    last_checkpoint = run_dir / "checkpoints" / "last.safetensors"
    # The other processes of a multi-process run train and return; they may start after rank 0 wrote the folder.
    writer = launched_rank() == 0
    if resume:
        config = _resumed_config(run_dir, config)
    elif writer and ((run_dir / CONFIG_FILE).exists() or last_checkpoint.exists()):
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume (resume=True in Python), or "
                          f"choose a new name (--name) or folder")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)

    # A start that fails before config.json is written (bad data, a bad model option) removes the folder it made:
    # it would hold only train.log, and a later run of the same name would then be refused as "already a run".
    with _log_to(run_dir / "train.log", discard=created) if writer else contextlib.nullcontext():
        L.seed_everything(config.seed, workers=True, verbose=False)
        if data is None:
            data = load_data(image_size=config.image_size, channels=config.channels, seed=config.seed,
                             labelled_anomalies=config.labelled_anomalies, **config.data)
        model = _build_model(config, sorted({r.anomaly_type for r in data.records.labelled}))
        if config.strategy == "ddp_spawn":
            _check_picklable(model, config.model)
        labelled = _labelled_for_training(data, config, model)
        train_set, val_set, holdout, val_labels = _split_for_training(data, config.seed)
        val_has_anomalies = 1 in val_labels
        monitor, mode = selection_metric(val_labels if config.select_on == "auto" else [])
        if not resume and writer:
            _write_config(run_dir, config, model, holdout, [r.source for r in data.records.labelled])
            save_splits(data, run_dir)

        def loader(dataset: Dataset, shuffle: bool = False, sampler=None) -> DataLoader:
            return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, sampler=sampler,
                              collate_fn=collate, num_workers=config.num_workers,
                              persistent_workers=config.num_workers > 0)

        if labelled is None and config.multiprocess:
            # A memory-bank fit sums over its shard in one pass: no shuffle, and no image dealt twice (pad=False).
            by_gradient = model.trained_by_gradient
            train_loader = loader(train_set, sampler=ShardSampler(train_set, shuffle=by_gradient, seed=config.seed,
                                                                  pad=by_gradient))
        elif labelled is None:
            train_loader = loader(train_set, shuffle=True)
        else:
            sampler = LabelledBatchSampler(len(train_set), len(labelled), config.batch_size, seed=config.seed)
            train_loader = DataLoader(ConcatDataset([train_set, labelled]), batch_sampler=sampler, collate_fn=collate,
                                      num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
            log.info("training on %d normal images and %d labelled anomalies, %d of them in every batch",
                     len(train_set), len(labelled), sampler.per_batch)
        if model.trained_by_gradient:
            # A kill during the write of `last` leaves it torn (or absent): resume from the furthest checkpoint that loads.
            ckpt_path = newest_valid_checkpoint([last_checkpoint, last_checkpoint.with_name("best.safetensors")]) \
                if resume else None
            if ckpt_path is not None:
                state = load_checkpoint(ckpt_path)
                log.info("resuming from %s: epoch %d done, global step %d", ckpt_path, state["epoch"] + 1,
                         state["global_step"])
            elif resume:
                log.info("resume asked but no checkpoint was written yet: training from the start")
            module = AnomalyModule(model, config.lr, config.weight_decay, val_has_anomalies=val_has_anomalies)
            curves = Curves(run_dir / "curves")
            if ckpt_path is not None and writer:
                curves.set_aside(epochs_done=state["epoch"] + 1)
            with _quiet_lightning():
                # Before fit no process group exists: len(train_loader) is the epoch's steps over all processes.
                processes = config.devices * config.num_nodes if isinstance(config.devices, int) else 1
                trainer, checkpoints = _trainer(config, run_dir, steps_per_epoch=-(-len(train_loader) // processes),
                                                monitor=monitor, mode=mode)
                # Every rank validates on the whole split (see aeflow.training.module).
                trainer.fit(module, train_loader, loader(val_set, sampler=WholeSplitSampler(val_set)),
                            ckpt_path=ckpt_path)
            if trainer.global_rank != 0:
                return run_dir
            curves.merge()
            log.info("training stopped after epoch %d, global step %d", trainer.current_epoch, trainer.global_step)
            best = Path(checkpoints.best_model_path) if checkpoints.best_model_path else last_checkpoint
            kept = load_checkpoint(best)
            model.load_state_dict(model_state(kept))
            # Under ddp_spawn the score stays in the worker processes; the checkpoint holds it too.
            score = checkpoints.best_model_score if checkpoints.best_model_score is not None else \
                kept.get("callbacks", {}).get(checkpoints.state_key, {}).get("best_model_score")
            selection = {"criterion": monitor, "mode": mode, "kept_checkpoint": best.name,
                         "kept_epoch": int(kept["epoch"]), "value": None if score is None else float(score)}
            log.info("kept the weights of %s, epoch %d (%s %s)", best.name, kept["epoch"], monitor,
                     "n/a" if score is None else f"{float(score):.5g}")
        else:
            with _fit_processes(config) as rank:
                model.fit(train_loader)  # under DDP each rank fits its shard and the model merges them
            if rank != 0:
                return run_dir
            selection = {"criterion": "none (fitted in one pass)"}
        if getattr(model, "n_stages", 0) and not model.reference_fitted:
            # The kept checkpoint holds the reference of its epoch; one written before any validation pass does not.
            model.fit_reference(loader(train_set, shuffle=False))
            log.info("fitted the per-position reference on the %d training images", len(train_set))
        if hasattr(model, "calibrate"):
            # Normal validation images give the statistics; labelled anomalies, where there are any, the blend.
            model.calibrate(loader(val_set, shuffle=False))
            log.info("calibrated the scores on the %s", "held-out training images and the validation split"
                     if holdout else "validation split")
        if hasattr(model, "blend_weights"):
            selection["blend_weights"] = model.blend_weights()
            log.info("score blend weights: %s", ", ".join(f"{k}={v:.2f}" for k, v in selection["blend_weights"].items()))
        _write_json(run_dir / SELECTION_FILE, selection)
        save_checkpoint({"model": model.name, "config": model.config(), "state_dict": model.state_dict()},
                        run_dir / MODEL_FILE)
        log.info("wrote %s", run_dir / MODEL_FILE)
    return run_dir


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[AnomalyModel, dict]:
    """The trained model of a run (in eval mode) and its config.json, rebuilt without unpickling anything.

    Reads model.safetensors (best weights and calibration); for a run that never finished, the best or last
    checkpoint instead (then uncalibrated). Pretrained-weight files are not needed: the run holds every
    weight, so the model is built with pretrained=False and then filled from the run. config.json is checked
    against the run-folder schema (aeflow.training.schema) and the model it describes against the weights file's
    header before the model is built: a crafted config is a ConfigError or CheckpointError, never an allocation.
    """
    from aeflow.training.checkpoint import checkpoint_shapes
    from aeflow.training.schema import check_weights_fit, read_config, validate_config

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    try:
        config = read_config(config_path)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    validate_config(config, config_path)
    candidates = [run_dir / MODEL_FILE, run_dir / "checkpoints" / "best.safetensors",
                  run_dir / "checkpoints" / "last.safetensors"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise CheckpointError(f"{run_dir}: no weights ({', '.join(p.name for p in candidates)} all missing)")
    model_name = config["train"]["model"]
    kwargs = without_weight_files(model_name, saved_model_options(model_name, config["model_config"]))
    check_weights_fit(model_name, kwargs, checkpoint_shapes(found, model_file=found.name == MODEL_FILE), found,
                      config_path)
    checkpoint = load_checkpoint(found)
    state = checkpoint["state_dict"] if found.name == MODEL_FILE else model_state(checkpoint)
    model = create_model(model_name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{found}: weights do not fit the model in {CONFIG_FILE}: {exc}") from exc
    if found.name != MODEL_FILE:
        log.warning("%s has no model.safetensors (unfinished run?): loaded %s", run_dir, found.name)
    return model.to(device).eval(), config


def _build_model(config: TrainConfig, labelled_types: list[str], **overrides) -> AnomalyModel:
    """The model of `config`, fitted to the data where the config leaves it open: the data's channel count, and for
    a model with a component per anomaly type (`takes_anomaly_types`), the types of the labelled anomalies.
    overrides: constructor options over the config's (`model_config_now` builds without pretrained weights)."""
    given = {**config.model_kwargs, **overrides}
    kwargs = dict(given)
    model = create_model(config.model, **kwargs)
    if model.config().get("in_channels", config.channels) != config.channels and "in_channels" not in kwargs:
        kwargs["in_channels"] = config.channels
    if getattr(model, "takes_anomaly_types", False) and labelled_types and "anomaly_types" not in kwargs:
        kwargs["anomaly_types"] = labelled_types
    return model if kwargs == given else create_model(config.model, **kwargs)


#: The constructor options that say where a backbone's weights come from (not what the model is), set so that
#: none are loaded: a saved run's weights come from its checkpoint.
NO_WEIGHT_FILES = {"pretrained": False, "weights": None}


def without_weight_files(model: str, options: dict) -> dict:
    """`options` for `model` with NO_WEIGHT_FILES set wherever its constructor takes them."""
    from aeflow.models.base import _REGISTRY
    from aeflow.training.schema import model_keywords

    names, _ = model_keywords(_REGISTRY[model])
    return {**options, **{k: v for k, v in NO_WEIGHT_FILES.items() if k in names}}


def model_config_now(config: TrainConfig, labelled_types: list[str]) -> dict:
    """The model config (`AnomalyModel.config()`, JSON as in config.json) that training `config` records with the
    code as it is now, less the weight-source options: the model is built without loading pretrained weights. A
    run whose recorded model config differs (`saved_model_options`) was trained before a model default changed."""
    overrides = without_weight_files(config.model, {})
    built = _build_model(config, labelled_types, **overrides).config()
    return without_weight_source(json.loads(json.dumps(built, default=str)))


def without_weight_source(model_config: dict) -> dict:
    return {k: v for k, v in model_config.items() if k not in NO_WEIGHT_FILES}


def _labelled_for_training(data, config: TrainConfig, model: AnomalyModel) -> Dataset | None:
    """The labelled anomalies to train on (None without), after checking that data, config and model agree."""
    found = len(data.records.labelled)
    if found != config.labelled_anomalies:
        raise ConfigError(f"the data holds {found} labelled anomalies but the config asks for "
                          f"labelled_anomalies={config.labelled_anomalies}: load it with the same count")
    if not found:
        return None
    if not getattr(model, "learns_from_labelled_anomalies", False):
        raise ConfigError(f"model {config.model!r} trains on normal images only and would ignore labelled anomalies; "
                          f"use a semi-supervised model (e.g. 'aeflow_gmm') or labelled_anomalies=0")
    return data.labelled


def selection_metric(val_labels: list[int]) -> tuple[str, str]:
    """What picks the kept checkpoint (and stops early): the validation image AUROC of the model's score when the
    validation labels hold at least MIN_VALIDATION_PER_CLASS normal and anomalous images each (on
    PneumoniaMNIST the validation loss of normals keeps falling while the AUROC peaks and falls), else the
    validation loss of normal images, which needs no labels."""
    enough = min(val_labels.count(0), val_labels.count(1)) >= MIN_VALIDATION_PER_CLASS
    return ("val_image_AUROC", "max") if enough else ("val_loss", "min")


def _split_for_training(data, seed: int) -> tuple[Dataset, Dataset, list[str], list[int]]:
    """(train, validation, paths held out of training, the validation images' labels).

    Calibration (and the validation loss) use the normal validation images. A validation split without
    normals gets a held-out 10% (at least 2) of the training images added to it, drawn with the run's seed;
    their paths go into config.json so the run can be repeated.
    """
    val_labels = [r.label for r in data.records.val]
    if 0 in val_labels:
        return data.train, data.val, [], val_labels
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(2, len(order) // 10)
    held = Subset(data.train, order[:n_held])
    log.info("the validation split has no normal images: holding out %d training images for validation "
             "and calibration", n_held)
    return (Subset(data.train, order[n_held:]), ConcatDataset([held, data.val]),
            [data.train[i].path for i in order[:n_held]], [0] * n_held + val_labels)


def _trainer(config: TrainConfig, run_dir: Path, steps_per_epoch: int, monitor: str,
             mode: str) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoints = _SafeModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode, save_top_k=1,
        every_n_epochs=1, enable_version_counter=False,
    )
    # A callback of its own for "last": lightning's save_last writes it only in epochs whose metric improved, and
    # a resume must continue from the last finished epoch, not from the best one.
    last = _SafeModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                                every_n_epochs=1, enable_version_counter=False)
    callbacks: list[L.Callback] = [checkpoints, last, _EpochLog()]
    if config.patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=config.patience))
    bar = config.progress_bar and show_progress_bar()  # a redrawn bar only on a terminal; lines always
    if config.progress_bar:
        callbacks.append(EpochLines())
    if bar:
        callbacks.append(NarrowProgressBar())
    devices = 1 if config.devices == "auto" and not config.multiprocess else config.devices
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        # The samplers are aeflow's (ShardSampler, LabelledBatchSampler, WholeSplitSampler), rank-aware already.
        use_distributed_sampler=False,
        # torch's SyncBatchNorm runs on GPUs only; on CPUs each rank normalises with its own batch's statistics.
        sync_batchnorm=config.multiprocess and config.accelerator != "cpu" and torch.cuda.is_available(),
        precision=config.precision,
        logger=_loggers(config, run_dir),
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        default_root_dir=run_dir,
    )
    return trainer, checkpoints


def _check_picklable(model: AnomalyModel, name: str) -> None:
    """ddp_spawn sends the model to the processes it starts by pickling it; FrEIA's flows (AE-FLOW, FastFlow, ...)
    hold lambdas and cannot be pickled, so say so before anything is written."""
    import pickle

    try:
        pickle.dumps(model)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ConfigError(f"model {name!r} cannot be sent to the processes ddp_spawn starts ({error}): use strategy "
                          "'ddp' (or launch the processes with torchrun / srun)") from None


@contextlib.contextmanager
def _fit_processes(config: TrainConfig) -> Iterator[int]:
    """Around a memory-bank model's `fit`: in one process, nothing (yields rank 0); with `config.multiprocess`,
    the processes of lightning Fabric's launcher (or of torchrun / srun, which it joins) and a gloo process group
    for the model's collective sums and gathers (the fits run on CPU tensors); yields this process's rank."""
    if not config.multiprocess:
        yield 0
        return
    if config.strategy == "ddp_spawn":
        raise ConfigError(f"model {config.model!r} fits in one pass without gradients: run it with strategy 'ddp' "
                          "(or launch the processes with torchrun / srun), not 'ddp_spawn'")
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                    strategy=DDPStrategy(process_group_backend="gloo"))
    fabric.launch()
    log.info("fitting on %d processes, this one rank %d", fabric.world_size, fabric.global_rank)
    yield fabric.global_rank
    fabric.barrier()


def _check_logger_installed(logger: str) -> None:
    """Refuse a logger whose package is missing before anything is read or written (ConfigError saying how)."""
    import importlib.util

    needs = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install 'aeflow[loggers]' (tensorboard)"),
             "mlflow": (("mlflow",), "pip install mlflow-skinny (it logs to a local file store, <run>/mlruns)")}
    if logger in needs and not any(importlib.util.find_spec(name) for name in needs[logger][0]):
        raise ConfigError(f"--logger {logger} needs the {needs[logger][0][0]} package, which is not installed: "
                          f"{needs[logger][1]}; or use --logger csv")


def _loggers(config: TrainConfig, run_dir: Path) -> list:
    """The CSV curves always (reports and resume read them), plus the experiment logger asked for."""
    loggers: list = [CurvesLogger(run_dir)]
    if config.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            loggers.append(TensorBoardLogger(run_dir, name="", version="tensorboard", default_hp_metric=False))
        except ModuleNotFoundError as exc:
            raise ConfigError(f"--logger tensorboard needs the tensorboard package ({exc}): "
                              f"pip install 'aeflow[loggers]' or pip install tensorboard") from None
    elif config.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        try:
            loggers.append(MLFlowLogger(experiment_name="aeflow", run_name=run_dir.name,
                                        tracking_uri=(run_dir / "mlruns").resolve().as_uri()))
        except ModuleNotFoundError as exc:
            raise ConfigError(f"--logger mlflow needs the mlflow package ({exc}): pip install mlflow-skinny "
                              f"(it logs to a local file store, run_dir/mlruns)") from None
    return loggers


class _SafeModelCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint callback; the files are safetensors (written by SafeCheckpointIO).

    The loggers write what they hold before each checkpoint: a run killed after its checkpoint of epoch k then
    has epoch k's curve rows on disk too, and resuming from that checkpoint (which does not train epoch k again)
    loses no row of the curves."""

    FILE_EXTENSION = ".safetensors"

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
        super()._save_checkpoint(trainer, filepath)


class _EpochLog(L.Callback):
    """One line per epoch in train.log, with the epoch's metrics."""

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("loss", "epoch"))
                   or "AUROC" in k}
        log.info("epoch %d (global step %d): %s", trainer.current_epoch, trainer.global_step,
                 ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))


def _resumed_config(run_dir: Path, config: TrainConfig) -> TrainConfig:
    try:
        document = json.loads((run_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no run to resume (no {CONFIG_FILE})") from None
    stored = document["train"]
    # A field added after the run was written counts as its default there.
    defaults = dataclasses.asdict(TrainConfig())
    changed = {k for k, v in dataclasses.asdict(config).items() if stored.get(k, _jsonable(defaults[k])) != _jsonable(v)}
    if changed - RESUMABLE_CHANGES:
        raise ConfigError(f"cannot resume {run_dir} with a different {', '.join(sorted(changed - RESUMABLE_CHANGES))}"
                          f"; only {', '.join(sorted(RESUMABLE_CHANGES))} may change")
    # The model is rebuilt as the run recorded it (config.json's model_config, plus the value older runs had for an
    # option added since), as load_run does: a default changed since the run started would not fit its checkpoints.
    recorded = saved_model_options(config.model, document.get("model_config", {}))
    return dataclasses.replace(config, model_kwargs={**recorded, **config.model_kwargs})


def _write_config(run_dir: Path, config: TrainConfig, model: AnomalyModel, holdout: list[str],
                  labelled: list[str]) -> None:
    import numpy

    document: dict[str, Any] = {
        "train": dataclasses.asdict(config),
        "model_config": model.config(),
        "calibration_holdout": holdout,
        "labelled_anomalies": labelled,
        "versions": {
            "aeflow": aeflow.__version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": L.__version__,
            "FrEIA": _package_version("FrEIA"),  # FrEIA has no __version__; its metadata has
            "numpy": numpy.__version__,
            "platform": platform.platform(),
        },
    }
    _write_json(run_dir / CONFIG_FILE, document)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _write_json(path: Path, document: Any) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# Lightning messages that say nothing about the run: an advertisement, a deprecation inside lightning itself, the
# note that frozen modules (our pretrained backbones, by design) are in eval mode, and, on resume, that the curves
# and checkpoint folders are not empty (`Curves` keeps the old curves; the checkpoints are meant to be there).
_LIGHTNING_NOISE = ("Tip: For seamless cloud logging", "LeafSpec)` is deprecated", "module(s) in eval mode",
                    "exists and is not empty")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _LIGHTNING_NOISE)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Drop `_LIGHTNING_NOISE` from warnings and lightning's log while a trainer is built and fitted."""
    lightning_log, noise = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _DropNoise()
    with warnings.catch_warnings():
        for text in _LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
        lightning_log.addFilter(noise)
        try:
            yield
        finally:
            lightning_log.removeFilter(noise)


class _log_to:
    """Copy aeflow's and lightning's log records into `path` while training runs; with `discard`, a failure before
    the run's config.json exists removes the folder of `path` (the caller made it)."""

    def __init__(self, path: Path, *, discard: bool = False):
        self.path, self.discard = path, discard
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.loggers = [logging.getLogger("aeflow"), logging.getLogger("lightning.pytorch")]
        self.levels = [logger.level for logger in self.loggers]

    def __enter__(self) -> None:
        for logger in self.loggers:
            logger.addHandler(self.handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is not None:
            log.error("training failed", exc_info=exc_info)
        for logger, level in zip(self.loggers, self.levels):
            logger.removeHandler(self.handler)
            logger.setLevel(level)
        self.handler.close()
        if exc_info[0] is not None and self.discard and not (self.path.parent / CONFIG_FILE).exists():
            shutil.rmtree(self.path.parent, ignore_errors=True)
