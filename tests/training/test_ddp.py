"""Training in several processes (DDP, CPU, gloo) gives what one process gives, in one run folder.

The multi-process tests launch real processes with torchrun (`python -m torch.distributed.run --standalone`), as
a user would; each launch trains a list of runs so that the processes start (and import torch) once.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Subset

from aeflow.data import load_data
from aeflow.data.sample import collate
from aeflow.errors import ConfigError
from aeflow.training import TrainConfig, load_run, train
from aeflow.training import distributed
from aeflow.training import sampler as sampler_module
from aeflow.training.distributed import ShardSampler, launched_rank, shard_batches
from aeflow.training.sampler import LabelledBatchSampler

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from aeflow.training import train
    for config, run_dir, resume in json.loads(open(sys.argv[1]).read()):
        train(config, run_dir, resume=resume)
""")

TINY_AEFLOW = {
    "model": "aeflow",
    "model_kwargs": {"backbone": "resnet18", "pretrained": False, "flow_steps": 2, "subnet": "conv",
                     "decoder_widths": [32, 16, 8]},
    # 20 + 20 validation images: the kept epoch is chosen on validation AUROC, which needs the whole split.
    "data": {"layout": "synthetic", "n_train": 32, "n_val": 40, "n_test": 4},
    "image_size": 64, "max_epochs": 3, "progress_bar": False, "accelerator": "cpu", "strategy": "ddp",
}
MEMORY_BANK = {
    # 11 images: shards of 6 and 5, so an image dealt twice (padding) would show in PaDiM's sums.
    "model_kwargs": {"backbone": "resnet18", "pretrained": False}, "batch_size": 4, "image_size": 64,
    "data": {"layout": "synthetic", "n_train": 11, "n_val": 4, "n_test": 2}, "progress_bar": False,
    "accelerator": "cpu",
}


# 14 normals and 3 labelled anomalies, batch 4 per process: 5 batches of 3 normals + 1 anomaly per epoch.
SEMI_SUPERVISED = {**TINY_AEFLOW, "model": "aeflow_gmm", "labelled_anomalies": 3, "batch_size": 4, "devices": 2,
                   "max_epochs": 1, "data": {"layout": "synthetic", "n_train": 14, "n_val": 8, "n_test": 4}}


