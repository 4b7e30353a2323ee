"""Audit a model on a whole dataset: explain every image, resumably, and show where the model looks per class.

``python deepexplain.py audit SOURCE --out DIR`` (or :func:`audit`) explains every image of ``SOURCE`` with
:func:`deepexplain.explain_batch`, one call per batch, and writes into ``DIR``:

* ``settings.json``: the run's model, weights file, preset, batch size, source and every setting
  (``Settings.as_dict()``), strict JSON; a resume with other settings is refused;
* ``batches/NNNNN.csv``, ``batches/NNNNN.errors.csv`` and ``batches/NNNNN.npz``: one batch's table rows, the
  images of the batch that could not be explained (with the reason) and its maps — a float16 array ``maps``
  (N×H×W, the map of each explained image, H×W the model's input size), ``keys`` (N strings, the rows'
  ``path``) and ``settings`` (the settings.json it was written under, as JSON text: the merge refuses a batch
  written under other settings) — all three written together by :func:`deepexplain_io.write_atomically`;
* ``audit.csv`` (:data:`COLUMNS`, one row per explained image, in source order) and ``errors.csv`` (``path``,
  ``reason``): the batch files merged, rewritten whole at the end of every run;
* ``class_means.npz``: per explained class, the mean of the images' maps, each normalized to sum 1 (an array per
  class label, H×W float32, image coordinates: the model sees the whole image resized, so a fraction of the map's
  height or width is the same fraction of the image's), and ``summary.json``: the run's counts and, per class,
  its image count, its mean map's border share and the shortcut flag (below);
* ``report.html`` (one self-contained file) and ``report.md`` with its pictures in ``report/``
  (:mod:`deepexplain_report`).

The shortcut flag (:func:`shortcut_statistics`): a model that decides a class from a fixed spot of the image
— a tag, a watermark, a frame — looks at the same place in every image of that class, wherever the object is.
Each map ``m_i`` of a class is normalized to sum 1 and ``M`` is their mean; a square window of side
:data:`WINDOW` (1/8 of the image side: 28 px at 224) slides over a map, and ``peak(m)`` is the largest share of
``m`` inside one window (:func:`window_peak`). Then

* **consistency** = ``peak(M) / mean_i peak(m_i)``, in (0, 1]: 1 when every image's hottest window is at the same
  place, low when each image looks somewhere else (at its object);
* **lift** = ``peak(M) / window area fraction`` (1/64): 1 when the mean map is no more concentrated than a flat one.

A class is flagged when it has at least :data:`FLAG_MIN_IMAGES` images, consistency ≥ :data:`FLAG_CONSISTENCY`
and lift ≥ :data:`FLAG_LIFT`; the window's place (its center, as fractions of the height and width) and share
say where the model looks. The consistency threshold was chosen on notebook 09's 36 scenes per model (masked
preset, 50 steps, 1 run per image): the planted-shortcut model's classes measured 0.66–0.98, the clean model's
0.32–0.53, and 0.6 lies in the gap (with the masked preset before its blur removal: 0.88–0.98 and 0.39–0.57, and the
threshold was 0.75); the README's "Audit a model" checks it on other scenes. The thresholds are a
starting point, not a law: a dataset whose objects always sit at the same place (centered portraits) is consistent too,
so read the flagged class's mean map and images in the report before blaming the model. The seed and fast
presets crop a 10% border off every map, so they cannot see a shortcut there: audit with the masked preset.

``SOURCE`` is a folder searched recursively for image files (:data:`IMAGE_SUFFIXES`; other files and hidden
ones are ignored; a file with an image suffix that cannot be read is an error, listed, never fatal). When the
folder holds no image directly but sub-folders (torchvision's ImageFolder layout), the sub-folder's name is each
image's true label, matched against the model's labels (case, spaces and underscores ignored) to fill
``correct``. ``scenes:N`` and ``shortcut:N`` are N embedded scenes from :data:`deepexplain_eval.FIRST_SCENE_ID`
up, without and with the planted tag, explained with the embedded model and the planted-shortcut model.

Resuming and crash-safety: an image is done when its row (or error) is in a batch file; a batch's files appear
together or not at all, so a run killed at any moment (Ctrl-C, SIGTERM, a crash) loses at most the batch in
flight and leaves no half-written file. ``--resume`` explains only the images not done yet, in new batch files,
and the merged table is in source order, so it equals an uninterrupted run's (up to the ``seconds`` column).

Several processes: started by torchrun (``torchrun --nproc_per_node=N deepexplain.py audit ...``, on one machine
or several), every process is a rank of one audit over ``torch.distributed`` (gloo on the CPU, NCCL on
``cuda:LOCAL_RANK``). The images not done yet are cut into batches exactly as one process would cut them, and
rank r explains batches r, r + N, r + 2N, … (:func:`shard`), writing each under the number one process would
give it; once all are done, rank 0 merges them into the same files as one process. Restarted workers
(``torchrun --max-restarts K``) resume by themselves.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

import deepexplain as de
import deepexplain_eval as ev
import deepexplain_scenes as scenes
from deepexplain_io import csv_bytes, write_atomically

__all__ = [
    "IMAGE_SUFFIXES", "GRID", "BORDER", "COLUMNS", "ERROR_COLUMNS", "EMBEDDED_SOURCES", "Item", "discover",
    "WINDOW", "FLAG_MIN_IMAGES", "FLAG_CONSISTENCY", "FLAG_LIFT",
    "border_region", "map_statistics", "window_peak", "shortcut_statistics", "maps_statistics", "class_statistics",
    "class_line", "audit_settings", "AuditSummary", "audit", "read_table", "read_maps", "class_means", "shard",
]

#: File suffixes (lower case) searched for in a folder; other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
#: The map's share is reported in each cell of a GRID×GRID grid ...
GRID = 4
#: ... and on the image's border, this fraction of the rows and columns on every side.
BORDER = 0.1
#: The shortcut flag's window: a square of this fraction of the image's side (28 px at 224) ...
WINDOW = 1 / 8
#: ... and its thresholds (:func:`shortcut_statistics`), measured on the embedded scenes.
FLAG_MIN_IMAGES, FLAG_CONSISTENCY, FLAG_LIFT = 5, 0.6, 2.0
#: Embedded sources: ``KIND:N`` → (the scenes' tag marks, the model's weights file).
EMBEDDED_SOURCES = {"scenes": (None, scenes.WEIGHTS_PATH), "shortcut": ("match", scenes.SHORTCUT_WEIGHTS_PATH)}
#: The columns of audit.csv, in order. Scores and probabilities in [0, 1]; ``com_row``/``com_col``: the map's
#: center of mass as a fraction of the height/width ((pixel + 0.5) / side, in (0, 1)); ``cell_R_C``: the map's
#: share in grid cell row R, column C; ``border``: its share in the outer 10%; empty for an all-zero map.
COLUMNS = ("path", "true_label", "predicted", "predicted_label", "predicted_probability", "correct", "target",
           "target_label", "original_score", "perturbed_score", "steps_run", "seconds", "com_row", "com_col",
           *(f"cell_{r}_{c}" for r in range(GRID) for c in range(GRID)), "border")
#: The columns of errors.csv.
ERROR_COLUMNS = ("path", "reason")
SETTINGS_FILE, TABLE_FILE, ERRORS_FILE, MEANS_FILE, SUMMARY_FILE = (
    "settings.json", "audit.csv", "errors.csv", "class_means.npz", "summary.json")
BATCHES = "batches"


# --------------------------------------------------------------------------- the source

@dataclass(frozen=True)
class Item:
    """One image to audit: ``key`` is its table ``path`` (relative to the source folder, with ``/``, or
    ``scenes:ID``/``shortcut:ID``); ``true_label`` is None when unknown; ``file`` or ``scene_id`` says where
    its pixels come from, ``marks`` which tag a scene carries."""

    key: str
    true_label: str | None = None
    file: Path | None = None
    scene_id: int | None = None
    marks: str | None = None

    def image(self) -> np.ndarray:
        """The RGB uint8 H×W×3 image (ValueError/OSError when the file is not a readable image)."""
        if self.file is not None:
            return de.read_image(self.file)
        return scenes.make_scene_with_marks(self.scene_id, self.marks).image


def _embedded(source: str) -> tuple[str, int] | None:
    """``("scenes", N)`` for ``"scenes:N"`` (likewise shortcut), None for anything else."""
    match = re.fullmatch(r"(\w+):(\d+)", source)
    if match is None or match.group(1) not in EMBEDDED_SOURCES:
        return None
    count = int(match.group(2))
    if count < 1:
        raise ValueError(f"source {source!r} asks for no scenes; give {match.group(1)}:N with N ≥ 1")
    return match.group(1), count


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, recursively, in sorted order, skipping hidden files and folders."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def discover(source: str | Path) -> list[Item]:
    """The images of ``source`` in a fixed order: a folder's image files (sorted by path), or ``scenes:N``
    / ``shortcut:N`` (scene ids from ``FIRST_SCENE_ID``, true labels known).

    In a folder with no image at its top level, each image's true label is the name of the top sub-folder
    holding it (ImageFolder layout); otherwise labels are unknown. Raises ValueError for a source that is
    neither an embedded one nor an existing folder, or a folder without image files.
    """
    embedded = _embedded(str(source))
    if embedded is not None:
        kind, count = embedded
        marks = EMBEDDED_SOURCES[kind][0]
        ids = range(ev.FIRST_SCENE_ID, ev.FIRST_SCENE_ID + count)
        return [Item(f"{kind}:{i}", scenes.CLASS_NAMES[scenes.drawn_label(i)], scene_id=i, marks=marks)
                for i in ids]
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"source {str(source)!r} is neither a folder nor scenes:N / shortcut:N")
    files = [p for p in _visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    by_class = all(len(p.relative_to(folder).parts) > 1 for p in files)
    return [Item(p.relative_to(folder).as_posix(), p.relative_to(folder).parts[0] if by_class else None, file=p)
            for p in files]


def _label_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def _label_index(true_label: str | None, labels: Sequence[str] | None) -> int | None:
    """The index of the model label that ``true_label`` names (case, spaces, _ and - ignored), or None."""
    if true_label is None or labels is None:
        return None
    matches = [i for i, label in enumerate(labels) if _label_key(label) == _label_key(true_label)]
    return matches[0] if matches else None


# --------------------------------------------------------------------------- per-map statistics

def _bounds(n: int, parts: int) -> np.ndarray:
    """``parts + 1`` cut points splitting ``n`` pixels into ``parts`` near-equal ranges."""
    return np.linspace(0, n, parts + 1).round().astype(int)


def border_region(shape: tuple[int, int], border: float = BORDER) -> np.ndarray:
    """H×W bool mask of the outer ``border`` fraction of rows and columns on every side."""
    h, w = shape
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    bh, bw = border * h, border * w
    return (rows < bh) | (rows >= h - bh) | (cols < bw) | (cols >= w - bw)


def map_statistics(saliency: np.ndarray) -> dict[str, float | None]:
    """Where an H×W map (≥ 0) lies: center of mass ``com_row``/``com_col`` as fractions of the height/width,
    the share (in [0, 1], summing to 1) in each ``cell_R_C`` of a GRID×GRID grid, and the share on the
    ``border``. All None for an all-zero map."""
    h, w = saliency.shape
    names = [c for c in COLUMNS if c.startswith(("com_", "cell_")) or c == "border"]
    total = float(saliency.sum(dtype=np.float64))
    if not total > 0:
        return dict.fromkeys(names)
    p = saliency.astype(np.float64) / total
    stats = {"com_row": float((p.sum(axis=1) * (np.arange(h) + 0.5)).sum() / h),
             "com_col": float((p.sum(axis=0) * (np.arange(w) + 0.5)).sum() / w)}
    rb, cb = _bounds(h, GRID), _bounds(w, GRID)
    for r in range(GRID):
        for c in range(GRID):
            stats[f"cell_{r}_{c}"] = float(p[rb[r]:rb[r + 1], cb[c]:cb[c + 1]].sum())
    stats["border"] = float(p[border_region(p.shape)].sum())
    return stats


def _window_shape(shape: tuple[int, int], window: float) -> tuple[int, int]:
    return max(1, round(window * shape[0])), max(1, round(window * shape[1]))


def window_peak(saliency: np.ndarray, window: float = WINDOW) -> tuple[float, float, float]:
    """The hottest window of an H×W map (≥ 0): ``(share, row, col)``, the largest share of the map (in [0, 1])
    inside a window of ``window`` × the height by ``window`` × the width (a square on a square map), and the
    window's center as fractions of the height and width (in (0, 1)). Windows may reach past the edge (the
    outside counts as 0). ``(nan, nan, nan)`` for an all-zero map."""
    p = np.asarray(saliency, dtype=np.float64)
    total = p.sum()
    if not total > 0:
        return math.nan, math.nan, math.nan
    size = _window_shape(p.shape, window)
    shares = ndimage.uniform_filter(p / total, size=size, mode="constant") * (size[0] * size[1])
    r, c = np.unravel_index(int(np.argmax(shares)), shares.shape)
    # uniform_filter's window over index i spans i - size//2 .. i - size//2 + size - 1: its center is below
    row = (r - size[0] // 2 + size[0] / 2) / p.shape[0]
    col = (c - size[1] // 2 + size[1] / 2) / p.shape[1]
    return float(shares[r, c]), float(row), float(col)


def shortcut_statistics(mean_map: np.ndarray, image_peaks: Sequence[float], window: float = WINDOW) -> dict:
    """The shortcut flag of a class from its mean normalized map ``mean_map`` (H×W ≥ 0) and the
    :func:`window_peak` share of each of its images' maps (``image_peaks``, one per image with a non-zero map):

    ``images`` (how many), ``consistency`` = peak(mean) / mean(image peaks) in (0, 1], ``lift`` = peak(mean) /
    the window's area fraction (≥ 1 … 1/fraction), ``flag`` (≥ :data:`FLAG_MIN_IMAGES` images, consistency ≥
    :data:`FLAG_CONSISTENCY`, lift ≥ :data:`FLAG_LIFT`) and ``window``: ``{"row", "col", "share"}`` of the mean
    map's hottest window (center as fractions of the height/width). Statistics are None without images."""
    peaks = np.asarray(image_peaks, dtype=np.float64)
    share, row, col = window_peak(mean_map, window)
    if peaks.size == 0 or not math.isfinite(share):
        return {"images": int(peaks.size), "consistency": None, "lift": None, "flag": False, "window": None}
    h, w = _window_shape(np.shape(mean_map), window)
    consistency = min(1.0, share / float(peaks.mean()))  # ≤ 1 but for rounding: a sum's peak ≤ the peaks' sum
    lift = share / (h * w / (np.shape(mean_map)[0] * np.shape(mean_map)[1]))
    flag = peaks.size >= FLAG_MIN_IMAGES and consistency >= FLAG_CONSISTENCY and lift >= FLAG_LIFT
    return {"images": int(peaks.size), "consistency": consistency, "lift": lift, "flag": bool(flag),
            "window": {"row": row, "col": col, "share": share}}


