"""The evaluation harness: metrics on hand-made cases with known answers, methods, the run and its files."""

import csv

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

import deepexplain as de
import deepexplain_cli as cli
import deepexplain_eval as ev
import deepexplain_io as dio
import deepexplain_scenes as scenes
from helpers import RegionClassifier, square_mask


@pytest.fixture
def region_case():
    mask = square_mask()
    x = torch.zeros(1, 3, 224, 224)
    x[..., 100:130, 100:130] = 1.0  # a bright square exactly where the model looks
    return RegionClassifier(mask, x).eval(), x, mask


# --------------------------------------------------------------------------- localization metrics

def test_map_equal_to_mask_hits_everything():
    mask = square_mask()
    saliency = mask.astype(float)
    assert ev.pointing_hit(saliency, mask)
    assert ev.com_hit(saliency, mask)
    assert ev.energy_inside(saliency, mask) == 1.0


def test_maximum_outside_the_object_misses():
    mask = square_mask()
    saliency = np.zeros(mask.shape)
    saliency[10:20, 10:20] = 1.0  # ~110 px away from the object
    assert not ev.pointing_hit(saliency, mask)
    assert not ev.com_hit(saliency, mask)
    assert ev.energy_inside(saliency, mask) == 0.0


def test_tolerances_are_measured_from_the_object_edge():
    mask = square_mask(top=100, left=100, size=30)  # rows/cols 100..129
    saliency = np.zeros(mask.shape)
    saliency[115, 129 + 14] = 1.0  # 14 px right of the edge
    assert ev.pointing_hit(saliency, mask)  # within 15
    assert not ev.com_hit(saliency, mask)  # beyond 8
    saliency[115, 129 + 14] = 0
    saliency[115, 129 + 16] = 1.0
    assert not ev.pointing_hit(saliency, mask)


def test_plateau_maximum_is_its_middle():
    """A dilated map's flat top: the point is the plateau's middle, not its first pixel."""
    mask = square_mask(top=100, left=100, size=5)
    saliency = np.zeros(mask.shape)
    saliency[80:125, 80:125] = 1.0  # plateau centred on the object; its corner is 20+ px away
    assert ev.pointing_hit(saliency, mask)


def test_constant_or_empty_maps_miss():
    mask = square_mask()
    assert not ev.pointing_hit(np.ones(mask.shape), mask)
    assert not ev.com_hit(np.zeros(mask.shape), mask)
    assert ev.energy_inside(np.zeros(mask.shape), mask) == 0.0


def test_energy_is_the_share_inside():
    mask = square_mask()
    saliency = np.zeros(mask.shape)
    saliency[mask] = 1.0
    saliency[:30, :30] = 1.0  # same area outside
    assert ev.energy_inside(saliency, mask) == pytest.approx(0.5)


# --------------------------------------------------------------------------- faithfulness metrics

def test_curve_auc_known_areas():
    assert ev.curve_auc(np.ones(51)) == pytest.approx(1.0)
    assert ev.curve_auc(np.linspace(1, 0, 51)) == pytest.approx(0.5)


def test_deletion_of_the_true_ordering_is_lower_than_of_the_reversed(region_case):
    model, x, mask = region_case
    true_map = mask.astype(float)
    del_true, ins_true = ev.deletion_insertion_curves(model, x, 0, true_map)
    del_rev, ins_rev = ev.deletion_insertion_curves(model, x, 0, 1 - true_map)
    assert del_true.shape == (51,) and del_true[0] == pytest.approx(del_rev[0])  # both start at the input
    assert ev.curve_auc(del_true) < ev.curve_auc(del_rev) - 0.3
    assert ev.curve_auc(ins_true) > ev.curve_auc(ins_rev) + 0.3
    assert del_true[-1] == pytest.approx(ins_true[0])  # everything removed == nothing inserted


def test_blurred_keeps_shape_and_mean():
    x = torch.rand(2, 3, 64, 64)
    out = de.blurred(x, sigma=3)
    assert out.shape == x.shape
    assert out.std() < x.std()


# --------------------------------------------------------------------------- methods

def test_center_gaussian_peaks_in_the_middle():
    g = ev.center_gaussian((224, 224))
    assert g.shape == (224, 224)
    assert ev.pointing_hit(g, square_mask(top=105, left=105, size=14))
    assert g[0, 0] < 0.02


def test_meaningful_perturbation_finds_the_region_the_model_reads(region_case):
    model, x, mask = region_case
    saliency = ev.meaningful_perturbation(model, x, 0, steps=60, seed=0)
    assert saliency.shape == (224, 224)
    assert saliency.min() >= 0 and saliency.max() <= 1
    assert ev.pointing_hit(saliency, mask)
    assert ev.energy_inside(saliency, mask) > 3 * mask.mean()


