"""The report of a dataset audit: where the model looks, class by class, and which classes look like a shortcut.

:func:`write_report` reads a finished audit folder (:mod:`deepexplain_audit`: settings.json, audit.csv,
errors.csv, class_means.npz, summary.json and the maps in batches/) and writes into it, all or none:

* ``report.html``: one self-contained file, every picture inlined (base64 PNG and JPEG), no external reference;
* ``report.md`` and its pictures in ``report/`` (``overview.png``, ``mean_NNN.png`` per class, ``image_NNNNN.jpg``
  per image shown, numbered by the image's row in audit.csv).

Both hold a table of the classes (images, misclassified, border share, the shortcut flag's consistency, lift
and window: :func:`deepexplain_audit.shortcut_statistics`), the mean maps side by side, and per class: its mean
normalized map as a heat map (image coordinates, the flag's hottest window drawn on it, the 10% border dashed),
and thumbnails with their maps overlaid (:func:`deepexplain.plot_overlay`) of the images whose map lies most
outside the center (share outside the central half of the height and width), the misclassified ones, and the
most and least confident ones. Each image is drawn once, ``THUMBNAIL`` px wide, so the report costs a few
hundredths of a second per image shown, against seconds per image to explain it.

``python deepexplain.py audit ...`` writes the report at the end of every run; ``write_report(DIR)`` writes it
again for an audit folder::

    import deepexplain_report
    deepexplain_report.write_report("results/audit")   # → [.../report.html, .../report.md, .../report/...]
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torchvision
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import deepexplain as de
import deepexplain_audit as audit
from deepexplain_io import write_atomically

__all__ = ["THUMBNAIL", "SHOWN", "REPORT_HTML", "REPORT_MD", "REPORT_DIR", "AuditResult", "read_audit",
           "outside_center", "plot_mean_map", "plot_class_means", "write_report"]

#: Thumbnail side in px, and how many images each group of a class shows (misclassified: twice as many).
THUMBNAIL, SHOWN = 96, 4
REPORT_HTML, REPORT_MD, REPORT_DIR = "report.html", "report.md", "report"
#: The overview figure shows at most this many classes' mean maps (flagged ones first).
OVERVIEW_CLASSES = 12
_CENTER_CELLS = tuple(f"cell_{r}_{c}" for r in range(1, audit.GRID - 1) for c in range(1, audit.GRID - 1))


# --------------------------------------------------------------------------- reading an audit

@dataclass
class AuditResult:
    """A finished audit, as read from its folder: ``identity`` (settings.json), ``rows`` (audit.csv, dicts of
    strings, source order), ``errors`` (errors.csv), ``means`` (class label → H×W mean normalized map) and
    ``summary`` (summary.json; ``summary["classes"]``: :func:`deepexplain_audit.class_statistics`)."""

    out: Path
    identity: dict
    rows: list[dict]
    errors: list[dict]
    means: dict[str, np.ndarray]
    summary: dict

    @property
    def classes(self) -> dict[str, dict]:
        return self.summary["classes"]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_audit(out: str | Path) -> AuditResult:
    """Read the finished audit in folder ``out`` (ValueError when a file of it is missing)."""
    out = Path(out)
    names = (audit.SETTINGS_FILE, audit.TABLE_FILE, audit.ERRORS_FILE, audit.MEANS_FILE, audit.SUMMARY_FILE)
    missing = [name for name in names if not (out / name).is_file()]
    if missing:
        raise ValueError(f"{out} holds no finished audit ({', '.join(missing)} missing); run "
                         "`python deepexplain.py audit SOURCE --out DIR` (or --resume) first")
    with np.load(out / audit.MEANS_FILE) as data:
        means = {label: data[label] for label in data.files}
    return AuditResult(out, json.loads((out / audit.SETTINGS_FILE).read_text()),
                       _read_csv(out / audit.TABLE_FILE), _read_csv(out / audit.ERRORS_FILE), means,
                       json.loads((out / audit.SUMMARY_FILE).read_text()))


def outside_center(row: Mapping[str, str]) -> float | None:
    """The share of an image's map outside the central half of the height and width (the grid's central
    cells), in [0, 1]; None for an all-zero map."""
    cells = [row[name] for name in _CENTER_CELLS]
    return None if "" in cells else 1.0 - sum(float(v) for v in cells)


def _item(key: str, identity: Mapping) -> audit.Item:
    """The audit item of table path ``key``: an embedded scene or a file under the audited folder."""
    kind, _, number = key.partition(":")
    if identity["source"] in audit.EMBEDDED_SOURCES and kind == identity["source"] and number.isdigit():
        return audit.Item(key, scene_id=int(number), marks=audit.EMBEDDED_SOURCES[kind][0])
    return audit.Item(key, file=Path(identity["source"]) / key)


def _preprocessing(identity: Mapping) -> de.Preprocessing:
    """How the audited model saw its images: the seed's stretch for the embedded model (and any model that is
    not torchvision's), resize and crop with the weights' metadata for a torchvision model."""
    if identity["model"] in torchvision.models.list_models(module=torchvision.models):
        return de.Preprocessing.from_weights(torchvision.models.get_model_weights(identity["model"]).DEFAULT)
    return de.Preprocessing()


# --------------------------------------------------------------------------- pictures

def _image_bytes(fig: Figure, fmt: str, dpi: float) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, **({"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def plot_mean_map(mean: np.ndarray, stats: Mapping | None = None, ax=None, title: str | None = None) -> Figure:
    """A class's mean normalized map (H×W, image coordinates) as a heat map, with the image's 10% border
    dashed and, given its :func:`deepexplain_audit.class_statistics` ``stats``, the flag's hottest window (red
    when flagged, white otherwise) and the flag in the title. Returns the figure."""
    if ax is None:
        ax = Figure(figsize=(2.4, 2.6)).subplots()
    h, w = mean.shape
    ax.imshow(mean, cmap="inferno", vmin=0)
    bh, bw = audit.BORDER * h, audit.BORDER * w
    ax.add_patch(Rectangle((bw - 0.5, bh - 0.5), w - 2 * bw, h - 2 * bh, fill=False, ls="--", lw=0.8,
                           ec="0.7"))
    window = (stats or {}).get("window")
    if window is not None:
        wh, ww = audit.WINDOW * h, audit.WINDOW * w
        ax.add_patch(Rectangle((window["col"] * w - ww / 2 - 0.5, window["row"] * h - wh / 2 - 0.5), ww, wh,
                               fill=False, lw=1.5, ec="red" if stats["flag"] else "white"))
    if stats is not None and stats.get("consistency") is not None:
        verdict = "FLAGGED" if stats["flag"] else "not flagged"
        title = f"{title or ''}\n{verdict}: c {stats['consistency']:.2f}, lift {stats['lift']:.1f}".strip()
    ax.set_title(title or "", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.figure


def plot_class_means(means: Mapping[str, np.ndarray], classes: Mapping[str, Mapping] | None = None, axes=None,
                     title: str | None = None) -> Figure:
    """The mean maps of several classes side by side (:func:`plot_mean_map`), one axis each (``axes``: as
    many matplotlib axes as classes, or None for a new one-row figure). Returns the figure."""
    labels = list(means)
    if axes is None:
        axes = Figure(figsize=(2.0 * len(labels), 2.4), layout="constrained").subplots(1, len(labels),
                                                                                      squeeze=False)[0]
    for ax, label in zip(axes, labels):
        plot_mean_map(means[label], None if classes is None else classes.get(label), ax=ax, title=label)
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
    return axes[0].figure


def _explanation(image: np.ndarray, saliency: np.ndarray, row: Mapping[str, str], preprocessing: de.Preprocessing,
                 settings: de.Settings, model: str) -> de.Explanation:
    """An :class:`deepexplain.Explanation` of a stored map, enough for the plots (no optimization history)."""
    x = preprocessing(image)
    saliency = np.asarray(saliency, dtype=np.float32)
    none = np.zeros(0)
    return de.Explanation(
        perturbed=x, target=int(row["target"]), original_score=float(row["original_score"]),
        perturbed_score=float(row["perturbed_score"]), losses=none, probabilities=none, l1s=none,
        steps_run=int(row["steps_run"]), seconds=float(row["seconds"]), mask=None, input=x, saliency=saliency,
        center_of_mass=de.center_of_mass(saliency), label=row["target_label"], settings=settings,
        model_name=model, predictions=[], preprocessing=preprocessing, mapping=preprocessing.mapping(image))


def _thumbnail(explanation: de.Explanation) -> bytes:
    """A THUMBNAIL-px JPEG of :func:`deepexplain.plot_overlay`, without its colorbar, legend and title."""
    fig = Figure(figsize=(1, 1))
    ax = fig.add_axes((0, 0, 1, 1))
    de.plot_overlay(explanation, ax=ax)
    for extra in fig.axes[1:]:  # the colorbar: every thumbnail's scale is the same
        extra.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set_title("")
    ax.set_position((0, 0, 1, 1))
    return _image_bytes(fig, "jpeg", THUMBNAIL)


# --------------------------------------------------------------------------- choosing the images

def _float(value: str) -> float:
    return float(value) if value != "" else float("nan")


def _groups(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """A class's rows grouped into what its section shows: most outside the center, misclassified, most and
    least confident (each row is one of audit.csv, with its table index in ``"_index"``)."""
    by_outside = sorted((r for r in rows if outside_center(r) is not None), key=outside_center, reverse=True)
    by_confidence = sorted(rows, key=lambda r: _float(r["predicted_probability"]), reverse=True)
    most = by_confidence[:SHOWN]
    least = [r for r in by_confidence[::-1][:SHOWN] if r not in most] if len(rows) > SHOWN else []
    return {"most outside the center": by_outside[:SHOWN],
            "misclassified": [r for r in rows if r["correct"] == "0"][:2 * SHOWN],
            "most confident": most, "least confident": least}


def _caption(row: Mapping[str, str]) -> str:
    outside = outside_center(row)
    truth = f" (true {row['true_label']})" if row["correct"] == "0" else ""
    return (f"{row['path']}{truth}: p {_float(row['predicted_probability']):.2f}, outside "
            f"{'–' if outside is None else f'{outside:.2f}'}, border {_float(row['border']):.2f}")


# --------------------------------------------------------------------------- the report

@dataclass
class _Section:
    label: str
    stats: dict
    rows: list[dict]
    groups: dict[str, list[dict]]


def _sections(result: AuditResult) -> list[_Section]:
    """One section per explained class, flagged classes first, then by label."""
    rows = [{**row, "_index": i} for i, row in enumerate(result.rows)]
    labels = sorted(result.classes, key=lambda label: (not result.classes[label]["flag"], label))
    sections = []
    for label in labels:
        own = [r for r in rows if r["target_label"] == label]
        sections.append(_Section(label, result.classes[label], own, _groups(own)))
    return sections


def _pictures(result: AuditResult, sections: Sequence[_Section],
              preprocessing: de.Preprocessing | None) -> dict[str, bytes]:
    """Every picture of the report by its file name under ``report/``: the overview, each class's mean map
    and each image shown (drawn once however many groups show it)."""
    shown = {r["_index"]: r for s in sections for group in s.groups.values() for r in group}
    overview = [s.label for s in sections][:OVERVIEW_CLASSES]
    pictures = {"overview.png": _image_bytes(plot_class_means(
        {label: result.means[label] for label in overview}, result.classes), "png", 80)} if overview else {}
    for k, section in enumerate(sections):
        pictures[f"mean_{k:03d}.png"] = _image_bytes(plot_mean_map(
            result.means[section.label], section.stats, title=section.label), "png", 80)
    identity = result.identity
    preprocessing = preprocessing or _preprocessing(identity)
    settings = de.Settings.from_preset(identity["preset"], **identity["settings"])
    maps = audit.read_maps(result.out, keys={r["path"] for r in shown.values()})
    for index, row in sorted(shown.items()):
        try:
            image = _item(row["path"], identity).image()
        except (OSError, ValueError):  # the image was moved or removed since the audit: no thumbnail
            continue
        explanation = _explanation(image, maps[row["path"]], row, preprocessing, settings, identity["model"])
        pictures[f"image_{index:05d}.jpg"] = _thumbnail(explanation)
    return pictures


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _class_cells(section: _Section) -> list[str]:
    s = section.stats
    window = s.get("window")
    where = "–" if window is None else f"row {window['row']:.2f}, col {window['col']:.2f} ({window['share']:.2f})"
    wrong = sum(r["correct"] == "0" for r in section.rows)
    return [section.label, str(s["images"]), str(wrong), _fmt(s["border"]), _fmt(s["consistency"]),
            _fmt(s["lift"], 1), "**FLAGGED**" if s["flag"] else "no", where]


CLASS_HEADER = ["class", "images", "misclassified", "border share", "consistency", "lift", "flag",
                "hottest window (share)"]


def _intro(result: AuditResult) -> list[str]:
    """The report's opening lines (plain text, markdown emphasis only)."""
    i, s = result.identity, result.summary
    flagged = [label for label, c in result.classes.items() if c["flag"]]
    return [f"Model **{i['model']}**, source {i['source']}, preset {i['preset']}: {len(result.rows)} images "
            f"explained, {len(result.errors)} could not be (errors.csv).",
            f"Shortcut flag (window {audit.WINDOW:.3g} of the side; flagged with ≥ {audit.FLAG_MIN_IMAGES} images, "
            f"consistency ≥ {audit.FLAG_CONSISTENCY:g}, lift ≥ {audit.FLAG_LIFT:g}): "
            + (f"**{len(flagged)} flagged: {', '.join(flagged)}**." if flagged else "no class flagged.")
            + " Consistency 1: every image's hottest window is at the same place; lift: how many times a flat "
              "map's share the mean map puts there. Read a flagged class's mean map and images before blaming "
              "the model: objects that always sit at the same place are consistent too.",
            f"Last run: {s['explained']} explained, {s['skipped']} skipped as done, "
            f"{s['images_per_hour']:.0f} images/hour."]


