"""Checkpoints round-trip without pickle, and anything else (a pickled payload, a torn file) is refused."""

import pickle

import pytest
import torch

from aeflow.errors import CheckpointError
from aeflow.training.checkpoint import load_checkpoint, save_checkpoint


def test_nested_state_round_trips(tmp_path):
    state = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {"model.w": torch.randn(3, 4), "model.flag": torch.tensor(True)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(2)}},
                              "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5),
                                                                   "best_model_path": "/x/best.safetensors"}},
        "score": float("inf"),
        "nothing": None,
    }
    save_checkpoint(state, tmp_path / "c.safetensors")
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded["epoch"] == 3 and loaded["global_step"] == 120 and loaded["nothing"] is None
    assert loaded["score"] == float("inf")
    assert torch.equal(loaded["state_dict"]["model.w"], state["state_dict"]["model.w"])
    assert loaded["state_dict"]["model.flag"].dtype == torch.bool
    optimizer = loaded["optimizer_states"][0]
    assert list(optimizer["state"]) == [0]  # integer keys stay integers
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file of the atomic write must be gone"


def test_objects_that_need_pickle_are_not_saved(tmp_path):
    with pytest.raises(CheckpointError, match="without pickling"):
        save_checkpoint({"model": torch.nn.Linear(2, 2)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


class _Payload:
    """Unpickling this object would create the marker file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_payload_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "last.safetensors"
    payload = {"state_dict": {}, "epoch": 0, "evil": _Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    # The payload is real: plain unpickling would run it.
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()

    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint({"state_dict": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an aeflow checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope.safetensors")


def _killed_writer_pid() -> int:
    """The pid of a process that has exited (as a writer killed mid-write has)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_writers_are_removed_at_the_next_write(tmp_path):
    import os

    from aeflow.training.checkpoint import remove_stale_temporaries

    dead = tmp_path / f".last.safetensors.tmp-{_killed_writer_pid()}"
    dead.write_bytes(b"\0" * 1000)  # what a kill during save_file leaves behind
    alive = tmp_path / f".best.safetensors.tmp-{os.getppid()}"  # a live process's write in progress
    alive.write_bytes(b"\0" * 10)
    unrelated = tmp_path / "notes.tmp-123"
    unrelated.write_text("not ours")
    save_checkpoint({"epoch": 0, "w": torch.ones(2)}, tmp_path / "last.safetensors")
    assert not dead.exists() and alive.exists() and unrelated.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    from aeflow.training.checkpoint import newest_valid_checkpoint

    best, last = tmp_path / "best.safetensors", tmp_path / "last.safetensors"
    save_checkpoint({"epoch": 2, "global_step": 30, "w": torch.ones(2)}, best)
    assert newest_valid_checkpoint([last, best]) == best  # killed during the first write of `last`
    save_checkpoint({"epoch": 4, "global_step": 50, "w": torch.ones(2)}, last)
    assert newest_valid_checkpoint([last, best]) == last
    last.write_bytes(last.read_bytes()[:100])  # torn by a disk fault
    assert newest_valid_checkpoint([last, best]) == best
    best.write_bytes(b"junk")
    assert newest_valid_checkpoint([last, best]) is None
