"""The files deepexplain writes and reads: all-or-nothing outputs and state_dict weights.

Every module that writes files (:mod:`deepexplain` for an explanation's
outputs, :mod:`deepexplain_scenes` for trained weights, :mod:`deepexplain_eval`
for its report) writes them through :func:`write_atomically`, and every module
that reads weights goes through :func:`load_weights`. A run that is stopped —
by an error, Ctrl-C or SIGTERM (inside :func:`sigterm_raises`, as the command
line runs) — leaves either all of a set of outputs or none of them, and
no temporary file. This module imports no other module of the project, so each
of them can import it; it imports torch only when weights are read.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

__all__ = ["Terminated", "sigterm_raises", "csv_bytes", "signals_deferred", "write_atomically", "read_state_dict",
           "load_weights"]

#: The signals that stop a run: Ctrl-C and a polite kill.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (inside :func:`sigterm_raises`)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread, so that cleanup code runs
    as for Ctrl-C; the previous handler is put back after it."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs; one that arrives meanwhile takes effect as soon as
    the block ends (through the handler that was in place before it).

    The handlers are swapped in Python rather than the signals masked, because torch's worker threads would
    receive a masked signal in the main thread's place. Only the main thread can set handlers, so elsewhere
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_targets(paths) -> None:
    """Fail before writing anything when an output's folder is missing or a folder sits at its name."""
    for path in paths:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: its folder does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {path}: a folder of that name is in the way")


def _replace_all(temps: list[tuple[str, Path]]) -> None:
    """Rename every temporary file onto its output; when a rename fails, put the earlier outputs back
    as they were (previous files restored, new ones removed) and raise."""
    backups: list[tuple[Path, Path | None]] = []  # (output, its previous file moved aside, or None)
    try:
        for temp, path in temps:
            backup = None
            if path.exists():
                backup = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.replace(path, backup)
            backups.append((path, backup))
            os.replace(temp, path)
    except BaseException:
        for path, backup in reversed(backups):
            if backup is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(backup, path)
        raise
    for _, backup in backups:
        if backup is not None:
            backup.unlink(missing_ok=True)


def write_atomically(writers: Mapping[Path, Callable[[BinaryIO], object]]) -> None:
    """Write every file ``path`` by calling ``writers[path](binary file)``, all or none of them.

    Each file is written under a hidden temporary name (``.NAME.XXXX.tmp``) in
    its own folder, then all are renamed into place together. When a writer
    fails, a rename fails or the run is stopped (Ctrl-C, or SIGTERM inside
    :func:`sigterm_raises`), the folder is left as it was: no new output, no
    temporary file. Creating a temporary file and recording it, and the renames,
    run with Ctrl-C and SIGTERM held back (:func:`signals_deferred`), so a
    signal cannot fall between them. Outputs get the usual permissions
    (0o666 less the umask).
    """
    _check_targets(writers)
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            with signals_deferred():
                handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                                     delete=False)
                temps.append((handle.name, path))
            with handle:
                write(handle)
            os.chmod(handle.name, 0o666 & ~_umask())  # temporary files are private; outputs are not
        with signals_deferred():
            _replace_all(temps)
    finally:
        with signals_deferred():
            for temp, _ in temps:
                Path(temp).unlink(missing_ok=True)


def csv_bytes(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> bytes:
    """Rows as CSV bytes with a header of ``columns`` (default: the first row's keys); None becomes an empty
    cell, floats keep repr's round-trip precision. A table without rows is its header alone, never 0 bytes:
    with no rows, ``columns`` must be given (ValueError otherwise)."""
    if columns is None:
        if not rows:
            raise ValueError("an empty table needs its columns: a CSV file is never 0 bytes")
        columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue().encode()


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a state_dict with ``torch.load(..., weights_only=True)`` onto the CPU.

    Raises FileNotFoundError for a missing file and ValueError when the file is not a state_dict.
    """
    import torch

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


def load_weights(model, state: dict | str | os.PathLike, name: str, source: str | None = None):
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