def torchrun(processes: int, runs: list, folder: Path) -> None:
    """Train `runs` ([config, run folder, resume] each, in turn) in `processes` processes started by torchrun."""
    (folder / "worker.py").write_text(WORKER)
    (folder / f"runs-{processes}.json").write_text(json.dumps(runs))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           str(folder / "worker.py"), str(folder / f"runs-{processes}.json")],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def curve(run: Path) -> dict[str, dict[tuple[int, int], float]]:
    """Each logged loss column of curves/metrics.csv: {(epoch, step): value}."""
    with open(run / "curves" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ("train_loss_step", "train_loss_epoch", "train_loss_recon_epoch", "train_loss_flow_epoch", "val_loss")
    return {c: {(int(r["epoch"]), int(r["step"])): float(r[c]) for r in rows if r.get(c)} for c in columns}


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch of 2 processes: AE-FLOW (batch 4 per process) for 2 epochs then resumed to 3, PaDiM,
    PatchCore and semi-supervised AE-FLOW-GMM; one of 1 process: AE-FLOW with batch 8, 3 epochs uninterrupted."""
    folder = tmp_path_factory.mktemp("ddp")
    two = {**TINY_AEFLOW, "batch_size": 4, "devices": 2}
    memory_bank = {**MEMORY_BANK, "strategy": "ddp", "devices": 2}
    torchrun(2, [[{**two, "max_epochs": 2}, str(folder / "aeflow-2"), False],
                 [two, str(folder / "aeflow-2"), True],
                 [{**memory_bank, "model": "padim", "model_kwargs": {**MEMORY_BANK["model_kwargs"], "n_features": 24}},
                  str(folder / "padim-2"), False],
                 [{**memory_bank, "model": "patchcore",
                   "model_kwargs": {**MEMORY_BANK["model_kwargs"], "coreset_ratio": 0.1}},
                  str(folder / "patchcore-2"), False],
                 [SEMI_SUPERVISED, str(folder / "gmm-2"), False]], folder)
    torchrun(1, [[{**TINY_AEFLOW, "batch_size": 8, "devices": 1}, str(folder / "aeflow-1"), False]], folder)
    return folder


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(ddp_runs):
    """Same global batch (2 x 4 vs 1 x 8, the same images in every step), same curve. Tolerance 2e-3 relative:
    the decoder's BatchNorm normalises with each process's own 4 images (torch's SyncBatchNorm runs on GPUs only),
    which moved the losses by at most 1.7e-4 relative here; the losses themselves fall by 16% over the 3 epochs."""
    one, two = curve(ddp_runs / "aeflow-1"), curve(ddp_runs / "aeflow-2")
    for column in one:
        # Every point of the one-process curve is in the two-process one (a resumed fit may log one step more).
        assert len(one[column]) >= 3 and set(one[column]) <= set(two[column]), column
        np.testing.assert_allclose([two[column][k] for k in one[column]], list(one[column].values()), rtol=2e-3,
                                   err_msg=column)
    epochs = {c: [k[0] for k in one[c]] for c in ("train_loss_epoch", "val_loss")}
    assert epochs == {"train_loss_epoch": [0, 1, 2], "val_loss": [0, 1, 2]}  # the resumed run kept its first 2
    losses = list(one["train_loss_epoch"].values())
    assert losses[-1] < 0.95 * losses[0]  # the tolerance is far below what training changes


@pytest.mark.slow
def test_two_processes_write_one_run_folder(ddp_runs):
    one, two = ddp_runs / "aeflow-1", ddp_runs / "aeflow-2"
    assert files(two) == files(one)
    assert "config.json" in files(two) and "model.safetensors" in files(two) and "selection.json" in files(two)
    log = (two / "train.log").read_text()
    assert log.count("wrote ") == 2 and log.count("resuming from") == 1  # one writer, two calls (first + resume)
    config = json.loads((two / "config.json").read_text())["train"]
    assert config["strategy"] == "ddp" and config["devices"] == 2
    assert json.loads((two / "selection.json").read_text())["kept_epoch"] == \
        json.loads((one / "selection.json").read_text())["kept_epoch"]


@pytest.mark.slow
def test_validation_auroc_is_that_of_the_whole_split(ddp_runs):
    """The kept epoch's validation AUROC (logged by both processes) is the AUROC of the whole validation split
    scored by the kept weights, not of one process's half of it."""
    run = ddp_runs / "aeflow-2"
    selection = json.loads((run / "selection.json").read_text())
    assert selection["criterion"] == "val_image_AUROC"
    model, config = load_run(run)
    data = load_data(image_size=64, channels=1, seed=0, **TINY_AEFLOW["data"])
    batch = collate([data.val[i] for i in range(len(data.val))])
    scores = model.predict(batch.image)["pred_score"].numpy()
    assert len(scores) == 40
    assert abs(roc_auc_score(batch.label.numpy(), scores) - selection["value"]) < 1e-6
    half = slice(0, None, 2)
    assert abs(roc_auc_score(batch.label.numpy()[half], scores[half]) - selection["value"]) > 1e-6


@pytest.mark.slow
def test_padim_fitted_on_two_ranks_equals_one_rank(ddp_runs, tmp_path):
    one = train({**MEMORY_BANK, "model": "padim",
                 "model_kwargs": {**MEMORY_BANK["model_kwargs"], "n_features": 24}}, tmp_path / "padim-1")
    model_one, _ = load_run(one)
    model_two, _ = load_run(ddp_runs / "padim-2")
    assert "fitting on 2 processes" in (ddp_runs / "padim-2" / "train.log").read_text()
    for name in ("mean", "precision"):
        a, b = getattr(model_one, name), getattr(model_two, name)
        assert a.shape == b.shape and a.numel() > 0
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5, name
    # One rank's shard alone (what a fit without the all-reduce would keep) is far beyond that tolerance.
    data = load_data(image_size=64, channels=1, seed=0, **MEMORY_BANK["data"])
    model_two.fit(DataLoader(Subset(data.train, [0, 2, 4, 6, 8, 10]), batch_size=4, collate_fn=collate))
    assert float((model_two.mean - model_one.mean).abs().max() / model_one.mean.abs().max()) > 1e-3


@pytest.mark.slow
def test_patchcore_merges_the_coresets_of_both_ranks(ddp_runs):
    model, _ = load_run(ddp_runs / "patchcore-2")
    data = load_data(image_size=64, channels=1, seed=0, **MEMORY_BANK["data"])
    with torch.no_grad():
        patches = [model.embed(data.train[i].image[None]).permute(0, 2, 3, 1).flatten(0, 2) for i in range(11)]
    per_image = len(patches[0])
    shards = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]  # ShardSampler without shuffling or padding
    sizes = [round(0.1 * len(shard) * per_image) for shard in shards]
    assert len(model.memory_bank) == sum(sizes)
    nearest = torch.cdist(model.memory_bank, torch.cat(patches), compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert float(nearest.values.max()) < 1e-3  # every bank row is a training patch (up to float32 rounding of a batched embed)...
    image = nearest.indices // per_image
    first, second = image[:sizes[0]], image[sizes[0]:]
    assert set(first.tolist()) <= set(shards[0]) and set(second.tolist()) <= set(shards[1])  # ...of its rank's shard


@pytest.mark.slow
def test_labelled_batches_are_shared_out_over_two_processes(ddp_runs):
    """The 5 mixed batches of an epoch are dealt 3 and 2 (+1 repeated): 3 optimizer steps, not 5 on every rank."""
    with open(ddp_runs / "gmm-2" / "curves" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert max(int(r["step"]) for r in rows) == 2  # the last of steps 0, 1, 2
    model, config = load_run(ddp_runs / "gmm-2")
    assert config["train"]["labelled_anomalies"] == 3 and bool(model.semi_supervised)


def test_shard_sampler_deals_global_batches_of_one_process(monkeypatch):
    """Rank r of W takes every W-th index of the (seed, epoch) order, so global step k of W ranks with batch B holds
    the images of step k of one process with batch W * B; lengths are equal across ranks (padded by repeats)."""
    dataset = list(range(10))
    one = list(ShardSampler(dataset, seed=3))
    shards = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        sampler = ShardSampler(dataset, seed=3)
        shards.append(list(sampler))
        assert len(sampler) == 5
    for step in range(len(one) // 4):
        assert sorted(shards[0][2 * step:2 * step + 2] + shards[1][2 * step:2 * step + 2]) == \
            sorted(one[4 * step:4 * step + 4])
    sampler.set_epoch(1)
    assert list(sampler) != shards[1]  # a new order each epoch
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 3))
    unpadded = ShardSampler(dataset, shuffle=False, pad=False)
    assert list(unpadded) == [1, 4, 7] and len(unpadded) == 3


def test_labelled_sampler_shares_its_batches_over_ranks(monkeypatch):
    """Each rank gets the same number of batches, every batch keeps its labelled anomalies, and over both ranks
    every normal image is seen in the epoch."""
    shares = []
    for rank in range(2):
        monkeypatch.setattr(sampler_module, "rank_and_world", lambda rank=rank: (rank, 2))
        batches = LabelledBatchSampler(n_normal=30, n_labelled=3, batch_size=8, seed=1)
        shares.append(list(batches))
        assert len(batches) == len(shares[-1]) == 3  # 5 batches of 7 normals + 1 anomaly, dealt 3 and 3
    assert all(sum(i >= 30 for i in batch) == 1 for share in shares for batch in share)
    normals = {i for share in shares for batch in share for i in batch if i < 30}
    assert normals == set(range(30))
    monkeypatch.setattr(sampler_module, "rank_and_world", lambda: (0, 1))
    assert list(LabelledBatchSampler(n_normal=30, n_labelled=3, batch_size=8, seed=1)) == \
        LabelledBatchSampler(n_normal=30, n_labelled=3, batch_size=8, seed=1).all_batches()
    assert shard_batches([[0], [1], [2]], rank=1, world=2) == [[1], [0]]


def test_launched_rank_reads_the_launchers_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert launched_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # lightning's ddp launcher: a process it started
    assert launched_rank() == 1


def test_strategy_options_are_checked():
    with pytest.raises(ConfigError, match="strategy"):
        TrainConfig.from_dict({"strategy": "deepspeed"})
    with pytest.raises(ConfigError, match="num_nodes"):
        TrainConfig.from_dict({"num_nodes": 0})
    assert not TrainConfig.from_dict({}).multiprocess
    assert TrainConfig.from_dict({"strategy": "ddp", "devices": 1}).multiprocess
    assert TrainConfig.from_dict({"devices": 2}).multiprocess


def test_memory_bank_models_refuse_ddp_spawn(tmp_path):
    with pytest.raises(ConfigError, match="ddp_spawn"):
        train({**MEMORY_BANK, "model": "padim", "strategy": "ddp_spawn", "devices": 2}, tmp_path / "run")


def test_ddp_spawn_refuses_a_model_it_cannot_send_before_writing(tmp_path):
    """ddp_spawn pickles the model for the processes it starts; FrEIA's flows hold lambdas."""
    with pytest.raises(ConfigError, match="use strategy 'ddp'"):
        train({**TINY_AEFLOW, "strategy": "ddp_spawn", "devices": 2, "batch_size": 4}, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