def maps_statistics(maps: np.ndarray | Sequence[np.ndarray], window: float = WINDOW) -> dict:
    """:func:`class_statistics` of one class's maps (N×H×W, each ≥ 0; all-zero maps left out): the shortcut
    flag's statistics and the mean normalized map's ``border`` share."""
    kept = [np.asarray(m, dtype=np.float64) / float(np.sum(m, dtype=np.float64)) for m in maps
            if np.sum(m, dtype=np.float64) > 0]
    mean = np.mean(kept, axis=0) if kept else np.zeros((1, 1))
    return class_statistics({"": mean}, {"": [window_peak(m, window)[0] for m in kept]}, window)[""]


# --------------------------------------------------------------------------- settings

def audit_settings(source: str | Path, loaded: de.LoadedModel, weights: str | Path | None, preset: str | None,
                   settings: de.Settings, batch: int) -> dict:
    """The run's identity as a JSON-ready dict: what settings.json holds and a resume must match (the device is not
    part of it: a resume may run elsewhere). The source
    is the folder's absolute path, or the embedded kind alone (``scenes``): like ``limit``, the N of
    ``scenes:N`` may grow on a resume."""
    embedded = _embedded(str(source))
    return {"source": embedded[0] if embedded else str(Path(source).resolve()), "model": loaded.name,
            "weights": None if weights is None else str(Path(weights).resolve()),
            "preset": preset or de.DEFAULT_PRESET, "batch": batch, "settings": settings.as_dict()}


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """'name: old → new' for every value that differs between two settings dicts (nested dicts flattened)."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} {a!r} there, {b!r} now")
    return out


def _check_or_record(out: Path, identity: dict, resume: bool) -> None:
    """Record ``identity`` in ``out``/settings.json, or, when an audit is there, check that ``resume`` was
    asked for and that it is the same audit (ValueError naming the differences otherwise)."""
    path = out / SETTINGS_FILE
    if not path.exists():
        if (out / BATCHES).exists():
            raise ValueError(f"{out} holds batch files but no {SETTINGS_FILE}; use another --out")
        _write_json(path, identity)
        return
    if not resume:
        raise ValueError(f"{out} already holds an audit; add --resume to continue it, or give another --out")
    _check_recorded(out, identity)


def _check_recorded(out: Path, identity: dict) -> None:
    """ValueError unless ``out``/settings.json records ``identity`` (naming the differences)."""
    path = out / SETTINGS_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err}); use another --out") from None
    changed = _differences(recorded, identity)
    if changed:
        raise ValueError(f"cannot resume the audit in {out} with other settings: {_listed(changed)}")


def _listed(changed: list[str]) -> str:
    return f"{'; '.join(changed[:3])}{' …' if len(changed) > 3 else ''}"


def _write_json(path: Path, value: object) -> None:
    data = (json.dumps(value, indent=2, allow_nan=False) + "\n").encode()
    write_atomically({path: lambda f: f.write(data)})


# --------------------------------------------------------------------------- batch files

def _npz_writer(maps: np.ndarray, keys: Sequence[str], identity: dict) -> Callable[[BinaryIO], None]:
    return lambda f: np.savez_compressed(f, maps=maps.astype(np.float16), keys=np.array(keys, dtype=str),
                                         settings=np.array(json.dumps(identity, sort_keys=True)))


def _batch_files(out: Path, number: int) -> tuple[Path, Path, Path]:
    """Batch ``number``'s rows, errors and maps files."""
    stem = out / BATCHES / f"{number:05d}"
    return stem.with_suffix(".csv"), stem.with_suffix(".errors.csv"), stem.with_suffix(".npz")


