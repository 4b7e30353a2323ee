"""The files deepexplain writes and reads: all-or-nothing outputs and state_dict weights.

Every module that writes files (:mod:`deepexplain` for an explanation's
outputs, :mod:`deepexplain_scenes` for trained weights, :mod:`deepexplain_eval`
for its report) writes them through :func:`write_atomically`, and every module
that reads weights goes through :func:`load_weights`. This module imports no
other module of the project, so each of them can import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import torch
from torch import nn

__all__ = ["write_atomically", "read_state_dict", "load_weights"]


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(writers: Mapping[Path, Callable[[BinaryIO], object]]) -> None:
    """Write every file ``path`` by calling ``writers[path](binary file)``, all or none of them.

    Each file is written under a hidden temporary name in its own folder, then
    all are renamed into place; when any writer fails, no output and no
    temporary file is left. Outputs get the usual permissions (0o666 less the umask).
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
            temps.append((handle.name, path))
            with handle:
                write(handle)
            os.chmod(handle.name, 0o666 & ~_umask())  # temporary files are private; outputs are not
        for temp, path in temps:
            os.replace(temp, path)
    finally:
        for temp, _ in temps:
            Path(temp).unlink(missing_ok=True)


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a state_dict with ``torch.load(..., weights_only=True)`` onto the CPU.

    Raises FileNotFoundError for a missing file and ValueError when the file is not a state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise ValueError(f"not a PyTorch weights file: {path} ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def load_weights(model: nn.Module, state: dict | str | os.PathLike, name: str, source: str | None = None) -> nn.Module:
    """``model.load_state_dict(state)`` (``state`` a dict or a file), with a one-line ValueError when it
    does not fit the ``name`` architecture; ``source`` names where the weights came from. Returns ``model``."""
    if not isinstance(state, dict):
        source = source or str(state)
        state = read_state_dict(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = (lines[1].strip() if len(lines) > 1 else lines[0])[:200]
        raise ValueError(f"weights in {source} do not match the {name!r} architecture: {detail}") from None
    return model