def test_gradcam_layer_for_torchvision_style_and_plain_models():
    model = scenes.ShapesNet()
    assert ev.gradcam_layer(model) is model.features[-1]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    assert ev.gradcam_layer(plain) is plain[2]
    with pytest.raises(ValueError, match="no Conv2d"):
        ev.gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


@pytest.fixture(scope="module")
def shapes_case(shapes):
    (case,) = ev.scene_cases(shapes, [ev.FIRST_SCENE_ID])
    return shapes, case


def test_every_method_gives_finite_maps_of_the_image_size(shapes_case):
    loaded, case = shapes_case
    maps, seconds = ev.run_methods(loaded, case, list(ev.METHODS), steps=3)
    assert set(maps) >= {"random", "center", "saliency", "integrated-gradients", "occlusion", "grad-cam",
                         "fong-vedaldi", "rise", *ev.OURS_VARIANTS, "ours-fast", *ev.MASKED_VARIANTS,
                         *ev.MASKED_EARLIER}
    for name, saliency in maps.items():
        assert saliency.shape == (224, 224), name
        assert np.isfinite(saliency).all() and saliency.min() >= 0, name
        assert seconds[name] > 0
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_earlier_masked_methods_are_the_masked_preset_with_their_settings(shapes_case):
    loaded, case = shapes_case
    maps, _ = ev.run_methods(loaded, case, ["ours-masked", *ev.MASKED_EARLIER], steps=4)
    deletion_only = de.explain(case.image, loaded, preset="masked", target=case.target, steps=4, verbose=False,
                               removal="learned", preserve_coeff=0.0, runs=2, smoothing=16.0)
    assert len(deletion_only.runs_steps) == 2
    np.testing.assert_array_equal(maps["ours-masked-deletion"], deletion_only.saliency)
    learned = de.explain(case.image, loaded, preset="masked", target=case.target, steps=4, verbose=False,
                         removal="learned", smoothing=16.0)
    np.testing.assert_array_equal(maps["ours-masked-learned"], learned.saliency)
    for earlier in (deletion_only, learned):  # the default blurs where the mask acts, and smooths less
        assert not np.allclose(maps["ours-masked"], earlier.saliency)


# --------------------------------------------------------------------------- sanity check