def _write_batch(out: Path, number: int, rows: list[dict], errors: list[dict], maps: np.ndarray,
                 identity: dict) -> None:
    """Write one batch's three files, all or none; the maps file records the audit's settings ``identity``.
    The rows file, whose presence marks the batch done, is renamed into place last."""
    rows_path, errors_path, maps_path = _batch_files(out, number)
    errors_data, rows_data = csv_bytes(errors, ERROR_COLUMNS), csv_bytes(rows, COLUMNS)
    write_atomically({errors_path: lambda f: f.write(errors_data),
                      maps_path: _npz_writer(maps, [row["path"] for row in rows], identity),
                      rows_path: lambda f: f.write(rows_data)})


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _done_batches(out: Path) -> list[int]:
    """Numbers of the batches whose files are all there (a batch's files appear together)."""
    return sorted(int(p.name[:5]) for p in (out / BATCHES).glob("[0-9]" * 5 + ".csv"))


def read_table(out: str | Path, errors: bool = False) -> list[dict]:
    """Every row of the batch files in ``out`` (``errors``: the error rows instead), as dicts of strings,
    in batch order."""
    out = Path(out)
    return [row for n in _done_batches(out) for row in _read_csv(_batch_files(out, n)[1 if errors else 0])]


def _check_parts(out: Path, identity: dict) -> None:
    """ValueError when a batch file in ``out`` was written under settings other than ``identity`` (parts
    written before the settings were recorded in each part carry none and are taken as they are)."""
    for n in _done_batches(out):
        maps_path = _batch_files(out, n)[2]
        with np.load(maps_path) as data:
            recorded = json.loads(str(data["settings"])) if "settings" in data.files else identity
        changed = _differences(recorded, identity)
        if changed:
            raise ValueError(f"{maps_path} was written under other settings than the audit's: {_listed(changed)}; "
                             "remove that batch's three files (its images are audited again on --resume)")


