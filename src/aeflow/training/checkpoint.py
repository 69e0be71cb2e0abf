"""Checkpoints that load without unpickling anything, written so that a crash never leaves half a file.

A checkpoint is one safetensors file: every tensor (weights, optimizer moments, callback scores) in the tensor
section, and the rest of the nested structure (epoch, global step, loop counters, optimizer hyper-parameters,
callback states) as JSON in the header's metadata, with each tensor replaced by a reference to its name.
Reading it parses JSON and raw tensor bytes only, so a file crafted to run code when unpickled (or any file
that is not ours) is refused with CheckpointError instead of being executed.

`SafeCheckpointIO` plugs this format into lightning, so lightning's own checkpoint callback and `ckpt_path`
resume use it; lightning never calls `torch.load` on our files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from aeflow.errors import CheckpointError

FORMAT = "aeflow-checkpoint-1"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Write `checkpoint` (nested dicts/lists/tuples of tensors and JSON values) to `path` atomically.

    The file is written next to its destination, flushed to disk, then renamed over it: a reader sees the old
    checkpoint or the new one, never a torn one, even if the process is killed mid-write.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(checkpoint, tensors, "checkpoint")
    remove_stale_temporaries(path.parent)
    metadata = {"format": FORMAT, "skeleton": json.dumps(skeleton)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files (`.NAME.tmp-PID`) that writers killed mid-write left in `directory`: those
    whose process is gone. A temporary of a live process (another writer, now) is left alone. Returns the removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for candidate in directory.iterdir():
        match = _TEMPORARY.match(candidate.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a write of this process, perhaps in progress; its own `finally` removes it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or a pid we cannot ask about: keep its file
    return True


def newest_valid_checkpoint(paths) -> Path | None:
    """Of the given checkpoint files, the one that loads and is furthest in training (epoch, then global step);
    None if none does. For resuming: a torn or missing `last` falls back to a whole `best`."""
    best, best_key = None, None
    for path in map(Path, paths):
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
            key = (int(state["epoch"]), int(state["global_step"]))
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if it is missing, torn or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an aeflow checkpoint (format {metadata.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return _decode(json.loads(metadata["skeleton"]), tensors)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors/JSON raise many types; all mean "unreadable"
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); it is truncated, corrupt, or not in "
            "aeflow's safetensors format (pickled files are never loaded)"
        ) from exc


def checkpoint_shapes(path: str | Path, *, model_file: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight in a checkpoint's state_dict, read from the file's header alone (no tensor is
    loaded). `model_file`: the file is a run's model.safetensors (keys as they are) rather than a lightning
    checkpoint (keys of the wrapped model, 'model.' prefix removed)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an aeflow checkpoint (format {metadata.get('format')!r})")
            state = json.loads(metadata["skeleton"])["state_dict"]
            shapes = {name: tuple(f.get_slice(ref[_TENSOR]).get_shape()) for name, ref in state.items()}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors/JSON raise many types; all mean "unreadable"
        raise CheckpointError(f"{path}: unreadable checkpoint header ({type(exc).__name__}: {exc})") from exc
    if model_file:
        return shapes
    return {name[len("model."):]: shape for name, shape in shapes.items() if name.startswith("model.")}


def model_state(checkpoint: Mapping[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The wrapped model's weights from a lightning checkpoint (its state_dict keys start with `prefix`)."""
    return {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O in aeflow's safe format (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Tensors come back on the CPU; lightning moves the restored states to the model's device.
        return load_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # A private contiguous copy: safetensors refuses tensors that share memory.
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _ITEMS} & set(obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        # Non-string keys (the optimizer's per-parameter state is keyed by int) keep their type this way.
        return {_ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    raise CheckpointError(f"cannot store {type(obj).__name__} at {where} without pickling it")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on Windows, where it is skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
