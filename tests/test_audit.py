"""The dataset audit (deepexplain_audit): discovery, the table and maps, resume, interrupted runs, bad images,
the command line. Runs are kept tiny: the fast preset with 2 steps, a few embedded scenes."""

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deepexplain as de
import deepexplain_audit as audit
import deepexplain_cli as cli
import deepexplain_eval as ev
import deepexplain_report as report
import deepexplain_scenes as scenes
from deepexplain_io import csv_bytes

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"preset": "fast", "steps": 2, "device": "cpu", "progress": False}
QUICK_ARGS = ["--preset", "fast", "--steps", "2", "--device", "cpu"]
TIMED = {"seconds"}  # the only columns that differ between two runs of the same audit


def scene_png(path: Path, scene_id: int) -> Path:
    """Save embedded scene ``scene_id`` as a PNG at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scenes.make_scene(scene_id).image).save(path)
    return path


def table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def leftovers(folder: Path) -> list[Path]:
    """Temporary or backup files left anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted audit of 6 scenes in batches of 2."""
    out = tmp_path_factory.mktemp("reference")
    audit.audit("scenes:6", out, batch=2, **QUICK)
    return out


# --------------------------------------------------------------------------- discovery

def test_a_folder_is_searched_recursively_with_imagefolder_labels_and_other_files_ignored(tmp_path):
    for name in ("star/a.png", "star/deeper/b.PNG", "disk/c.jpg", "disk/notes.txt", ".hidden/d.png",
                 "disk/.e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = audit.discover(tmp_path)
    assert [(i.key, i.true_label) for i in items] == [
        ("disk/c.jpg", "disk"), ("star/a.png", "star"), ("star/deeper/b.PNG", "star")]


def test_a_folder_with_images_at_its_top_has_no_labels(tmp_path):
    for name in ("top.png", "star/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [(i.key, i.true_label) for i in audit.discover(tmp_path)] == [("star/a.png", None), ("top.png", None)]


def test_embedded_sources_are_scenes_from_the_evaluations_first_id_with_their_labels():
    clean, tagged = audit.discover("scenes:3"), audit.discover("shortcut:2")
    assert [i.key for i in clean] == [f"scenes:{ev.FIRST_SCENE_ID + k}" for k in range(3)]
    assert [i.true_label for i in clean] == [scenes.make_scene(ev.FIRST_SCENE_ID + k).name for k in range(3)]
    tag = scenes.mark_mask()
    assert (tagged[0].image()[tag] != clean[0].image()[tag]).any() and tagged[0].true_label == clean[0].true_label


def test_folder_labels_are_matched_against_the_models_labels():
    labels = scenes.CLASS_NAMES
    assert audit._label_index("Star", labels) == 4 and audit._label_index("cross", labels) == 3
    assert audit._label_index("golden_retriever", ["tench", "golden retriever"]) == 1
    assert audit._label_index("n01440764", labels) is None and audit._label_index(None, labels) is None


# --------------------------------------------------------------------------- statistics

def test_map_statistics_of_an_even_map_and_of_a_point():
    even = audit.map_statistics(np.ones((224, 224), np.float32))
    assert even["com_row"] == pytest.approx(0.5) and even["com_col"] == pytest.approx(0.5)
    assert all(even[f"cell_{r}_{c}"] == pytest.approx(1 / 16) for r in range(4) for c in range(4))
    assert even["border"] == pytest.approx(1 - 0.8 ** 2, abs=0.01)
    point = np.zeros((224, 224))
    point[10, 200] = 3.0
    stats = audit.map_statistics(point)
    assert stats["cell_0_3"] == 1.0 and stats["border"] == 1.0
    assert stats["com_row"] == pytest.approx(10.5 / 224) and stats["com_col"] == pytest.approx(200.5 / 224)
    assert set(audit.map_statistics(np.zeros((8, 8))).values()) == {None}


def blob(center: tuple[int, int], size: int = 224, radius: int = 12) -> np.ndarray:
    """A size×size map: a disk of ones around ``center`` (row, col)."""
    rows, cols = np.ogrid[:size, :size]
    return ((rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2).astype(np.float64)


def object_centers(n: int) -> list[tuple[int, int]]:
    """``n`` object positions spread over the image, as scenes place them."""
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(40, 184, size=2)) for _ in range(n)]


def test_the_window_peak_finds_the_hottest_window_and_its_place():
    point = np.zeros((224, 224))
    point[100, 11] = 2.0
    share, row, col = audit.window_peak(point)
    assert share == pytest.approx(1.0) and abs(row - 100.5 / 224) < 14 / 224 and abs(col - 11.5 / 224) < 14 / 224
    assert audit.window_peak(np.ones((224, 224)))[0] == pytest.approx(1 / 64)
    assert all(np.isnan(audit.window_peak(np.zeros((8, 8)))))


def test_a_class_that_looks_at_a_fixed_corner_is_flagged_and_one_that_follows_its_object_is_not():
    tag = (112, 11)  # the planted tag's place: the middle of the left edge
    fixed = [blob(tag) + 0.5 * blob(c) for c in object_centers(8)]
    stats = audit.maps_statistics(fixed)
    assert stats["flag"] and stats["images"] == 8
    assert stats["consistency"] >= audit.FLAG_CONSISTENCY and stats["lift"] >= audit.FLAG_LIFT
    assert abs(stats["window"]["row"] - 0.5) < 0.07 and stats["window"]["col"] < 0.1
    following = audit.maps_statistics([blob(c) + 0.1 for c in object_centers(8)])
    assert not following["flag"] and following["consistency"] < 0.5
    flat = audit.maps_statistics([np.ones((224, 224))] * 8)
    assert not flat["flag"] and flat["consistency"] == pytest.approx(1.0) and flat["lift"] == pytest.approx(1.0)
    few = audit.maps_statistics(fixed[:audit.FLAG_MIN_IMAGES - 1])
    assert not few["flag"] and few["consistency"] >= audit.FLAG_CONSISTENCY and few["lift"] >= audit.FLAG_LIFT


def test_the_flag_statistics_leave_out_zero_maps_and_say_so_when_there_are_none():
    fixed = [blob((112, 11), radius=10)] * 5
    assert audit.maps_statistics([*fixed, np.zeros((224, 224))]) == audit.maps_statistics(fixed)
    empty = audit.maps_statistics([np.zeros((224, 224))])
    assert empty["images"] == 0 and empty["consistency"] is None and not empty["flag"]
    assert audit.maps_statistics(fixed)["border"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- a run

def test_an_audit_writes_a_row_and_a_float16_map_per_image_and_its_settings(reference):
    rows = table(reference / "audit.csv")
    assert [r["path"] for r in rows] == [f"scenes:{ev.FIRST_SCENE_ID + k}" for k in range(6)]
    assert list(rows[0]) == list(audit.COLUMNS)
    for row in rows:
        assert row["correct"] in ("0", "1") and row["steps_run"] == "2" and row["target"] == row["predicted"]
        cells = [float(row[f"cell_{r}_{c}"]) for r in range(4) for c in range(4)]
        assert sum(cells) == pytest.approx(1.0, abs=1e-6) and 0 <= float(row["border"]) <= 1
    maps = audit.read_maps(reference)
    assert set(maps) == {r["path"] for r in rows}
    assert all(m.dtype == np.float16 and m.shape == (224, 224) for m in maps.values())
    settings = json.loads((reference / "settings.json").read_text())
    assert settings["settings"] == de.Settings.from_preset("fast", steps=2).as_dict()
    assert settings["source"] == "scenes" and settings["model"] == "shapes" and settings["batch"] == 2
    assert settings["weights"] == str(scenes.WEIGHTS_PATH)
    with np.load(reference / "class_means.npz") as means:
        assert set(means.files) == {r["target_label"] for r in rows}
        assert all(means[k].sum() == pytest.approx(1.0, abs=1e-4) for k in means.files)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["explained"] == 6 and summary["errors"] == 0 and table(reference / "errors.csv") == []
    for label, c in summary["classes"].items():
        assert set(c) == {"images", "border", "consistency", "lift", "flag", "window"}
        assert c["images"] == sum(r["target_label"] == label for r in rows) and c["flag"] is False  # < 5 images
        assert 0 < c["consistency"] <= 1 + 1e-9 and 1 - 1e-9 <= c["lift"] <= 64 and 0 <= c["border"] <= 1
        assert 0 < c["window"]["row"] < 1 and 0 < c["window"]["col"] < 1


def test_explain_batch_is_called_once_per_batch_quietly_under_one_progress_bar(tmp_path, monkeypatch):
    calls, bars = [], []
    real, real_bar = de.explain_batch, audit.tqdm
    monkeypatch.setattr(de, "explain_batch", lambda images, *a, **k: calls.append((len(images), k)) or
                        real(images, *a, **k))
    monkeypatch.setattr(audit, "tqdm", lambda **k: bars.append(k) or real_bar(**k))
    audit.audit("scenes:5", tmp_path, batch=2, **{**QUICK, "progress": True})
    assert [n for n, _ in calls] == [2, 2, 1] and all(k["verbose"] is False for _, k in calls)
    assert len(bars) == 1 and bars[0]["total"] == 5 and bars[0]["unit"] == "image"


def test_an_image_whose_explanation_fails_is_listed_and_the_rest_of_its_batch_explained(tmp_path, monkeypatch):
    real = de.explain_batch
    poison = audit.discover("scenes:3")[1].image()

    def fails_on_poison(images, *a, **k):
        if any(np.array_equal(image, poison) for image in images):
            raise ValueError("the optimization diverged")
        return real(images, *a, **k)

    monkeypatch.setattr(de, "explain_batch", fails_on_poison)
    summary = audit.audit("scenes:3", tmp_path, batch=3, **QUICK)
    assert (summary.explained, summary.errors) == (2, 1)
    assert table(tmp_path / "errors.csv") == [{"path": f"scenes:{ev.FIRST_SCENE_ID + 1}",
                                               "reason": "ValueError: the optimization diverged"}]
    assert [r["path"] for r in table(tmp_path / "audit.csv")] == [f"scenes:{ev.FIRST_SCENE_ID + k}" for k in (0, 2)]


def test_bad_images_are_listed_with_their_reason_and_do_not_stop_the_audit(tmp_path, capsys):
    source = tmp_path / "images"
    scene_png(source / "star" / "good.png", ev.FIRST_SCENE_ID)
    good = scene_png(source / "disk" / "truncated.png", ev.FIRST_SCENE_ID + 1).read_bytes()
    (source / "disk" / "truncated.png").write_bytes(good[:len(good) // 2])
    (source / "disk" / "text.jpg").write_text("not an image")
    (source / "disk" / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(source / "disk" / "tiny.png")
    out = tmp_path / "out"
    code = cli.main(["audit", str(source), "--model", "shapes", "--out", str(out), *QUICK_ARGS])
    assert code == 0
    *_, last, report = capsys.readouterr().out.strip().splitlines()
    assert "4 errors" in last and report == f"report: {out / 'report.html'}" and (out / "report.html").is_file()
    errors = {r["path"]: r["reason"] for r in table(out / "errors.csv")}
    assert set(errors) == {"disk/truncated.png", "disk/text.jpg", "disk/empty.png", "disk/tiny.png"}
    assert "too small" in errors["disk/tiny.png"] and "empty" in errors["disk/empty.png"]
    assert all(errors.values())
    rows = table(out / "audit.csv")
    assert [(r["path"], r["true_label"]) for r in rows] == [("star/good.png", "star")]


# --------------------------------------------------------------------------- resume

def test_a_resume_skips_done_images_and_refuses_other_settings(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    audit.audit("scenes:4", out, batch=2, **QUICK)
    with pytest.raises(ValueError, match="already holds an audit; add --resume"):
        audit.audit("scenes:4", out, batch=2, **QUICK)
    with pytest.raises(ValueError, match="other settings: settings.steps 2 there, 3 now"):
        audit.audit("scenes:6", out, batch=2, resume=True, **{**QUICK, "steps": 3})
    with pytest.raises(ValueError, match="other settings: batch 2 there, 3 now"):
        audit.audit("scenes:6", out, batch=3, resume=True, **QUICK)
    explained = []
    real = de.explain_batch
    monkeypatch.setattr(de, "explain_batch", lambda images, *a, **k: explained.append(len(images)) or
                        real(images, *a, **k))
    summary = audit.audit("scenes:6", out, batch=2, resume=True, **QUICK)
    assert explained == [2] and (summary.explained, summary.skipped, summary.errors) == (2, 4, 0)
    assert untimed(table(out / "audit.csv")) == untimed(table(reference / "audit.csv"))


def assert_same_audit(out: Path, reference: Path) -> None:
    """Same table (but for timings) and the same maps as the reference run."""
    assert untimed(table(out / "audit.csv")) == untimed(table(reference / "audit.csv"))
    maps, expected = audit.read_maps(out), audit.read_maps(reference)
    assert maps.keys() == expected.keys()
    for key, m in expected.items():
        np.testing.assert_array_equal(maps[key], m)


def test_a_crash_in_the_second_batch_keeps_the_first_and_a_resume_completes_it(tmp_path, reference, monkeypatch):
    out = tmp_path / "out"
    real, calls = de.explain_batch, []

    def crash_second(images, *a, **k):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("crash")
        return real(images, *a, **k)

    monkeypatch.setattr(de, "explain_batch", crash_second)
    with pytest.raises(RuntimeError, match="crash"):
        audit.audit("scenes:6", out, batch=2, **QUICK)
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["00000.csv", "00000.errors.csv", "00000.npz"]
    assert not (out / "audit.csv").exists() and leftovers(out) == []
    monkeypatch.setattr(de, "explain_batch", real)
    audit.audit("scenes:6", out, batch=2, resume=True, **QUICK)
    assert_same_audit(out, reference)


SLOW_SECOND_BATCH = """
import sys, time
import deepexplain as de, deepexplain_cli as cli
real, calls = de.explain_batch, []
def slow_second(images, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        time.sleep(120)
    return real(images, *a, **k)
de.explain_batch = slow_second
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_after_the_first_batch_leaves_whole_files_and_a_resume_gives_the_same_audit(tmp_path, reference):
    out = tmp_path / "out"
    argv = ["audit", "scenes:6", "--batch", "2", "--out", str(out), *QUICK_ARGS]
    process = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_BATCH, *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "batches" / "00000.npz").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first batch was never written"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err.strip().splitlines()[-1] == "deepexplain: terminated"
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["00000.csv", "00000.errors.csv", "00000.npz"]
    assert leftovers(out) == [] and not (out / "audit.csv").exists()
    assert cli.main([*argv, "--resume"]) == 0
    assert_same_audit(out, reference)


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("args, message", [
    (["no/such/folder"], "is neither a folder nor scenes:N"),
    (["scenes:0"], "asks for no scenes"),
    (["scenes:2", "--batch", "0"], "batch must be a whole number ≥ 1, got 0"),
    (["scenes:2", "--limit", "-1"], "limit must be a whole number ≥ 1"),
    (["shortcut:2", "--model", "vgg19"], "explained with its own embedded model"),
    (["scenes:2", "--lr", "inf"], "lr must be a number in (0, 1000], got inf"),
    (["scenes:2", "--preset", "slow"], "argument --preset: invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = cli.main(["audit", *args, "--out", str(out), "--steps", "2", "--device", "cpu"])
    except SystemExit as exit:  # argparse's own errors exit from inside the parser
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and err.startswith("deepexplain: error: ")
    assert not out.exists()


def test_the_cli_audit_of_a_folder_fills_correct_from_imagefolder_labels(tmp_path, capsys):
    source = tmp_path / "images"
    for k in range(2):
        scene = scenes.make_scene(ev.FIRST_SCENE_ID + k)
        scene_png(source / scene.name / f"{k}.png", ev.FIRST_SCENE_ID + k)
    out = tmp_path / "out"
    assert cli.main(["audit", str(source), "--model", "shapes", "--out", str(out), "--limit", "1",
                     *QUICK_ARGS]) == 0
    *_, class_line, last, report = capsys.readouterr().out.rstrip().splitlines()
    assert last.startswith("audit: 1 images explained, 0 skipped as done, 0 errors, ")
    assert report == f"report: {out / 'report.html'}"
    rows = table(out / "audit.csv")
    assert class_line.startswith(f"  {rows[0]['target_label']}: 1 images, border share ")
    assert ", consistency 1.00, lift " in class_line and ", not flagged: window at row " in class_line
    assert (out / "report.html").is_file() and (out / "report" / "image_00000.jpg").is_file()  # from the file
    assert len(rows) == 1 and rows[0]["correct"] == str(int(rows[0]["predicted_label"] == rows[0]["true_label"]))


# --------------------------------------------------------------------------- the report

def referenced(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_the_audit_writes_a_self_contained_html_report_and_a_markdown_one_with_its_pictures(reference):
    page = (reference / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert "url(" not in page and "<link" not in page and "<script" not in page
    rows = table(reference / "audit.csv")
    labels = {r["target_label"] for r in rows}
    assert all(f"<h2>{label}</h2>" in page for label in labels)
    assert page.count("<figure>") >= len(rows)  # every image is shown in at least one group of its class
    markdown = (reference / "report.md").read_text()
    files = referenced(markdown)
    assert "report/overview.png" in files and len({f for f in files if f.endswith(".jpg")}) == len(rows)
    assert all((reference / f).is_file() for f in files)
    assert sorted(p.name for p in (reference / "report").iterdir()) == sorted({Path(f).name for f in files})
    assert all(f"## {label}" in markdown for label in labels) and "consistency" in markdown


def test_write_report_alone_rewrites_the_report_and_removes_pictures_it_no_longer_uses(tmp_path, reference):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "report" / "image_00099.jpg").write_bytes(b"old")
    (out / "report" / "notes.txt").write_text("mine")
    (out / "report.html").unlink()
    paths = report.write_report(out)
    assert out / "report.html" in paths and out / "report.md" in paths and (out / "report.html").is_file()
    assert not (out / "report" / "image_00099.jpg").exists() and (out / "report" / "notes.txt").exists()
    assert all(p.is_file() for p in paths) and leftovers(out) == []
    assert (out / "report.md").read_text() == (reference / "report.md").read_text()


def test_write_report_refuses_a_folder_without_a_finished_audit(tmp_path):
    with pytest.raises(ValueError, match="holds no finished audit"):
        report.write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_report_shows_misclassified_images_with_their_true_label(tmp_path, reference):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    rows = table(out / "audit.csv")
    wrong = rows[0]
    rows[0] = {**wrong, "true_label": "ring" if wrong["target_label"] != "ring" else "disk", "correct": "0"}
    (out / "audit.csv").write_bytes(csv_bytes(rows, audit.COLUMNS))
    report.write_report(out)
    page = (out / "report.html").read_text()
    section = page.split(f"<h2>{wrong['target_label']}</h2>")[1].split("<h2>")[0]
    assert "<h3>misclassified</h3>" in section and f"{wrong['path']} (true {rows[0]['true_label']})" in section


def test_the_report_of_an_audit_where_every_image_failed_says_so(tmp_path, monkeypatch):
    def fails(images, *a, **k):
        raise ValueError("the optimization diverged")

    monkeypatch.setattr(de, "explain_batch", fails)
    summary = audit.audit("scenes:2", tmp_path, batch=2, **QUICK)
    assert (summary.explained, summary.errors) == (0, 2)
    assert "0 images explained, 2 could not be" in (tmp_path / "report.html").read_text()
    assert referenced((tmp_path / "report.md").read_text()) == []