def _markdown(result: AuditResult, sections: Sequence[_Section], pictures: Mapping[str, bytes]) -> str:
    def esc(text: str) -> str:
        return re.sub(r"([|*_\[\]<>])", r"\\\1", str(text))

    lines = [f"# Audit of {esc(result.identity['model'])}", "", *(p + "\n" for p in _intro(result)),
             "| " + " | ".join(CLASS_HEADER) + " |", "|" + "---|" * len(CLASS_HEADER)]
    lines += ["| " + " | ".join(c if c.startswith("**") else esc(c) for c in _class_cells(s)) + " |"
              for s in sections]
    lines += ["", f"![mean maps]({REPORT_DIR}/overview.png)" if "overview.png" in pictures else "", ""]
    for k, section in enumerate(sections):
        lines += [f"## {esc(section.label)}", "", " · ".join(
            f"{h}: {c}" for h, c in zip(CLASS_HEADER[1:], _class_cells(section)[1:])), "",
            f"![mean map of {esc(section.label)}]({REPORT_DIR}/mean_{k:03d}.png)", ""]
        for name, group in section.groups.items():
            group = [r for r in group if f"image_{r['_index']:05d}.jpg" in pictures]
            if not group:
                continue
            lines += [f"**{name}**", "", "| " + " | ".join(
                f"![]({REPORT_DIR}/image_{r['_index']:05d}.jpg)" for r in group) + " |",
                "|" + "---|" * len(group), "| " + " | ".join(esc(_caption(r)) for r in group) + " |", ""]
    return "\n".join(lines) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}.row{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;width:" + str(THUMBNAIL + 24) + "px;font-size:70%;word-break:break-all}"
        ".flag{color:#b00;font-weight:bold}")


