"""Every notebook runs headlessly with papermill (smoke parameters, another cwd) and produces what it promises."""

import json
import re
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def tagged(notebook, tag):
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def run(name, tmp_path, **parameters):
    """Execute notebook ``name`` with smoke parameters from a foreign folder; return its summary JSON."""
    out = tmp_path / name
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters={"smoke": True, **parameters},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    (cell,) = tagged(nbformat.read(out, as_version=4), "summary")
    return json.loads("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"))


def committed(path: Path) -> str:
    """The notebook's text as committed (git HEAD), so that running or editing cells in the working copy, which
    the README invites, never fails this test; the file itself where there is no git checkout."""
    try:
        return subprocess.run(["git", "show", f"HEAD:notebooks/{path.name}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return path.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_committed_tutorial(path):
    text = committed(path)
    nb = nbformat.reads(text, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "In this notebook you will" in nb.cells[0].source
    assert len(tagged(nb, "parameters")) == 1 and len(tagged(nb, "summary")) == 1
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # one clean run
    assert not re.search(r"/root/|/work/|/tmp/|/home/", text)  # no machine-specific paths


def test_notebooks_together_weigh_under_3_mb():
    sizes = {path.name: len(committed(path).encode()) for path in NOTEBOOKS}
    assert sum(sizes.values()) < 3_000_000, sizes  # figures as JPEG (de.compact_figures), not PNG


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_parse_without_papermill_warnings(path, caplog):
    """Only literals in the parameters cell (an expression there makes papermill warn "Unable to parse line"):
    ``smoke = None`` there, and the next code cell turns None into "is CI set?"."""
    with caplog.at_level("WARNING", logger="papermill"):
        parameters = papermill.inspect_notebook(str(path))
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert parameters["smoke"]["default"] == "None"
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    (index,) = [i for i, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", [])]
    assert re.search(r'^if smoke is None:.*\n    smoke = "CI" in os\.environ$', code[index + 1].source, re.M)


def test_00_overview(tmp_path):
    summary = run("00_overview.ipynb", tmp_path)
    assert summary["perturbed_score"] < summary["original_score"]
    assert summary["saliency_shape"] == [224, 224] and summary["label"] == "star"


def test_01_preprocessing(tmp_path):
    summary = run("01_preprocessing.ipynb", tmp_path)
    assert summary["tensor_shape"] == [1, 3, 224, 224]
    assert summary["modes"] and all(shape[2] == 3 for shape in summary["modes"].values())
    assert 0 <= summary["score_bgr"] <= 1 and 0 <= summary["score_rgb"] <= 1


def test_02_model_assessment(tmp_path):
    summary = run("02_model_assessment.ipynb", tmp_path, target=3)
    assert len(summary["top5"]) == 5 and summary["target"] == 3 and summary["target_label"] == "cross"
    probabilities = [p["probability"] for p in summary["top5"]]
    assert probabilities == sorted(probabilities, reverse=True)
    # a class the model already rejects can rise during a short run: only its range is a contract
    assert 0 <= summary["target_perturbed_score"] <= 1 and 0 <= summary["target_original_score"] <= 1


def test_03_perturbation_generator(tmp_path):
    summary = run("03_perturbation_generator.ipynb", tmp_path, kernel_size=5)
    assert summary["output_shape"] == [1, 3, 224, 224] and summary["n_parameters"] == 3 * 3 * 5 * 5 + 3
    assert summary["finite"] and summary["within_range"] and summary["constant_relu_finite"]


def test_04_optimization(tmp_path):
    summary = run("04_optimization.ipynb", tmp_path, image="disk")
    assert summary["label"] == "disk" and summary["perturbed_score"] < summary["original_score"] / 10


def test_05_postprocessing(tmp_path):
    summary = run("05_postprocessing.ipynb", tmp_path, dilation=5)
    assert summary["saliency_shape"] == [224, 224]
    assert all(shape == [224, 224] for shape in summary["stage_shapes"].values())
    assert summary["perturbed_score"] < summary["original_score"]


def test_06_applications(tmp_path):
    summary = run("06_applications.ipynb", tmp_path, model="shapes", images=["disk", "ring", "cross"], smoke_images=3)
    assert summary["n_images"] == len(summary["rows"]) == 3
    assert [row["label"] for row in summary["rows"]] == ["disk", "ring", "cross"]
    assert all(row["perturbed_score"] < row["original_score"] for row in summary["rows"])


def test_07_evaluation(tmp_path):
    summary = run("07_evaluation.ipynb", tmp_path, methods=["random", "center", "grad-cam", "ours"])
    assert summary["n_scenes"] == 2 and summary["steps"] == 5
    assert {"random", "center", "grad-cam", "ours-seed", "ours-no-crop"} <= set(summary["methods"])
    assert set(summary["pointing"]) == set(summary["deletion"]) == set(summary["methods"])
    assert all(0 <= v <= 1 for v in [*summary["pointing"].values(), *summary["deletion"].values()])
    assert summary["sanity_levels"] == ["all 6 layers", "top 3 layers", "top layer"]
    assert summary["shortcut_accuracy"]["match"] > summary["shortcut_accuracy"]["swap"]
    assert all(0 <= v <= 1 for v in summary["tag_energy"].values())


def test_08_beyond_the_seed(tmp_path):
    summary = run("08_beyond_the_seed.ipynb", tmp_path, example_seed=30000001)
    assert summary["steps"] == 5 and summary["gallery"] == 1
    assert summary["mask_shape"] == [1, 1, 224, 224]
    assert 0 <= summary["mask_range"][0] <= summary["mask_range"][1] <= 1
    original, perturbed = summary["masked_scores"]
    assert 0 <= perturbed <= 1 and 0 < original <= 1
    for scores in (summary["seed"], summary["masked"]):
        assert set(scores) == {"pointing", "com_hit", "energy", "deletion", "insertion"}
        assert all(0 <= v <= 1 for v in scores.values())
    assert set(summary["gallery_pointing"]) == {"grad-cam", "fong-vedaldi", "ours-seed", "ours-masked"}
    assert set(summary["tag_share"]) == {"ours-seed", "ours-masked"}
    assert {"grad-cam", "ours-seed", "ours-masked"} <= set(summary["table_methods"])


def test_09_auditing_a_model(tmp_path):
    summary = run("09_auditing_a_model.ipynb", tmp_path)
    assert summary["n_scenes"] == 6 and summary["steps"] == 5 and summary["explained"] == {"scenes": 6, "shortcut": 6}
    assert set(summary["classes"]) == set(summary["flagged"]) == {"scenes", "shortcut"}
    for classes in summary["classes"].values():
        assert sum(c["images"] for c in classes.values()) == 6
        assert all(0 < c["consistency"] <= 1 and c["lift"] >= 1 for c in classes.values())
    assert summary["flagged"] == {"scenes": [], "shortcut": []}  # fewer than 5 images per class on the short path
    assert summary["report_files_exist"] and summary["html_self_contained"] and summary["report_fraction"] > 0
    assert (tmp_path / "results" / "09_auditing_a_model" / "shortcut" / "report.html").is_file()