def test_randomized_copy_reinitialises_the_top_layers_only():
    model = scenes.load_shapes_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = ev.randomized_copy(model, 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    changed = {k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias", "features.15.weight"}


def test_randomizing_the_model_changes_a_gradient_map(shapes_case):
    loaded, case = shapes_case
    randomized = de.load_model(ev.randomized_copy(loaded.model, 6))
    trained, again = (ev.run_methods(loaded, case, ["saliency"])[0]["saliency"] for _ in range(2))
    changed = ev.run_methods(randomized, case, ["saliency"])[0]["saliency"]
    assert ev.rank_correlation(trained, again) == pytest.approx(1.0)
    assert ev.rank_correlation(trained, changed) < 0.8


def test_rank_correlation_of_a_constant_map_is_nan():
    assert np.isnan(ev.rank_correlation(np.ones((4, 4)), np.random.rand(4, 4)))


# --------------------------------------------------------------------------- statistics

def test_mean_ci_student_t_and_wilson():
    mean, low, high = ev.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.303 * (1 / np.sqrt(3)), rel=1e-3)
    mean, low, high = ev.mean_ci([1.0] * 8 + [0.0] * 2)
    assert mean == 0.8 and 0.4 < low < 0.8 < high < 1.0
    assert ev.mean_ci([float("nan"), 1.5])[0] == 1.5
    assert np.isnan(ev.mean_ci([])[0])


# --------------------------------------------------------------------------- planted shortcut

def test_marked_scene_differs_from_the_plain_one_only_on_the_tag():
    plain, marked = scenes.make_scene(5), scenes.make_marked_scene(5)
    tag = scenes.mark_mask()
    assert (plain.image[~tag] == marked.image[~tag]).all()
    assert (marked.image[tag] == scenes.MARK_COLOURS[plain.label]).all()
    assert not (tag & plain.mask).any()  # the tag never covers the object
    assert scenes.swapped_mark(5, plain.label) != plain.label


def test_shortcut_model_relies_on_the_tag():
    model = scenes.load_shapes_model(scenes.SHORTCUT_WEIGHTS_PATH)
    assert scenes.accuracy(model, 120, marks="match") >= 0.9
    assert scenes.accuracy(model, 120, marks="swap") <= 0.4


# --------------------------------------------------------------------------- the run

def test_evaluate_writes_every_table(tmp_path):
    result = ev.evaluate(n_scenes=2, steps=3, sanity_scenes=1, shortcut_scenes=1, accuracy_scenes=20,
                         n_examples=2, progress=False)
    n_maps = len(ev.SCENE_METHODS) - 1 + len(ev.OURS_VARIANTS)
    assert len(result.scores) == 2 * n_maps
    paths = ev.write_report(result, tmp_path, command="python deepexplain.py evaluate")
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir())
    assert ev.read_scores(tmp_path) == result.scores  # the CSV round-trips exactly
    table = ev.comparison_table(ev.read_scores(tmp_path), "ours-masked", ["grad-cam", "ours-seed"])
    assert "| ours-masked − grad-cam |" in table and "| ours-masked − ours-seed |" in table
    report = (tmp_path / "evaluation.md").read_text()
    for name in {r["method"] for r in result.scores}:
        assert f"| {name} |" in report
    assert "Sanity check" in report and "Planted shortcut" in report
    with open(tmp_path / "evaluation.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == n_maps
    assert all(0 <= float(r["pointing"]) <= 1 and float(r["seconds"]) > 0 for r in summary)
    assert len(result.sanity) == 3 * n_maps  # one scene, three randomization levels


def test_evaluate_rejects_unknown_methods_and_counts():
    with pytest.raises(ValueError, match="unknown method.*nope"):
        ev.evaluate(1, methods=["nope"])
    with pytest.raises(ValueError, match="n_scenes"):
        ev.evaluate(0)


def test_cli_evaluate_writes_the_report(tmp_path, capsys):
    code = cli.main(["evaluate", "--scenes", "1", "--methods", "center", "grad-cam", "--sanity-scenes", "0",
                    "--shortcut-scenes", "0", "--out", str(tmp_path)])
    assert code == 0
    assert "| grad-cam |" in (tmp_path / "evaluation.md").read_text()
    assert "--methods center grad-cam" in (tmp_path / "evaluation.md").read_text()  # how to reproduce it
    for name, columns in (("sanity.csv", ev.SANITY_COLUMNS), ("shortcut.csv", ev.SHORTCUT_COLUMNS)):
        assert (tmp_path / name).read_text() == ",".join(columns) + "\n"  # skipped: its header alone, not 0 bytes
    with open(tmp_path / "scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_an_empty_table_is_its_header_and_never_zero_bytes():
    assert dio.csv_bytes([], ["a", "b"]) == b"a,b\n"
    with pytest.raises(ValueError, match="an empty table needs its columns"):
        dio.csv_bytes([])


def test_the_grid_figure_has_a_legend_of_its_marks():
    scene = scenes.make_scene(5)
    maps = {"random": np.random.default_rng(0).random((224, 224)), "center": ev.center_gaussian((224, 224))}
    fig = ev.plot_examples(ev.EvaluationResult([], examples=[{"image": scene.image, "mask": scene.mask,
                                                              "maps": maps}]))
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 3 and any("object" in t for t in texts)
    assert any("maximum" in t for t in texts) and any("center of mass" in t for t in texts)
    handles = {h.get_marker(): h.get_color() for h in legend.legend_handles}
    assert handles["x"] == "lime" and handles["+"] == "white"  # the colours plot_map draws them in
    plt.close(fig)


@pytest.mark.parametrize("n_methods", [1, 8])
def test_the_grid_legend_fits_inside_the_figure_and_below_the_maps(n_methods):
    scene = scenes.make_scene(5)
    maps = {f"m{i}": ev.center_gaussian((224, 224)) for i in range(n_methods)}
    fig = ev.plot_examples(ev.EvaluationResult([], examples=[{"image": scene.image, "mask": scene.mask,
                                                              "maps": maps}] * 2))
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1  # no mark cut off at the sides
    assert legend.y1 <= min(ax.get_window_extent(renderer).y0 for ax in fig.axes)  # under every map
    plt.close(fig)


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method(s): nope"),
    (["--scenes", "0"], "n_scenes must be"),
])
def test_cli_evaluate_bad_input_is_one_line_and_no_files(tmp_path, capsys, args, message):
    assert cli.main(["evaluate", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepexplain: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_paired_differences_pair_the_scenes_both_methods_scored():
    rows = [{"scene_id": scene_id, "method": method, "pointing": value}
            for method, values in (("a", {1: 1.0, 2: 1.0, 3: 0.0, 5: 1.0}), ("b", {2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0}))
            for scene_id, value in values.items()]
    mean, low, high = ev.paired_differences(rows, "a", "b", keys=["pointing"])["pointing"]
    assert mean == pytest.approx(2 / 3)  # scenes 2, 3 and 5: differences 1, 0, 1
    assert low < mean < high
    assert ev.paired_differences(rows, "a", "a", keys=["pointing"])["pointing"] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no scene was scored for both 'a' and 'c'"):
        ev.paired_differences(rows, "a", "c", keys=["pointing"])