def _html(result: AuditResult, sections: Sequence[_Section], pictures: Mapping[str, bytes]) -> str:
    def img(name: str, alt: str = "") -> str:
        kind = "jpeg" if name.endswith(".jpg") else "png"
        data = base64.b64encode(pictures[name]).decode()
        return f'<img src="data:image/{kind};base64,{data}" alt="{html.escape(alt)}">'

    def para(text: str) -> str:
        return "<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text)) + "</p>"

    def cells(section: _Section) -> str:
        return "".join(f'<td class="flag">FLAGGED</td>' if c == "**FLAGGED**" else f"<td>{html.escape(c)}</td>"
                       for c in _class_cells(section))

    header = "<tr>" + "".join(f"<th>{h}</th>" for h in CLASS_HEADER) + "</tr>"
    title = f"Audit of {html.escape(result.identity['model'])}"
    parts = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style>'
             f"</head><body><h1>{title}</h1>", *(para(p) for p in _intro(result)),
             f"<table>{header}",
             *(f"<tr>{cells(s)}</tr>" for s in sections), "</table>",
             f"<p>{img('overview.png', 'mean maps')}</p>" if "overview.png" in pictures else ""]
    for k, section in enumerate(sections):
        parts += [f"<h2>{html.escape(section.label)}</h2><table>{header}<tr>{cells(section)}</tr></table>",
                  f"<p>{img(f'mean_{k:03d}.png', 'mean map')}</p>"]
        for name, group in section.groups.items():
            names = [(f"image_{r['_index']:05d}.jpg", r) for r in group]
            figures = [f"<figure>{img(name)}<figcaption>{html.escape(_caption(r))}</figcaption></figure>"
                       for name, r in names if name in pictures]
            if figures:
                parts += [f"<h3>{name}</h3><div class='row'>", *figures, "</div>"]
    return "\n".join([*parts, "</body></html>"]) + "\n"


def write_report(out: str | Path, preprocessing: de.Preprocessing | None = None) -> list[Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` with its pictures in ``report/`` for the
    finished audit in folder ``out``, all or none; pictures of an earlier report that this one no longer uses
    are removed. ``preprocessing``: how the model saw its images (default: read from the audit's model name).
    Returns the paths written. Raises ValueError when ``out`` holds no finished audit."""
    result = read_audit(out)
    sections = _sections(result)
    pictures = _pictures(result, sections, preprocessing)
    folder = result.out / REPORT_DIR
    folder.mkdir(exist_ok=True)
    texts = {result.out / REPORT_HTML: _html(result, sections, pictures).encode(),
             result.out / REPORT_MD: _markdown(result, sections, pictures).encode()}
    files = {**texts, **{folder / name: data for name, data in pictures.items()}}
    write_atomically({path: (lambda f, d=data: f.write(d)) for path, data in files.items()})
    for old in folder.glob("*"):
        if old not in files and re.fullmatch(r"(overview|mean_\d+|image_\d+)\.(png|jpg)", old.name):
            old.unlink()
    return list(files)