def read_maps(out: str | Path, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Every map of the audit in ``out`` (only those of ``keys`` when given): table ``path`` → H×W float16
    map."""
    out = Path(out)
    maps = {}
    for n in _done_batches(out):
        with np.load(_batch_files(out, n)[2]) as data:
            maps.update((k, m) for k, m in zip(data["keys"].tolist(), data["maps"]) if keys is None or k in keys)
    return maps


# --------------------------------------------------------------------------- explaining

def _row(item: Item, explanation: de.Explanation, labels: Sequence[str] | None) -> dict:
    """The table row of one explained image (:data:`COLUMNS`)."""
    top = explanation.predictions[0]
    truth = _label_index(item.true_label, labels)
    return {"path": item.key, "true_label": item.true_label, "predicted": top.index, "predicted_label": top.label,
            "predicted_probability": top.probability, "correct": None if truth is None else int(truth == top.index),
            "target": explanation.target, "target_label": explanation.label,
            "original_score": explanation.original_score, "perturbed_score": explanation.perturbed_score,
            "steps_run": explanation.steps_run, "seconds": round(explanation.seconds, 3),
            **map_statistics(explanation.saliency)}


def _read_images(items: Sequence[Item]) -> tuple[list[Item], list[np.ndarray], list[dict]]:
    """The batch's readable items and images, and an error row for each unreadable one."""
    kept, images, errors = [], [], []
    for item in items:
        try:
            images.append(item.image())
            kept.append(item)
        except Exception as err:  # noqa: BLE001 — a bad file of any kind must not stop the audit
            errors.append({"path": item.key, "reason": f"{type(err).__name__}: {err}"})
    return kept, images, errors


def _explain(images: list[np.ndarray], loaded: de.LoadedModel, settings: de.Settings,
             items: list[Item]) -> tuple[list[Item], list[de.Explanation], list[dict]]:
    """``explain_batch`` on the batch; when it fails with a ValueError (an image that diverges), each image
    alone, and the images that still fail become error rows."""
    try:
        return items, de.explain_batch(images, loaded, settings=settings, verbose=False), []
    except ValueError as err:
        if len(images) == 1:
            return [], [], [{"path": items[0].key, "reason": f"ValueError: {err}"}]
    kept, explanations, errors = [], [], []
    for item, image in zip(items, images):
        k, e, bad = _explain([image], loaded, settings, [item])
        kept += k
        explanations += e
        errors += bad
    return kept, explanations, errors


def _audit_batch(out: Path, number: int, items: Sequence[Item], loaded: de.LoadedModel,
                 settings: de.Settings, identity: dict) -> int:
    """Explain and write batch ``number``; returns its number of errors."""
    kept, images, errors = _read_images(items)
    explanations = []
    if kept:
        kept, explanations, failed = _explain(images, loaded, settings, kept)
        errors += failed
    rows = [_row(item, e, loaded.labels) for item, e in zip(kept, explanations)]
    maps = np.stack([e.saliency for e in explanations]) if explanations else np.zeros((0, 1, 1), np.float16)
    _write_batch(out, number, rows, errors, maps, identity)
    return len(errors)


# --------------------------------------------------------------------------- aggregates and summary

def _class_aggregates(out: Path) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """Per explained class: the mean normalized map (float64) and the :func:`window_peak` share of each map,
    streamed one batch at a time (all-zero maps left out)."""
    sums: dict[str, np.ndarray] = {}
    peaks: dict[str, list[float]] = {}
    for n in _done_batches(out):
        rows_path, _, maps_path = _batch_files(out, n)
        with np.load(maps_path) as data:
            for row, m in zip(_read_csv(rows_path), data["maps"].astype(np.float64)):
                if m.sum() > 0:
                    label = row["target_label"]
                    sums[label] = sums.get(label, 0) + m / m.sum()
                    peaks.setdefault(label, []).append(window_peak(m)[0])
    means = {label: sums[label] / len(peaks[label]) for label in sorted(sums)}
    return means, {label: peaks[label] for label in means}


def class_means(out: str | Path) -> dict[str, np.ndarray]:
    """Per explained class (``target_label``) of the audit in ``out``: the mean of its images' maps, each
    normalized to sum 1 (H×W float32 summing to 1; all-zero maps left out). Reads one batch at a time, so
    memory does not grow with the dataset."""
    return {label: m.astype(np.float32) for label, m in _class_aggregates(Path(out))[0].items()}


def class_statistics(means: Mapping[str, np.ndarray], peaks: Mapping[str, Sequence[float]],
                     window: float = WINDOW) -> dict[str, dict]:
    """Per class, what summary.json holds, from its mean normalized map and its images' :func:`window_peak`
    shares: ``images`` (with a non-zero map), ``border`` (the mean map's share on the border, None for an
    all-zero map), ``consistency``, ``lift``, ``flag`` and ``window`` (:func:`shortcut_statistics`),
    JSON-ready."""
    return {label: {**shortcut_statistics(m, peaks[label], window), "border": map_statistics(m)["border"]}
            for label, m in means.items()}


@dataclass
class AuditSummary:
    """What a run did: images explained now, skipped as already done, errors (all, this run's and earlier
    ones), the run's wall seconds, per class :func:`class_statistics` (images, border share, shortcut flag),
    and per process (one, or torchrun's ranks) ``{rank, images, errors, seconds_busy, seconds_idle}``: the images
    it took (explained or failed), of them the errors, its seconds explaining and its seconds waiting for the
    others."""

    explained: int
    skipped: int
    errors: int
    seconds: float
    classes: dict
    ranks: list = field(default_factory=list)

    @property
    def images_per_hour(self) -> float:
        """Images explained per hour of this run's wall time (0 when nothing was explained)."""
        return self.explained * 3600 / self.seconds if self.explained and self.seconds > 0 else 0.0

    def class_lines(self) -> list[str]:
        """One line per explained class: images, border share, the shortcut flag's statistics and window."""
        return [class_line(label, c) for label, c in self.classes.items()]

    def line(self) -> str:
        """The one-line summary printed at the end."""
        return (f"audit: {self.explained} images explained, {self.skipped} skipped as done, {self.errors} errors, "
                f"{self.images_per_hour:.0f} images/hour")


def class_line(label: str, c: Mapping) -> str:
    """One class of :func:`class_statistics` in a line, e.g. ``  star: 12 images, border share 0.31,
    consistency 0.97, lift 4.1, FLAGGED: window at row 0.50, col 0.05 (share 0.27)``."""
    if c["consistency"] is None:
        return f"  {label}: {c['images']} images, all maps zero"
    window = c["window"]
    return (f"  {label}: {c['images']} images, border share {c['border']:.2f}, consistency {c['consistency']:.2f}, "
            f"lift {c['lift']:.1f}, {'FLAGGED' if c['flag'] else 'not flagged'}: window at row {window['row']:.2f}, "
            f"col {window['col']:.2f} (share {window['share']:.2f})")


def _finish(out: Path, items: Sequence[Item], summary: AuditSummary) -> None:
    """Merge the batch files into audit.csv and errors.csv (source order), and write class_means.npz and
    summary.json; each file whole or not at all."""
    order = {item.key: i for i, item in enumerate(items)}
    rows = sorted(read_table(out), key=lambda r: order.get(r["path"], len(order)))
    errors = sorted(read_table(out, errors=True), key=lambda r: order.get(r["path"], len(order)))
    means, peaks = _class_aggregates(out)
    summary.classes = class_statistics(means, peaks)
    data = {TABLE_FILE: csv_bytes(rows, COLUMNS), ERRORS_FILE: csv_bytes(errors, ERROR_COLUMNS),
            SUMMARY_FILE: (json.dumps({**vars(summary), "images_per_hour": summary.images_per_hour,
                                       "rows": len(rows)}, indent=2, allow_nan=False) + "\n").encode()}
    writers = {out / name: (lambda f, d=d: f.write(d)) for name, d in data.items()}
    writers[out / MEANS_FILE] = lambda f: np.savez_compressed(f, **{k: m.astype(np.float32) for k, m in means.items()})
    write_atomically(writers)


# --------------------------------------------------------------------------- the run

def _load(source: str | Path, model: str | None, weights: str | Path | None,
          device: str | None) -> tuple[de.LoadedModel, str | Path | None]:
    """The model to audit ``source`` with, and its weights file: an embedded source fixes both."""
    embedded = _embedded(str(source))
    if embedded is None:
        return de.load_model(model or "auto", device=device, weights_path=weights), weights
    if model not in (None, "shapes") or weights is not None:
        raise ValueError(f"{embedded[0]}:N is explained with its own embedded model; leave out --model and "
                         "--weights")
    weights = EMBEDDED_SOURCES[embedded[0]][1]
    return de.load_model("shapes", device=device, weights_path=weights), weights


def _batches(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")


# --------------------------------------------------------------------------- one process or several

#: How long a rank waits for the others (at the start, and at the end for the slowest rank's last batch).
WAIT = timedelta(days=7)
#: In ``batches/``: the torchrun job (its run id) that began or resumed the audit, so that its restarted
#: workers resume it and a new job into the same folder still needs ``--resume``.
JOB_FILE = ".torchrun_job"


def shard(count: int, rank: int, world: int) -> range:
    """The batches (of ``count``, numbered from 0) that rank ``rank`` of ``world`` explains: every
    ``world``-th from ``rank``, interleaved. The shards of ranks 0 … world − 1 are disjoint, cover every
    batch and differ by one batch at most; a rank beyond the last batch gets none."""
    return range(rank, count, world)


class _Solo:
    """A run in one process (no torchrun): rank 0 of 1."""

    rank, world, restarted, job = 0, 1, False, None

    def device(self, device: str | None) -> str | None:
        return device

    def gather(self, value: object) -> list:
        return [value]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Ranks:
    """One of the processes that torchrun started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
    rendezvous address in the environment): a process group over gloo, or NCCL when it explains on CUDA
    (``cuda:LOCAL_RANK``, unless ``--device cpu``)."""

    def __init__(self, env: Mapping[str, str], device: str | None):
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = int(env["RANK"]), int(env["WORLD_SIZE"])
        self.local_rank = int(env.get("LOCAL_RANK", 0))
        self.restarted = int(env.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        self.job = env.get("TORCHELASTIC_RUN_ID", "")
        self.cuda = (device is None or str(device).startswith("cuda")) and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
        store, _, _ = next(dist.rendezvous("env://", timeout=WAIT))
        dist.init_process_group("nccl" if self.cuda else "gloo", store=_this_round(store, self.rank, self.world),
                                rank=self.rank, world_size=self.world, timeout=WAIT)

    def device(self, device: str | None) -> str | None:
        return f"cuda:{self.local_rank}" if self.cuda else device

    def gather(self, value: object) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank; a barrier too."""
        values = [None] * self.world
        self.dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        self.dist.barrier(**({"device_ids": [self.local_rank]} if self.cuda else {}))

    def close(self) -> None:
        self.dist.destroy_process_group()


def _this_round(store, rank: int, world: int):
    """``store`` under a prefix that only this round of workers shares.

    torchrun's agent keeps one store for all its restarts (``TORCHELASTIC_USE_AGENT_STORE``), so a restarted
    worker would read the addresses its dead predecessors left there and fail to connect (pytorch#135712);
    ``TORCHELASTIC_RESTART_COUNT`` cannot tell rounds apart, as it may differ between nodes (pytorch#108158).
    So rank 0 draws a new token, and each other rank says hello under the token it reads and goes on once
    rank 0 welcomes it with its own random nonce back: only a token drawn in this round is answered so.
    """
    import torch.distributed as dist

    nonce = uuid.uuid4().hex
    if rank == 0:
        store.set("deepexplain/round", nonce)
        for other in range(1, world):
            store.set(f"deepexplain/{nonce}/welcome/{other}", store.get(f"deepexplain/{nonce}/hello/{other}"))
        return dist.PrefixStore(f"deepexplain/{nonce}/", store)
    while True:
        token = store.get("deepexplain/round").decode()
        store.set(f"deepexplain/{token}/hello/{rank}", nonce)
        welcome = f"deepexplain/{token}/welcome/{rank}"
        while store.get("deepexplain/round").decode() == token:  # a new token: an earlier round's was read
            if store.check([welcome]) and store.get(welcome).decode() == nonce:
                return dist.PrefixStore(f"deepexplain/{token}/", store)
            time.sleep(0.05)


def _group(device: str | None) -> _Solo | _Ranks:
    """This process's place in the run: one of torchrun's ranks when its environment says so, else alone."""
    launched = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ)
    return _Ranks(os.environ, device) if launched else _Solo()


def _agree(group: _Solo | _Ranks, error: Exception | None, value: object = None) -> list:
    """Every rank's ``value``, in rank order, once every rank got here; when a rank failed (``error``),
    every rank raises: its own error, or a ValueError with the lowest failed rank's message."""
    gathered = group.gather((None if error is None else str(error), value))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(gathered) if message is not None]
    if failed:
        raise ValueError(f"rank {failed[0][0]} stopped: {failed[0][1]}")
    return [v for _, v in gathered]


def _job_resumes(out: Path, group: _Solo | _Ranks) -> bool:
    """Whether this is a restarted torchrun worker of the job that began (or resumed) the audit in ``out``."""
    try:
        return group.restarted and (out / BATCHES / JOB_FILE).read_text() == group.job
    except OSError:
        return False


def audit(source: str | Path, out: str | Path, *, model: str | None = None, weights: str | Path | None = None,
          preset: str | None = None, batch: int = 16, limit: int | None = None, resume: bool = False,
          device: str | None = None, progress: bool = True, **values) -> AuditSummary | None:
    """Explain every image of ``source`` (see :func:`discover`; the first ``limit`` only) into folder ``out``,
    ``batch`` images per :func:`deepexplain.explain_batch` call, with one progress bar for the whole audit.

    ``model`` (default ``"auto"``; embedded sources use their own), ``weights``, ``preset`` and ``values``
    (settings by name) are those of :func:`deepexplain.explain`. With ``resume`` an audit already in ``out``
    is continued — the same settings are required — and its done images are skipped; without it, an audit
    already there is an error. Returns the :class:`AuditSummary`; the files written are listed in the module
    docstring. Raises ValueError for bad input, before anything is written.

    Started by torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment),
    each process is one rank of a data-parallel audit: the images not done yet are cut into batches exactly as
    one process would cut them, rank r explains batches r, r + N, r + 2N, … (:func:`shard`) on
    ``cuda:LOCAL_RANK`` (or the CPU), and once every rank is done rank 0 merges them into the same files as one
    process would write, and returns the summary; the other ranks return None. A restarted worker (``TORCHELASTIC_RESTART_COUNT`` > 0) of the job
    that began the audit resumes it. ``out`` must be the same folder for every rank (a shared file system
    across nodes).
    """
    _check_count("batch", batch)
    _check_count("limit", limit)
    settings = de.Settings.from_preset(preset, **values)
    items = discover(source)[:limit]
    group = _group(device)
    try:
        return _run(group, items, source, Path(out), model, weights, preset, settings, batch, resume,
                    group.device(device), progress)
    finally:
        group.close()


def _run(group: _Solo | _Ranks, items: list[Item], source: str | Path, out: Path, model: str | None,
         weights: str | Path | None, preset: str | None, settings: de.Settings, batch: int, resume: bool,
         device: str | None, progress: bool) -> AuditSummary | None:
    """:func:`audit` in one process, or in one of torchrun's ranks (``group``)."""
    error = identity = loaded = None
    try:
        loaded, weights = _load(source, model, weights, device)
        identity = audit_settings(source, loaded, weights, preset, settings, batch)
        if group.rank == 0:  # records settings.json, or checks it
            out.mkdir(parents=True, exist_ok=True)
            _check_or_record(out, identity, resume or _job_resumes(out, group))
            (out / BATCHES).mkdir(exist_ok=True)
            if group.job is not None:
                write_atomically({out / BATCHES / JOB_FILE: lambda f: f.write(group.job.encode())})
    except (ValueError, OSError) as err:
        error = err
    _agree(group, error)
    error = view = None
    try:
        if group.rank:  # the other ranks check settings.json once rank 0 has recorded or checked it
            if not (out / SETTINGS_FILE).exists():
                raise ValueError(f"rank {group.rank} sees no {SETTINGS_FILE} in {out}: every rank needs the same "
                                 "--out folder (on a shared file system across nodes)")
            _check_recorded(out, identity)
        done = {row["path"] for errors in (False, True) for row in read_table(out, errors)}
        todo = [item for item in items if item.key not in done]
        numbers = _done_batches(out)
        first = numbers[-1] + 1 if numbers else 0
        view = (first, len(todo))
    except (ValueError, OSError) as err:
        error = err
    if len(set(_agree(group, error, view))) > 1:
        raise ValueError(f"the ranks see different batch files in {out}: every rank needs the same --out folder "
                         "(on a shared file system across nodes)")
    chunks = _batches(todo, batch)
    mine = shard(len(chunks), group.rank, group.world)
    share = sum(len(chunks[j]) for j in mine)
    # one bar: the whole audit in one process; under torchrun, rank 0's share
    shown = (dict(total=len(items), initial=len(items) - len(todo), desc="audit") if group.world == 1
             else dict(total=share, initial=0, desc=f"audit, rank 0 of {group.world}"))
    start = time.perf_counter()
    errors = 0
    with tqdm(**shown, unit="image", disable=not progress or group.rank != 0) as bar:
        for j in mine:  # batch j keeps the number one process would give it: none collide, the files are the same
            errors += _audit_batch(out, first + j, chunks[j], loaded, settings, identity)
            bar.update(len(chunks[j]))
    busy = time.perf_counter() - start
    group.barrier()
    part = {"rank": group.rank, "images": share, "errors": errors, "seconds_busy": round(busy, 3),
            "seconds_idle": round(time.perf_counter() - start - busy, 3)}
    parts = group.gather(part)
    if group.rank != 0:
        return None
    summary = AuditSummary(sum(p["images"] - p["errors"] for p in parts), len(items) - len(todo),
                           len(read_table(out, errors=True)), time.perf_counter() - start, {}, parts)
    _check_parts(out, identity)
    _finish(out, items, summary)
    import deepexplain_report  # here, not at the top: the report imports this module
    deepexplain_report.write_report(out, preprocessing=loaded.preprocessing)
    return summary
