"""Checkpoints that survive a kill: atomic writes, full training state, weight export."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "load_checkpoint", "export_weights", "load_weights"]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load a training checkpoint written by :func:`atomic_save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def export_weights(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], path: str | os.PathLike
) -> None:
    """Write weights as safetensors with the model config (JSON) in the metadata."""
    from safetensors.torch import save  # noqa: PLC0415

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"dao_config": json.dumps(config, sort_keys=True)})
    _atomic_write(Path(path), lambda f: f.write(blob))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, config) from a file written by :func:`export_weights`."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "dao_config" not in meta:
            raise ValueError(f"{path} has no dao_config metadata: not a dao weights file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["dao_config"])
