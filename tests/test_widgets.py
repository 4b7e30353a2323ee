"""Each widget panel, driven from Python as a headless run would: set values, click Run, see the output change."""

import numpy as np
import pytest

import deepexplain as de
import deepexplain_scenes as scenes


@pytest.fixture(scope="module")
def stored(shapes):
    return de.explain("star", shapes, preset="seed", steps=10, verbose=False)


def test_generator_panel_redraws_when_a_slider_moves(shapes):
    x = shapes.preprocessing(de.read_image("disk"))
    panel = de.generator_panel(x, kernel_size=3, nblocks=3, nlayers=3)
    first = panel.image.value
    assert first and set(panel.controls) == {"kernel_size", "nblocks", "nlayers"}
    panel.controls["nblocks"].value = 1
    assert panel.image.value != first
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


def test_optimization_panel_runs_only_on_click(shapes):
    images = {"star": "star", "ring": scenes.load_sample("ring").image}
    panel = de.optimization_panel(images, shapes, steps=4)
    assert panel.result is None and panel.image.value == b""  # nothing runs before the click
    panel.controls["image"].value = "ring"
    panel.controls["steps"].value = 3
    panel.controls["l1_coeff"].value = 2.0
    panel.run.click()
    assert panel.result.label == "ring" and panel.result.steps_run == 3
    assert panel.result.hyperparameters["l1_coeff"] == 2.0
    assert panel.progress.value == panel.progress.max == 3 and panel.image.value
    assert not panel.run.disabled


def test_postprocessing_panel_redraws_from_the_stored_result(stored):
    panel = de.postprocessing_panel(stored, power=6, border=0.1, dilation=20)
    first = panel.image.value
    np.testing.assert_array_equal(panel.result.saliency, stored.saliency)
    panel.controls["dilation"].value = 3
    assert panel.image.value != first
    assert panel.result.hyperparameters["dilation"] == 3 and panel.result.losses is stored.losses
    assert (panel.result.saliency > 0).sum() < (stored.saliency > 0).sum()  # a smaller dilation covers less
    before = panel.image.value
    panel.controls["difference"].value = "abs-sum"
    assert panel.image.value != before and panel.result.hyperparameters["difference"] == "abs-sum"
    assert de.with_postprocessing(panel.result, power=6).hyperparameters["difference"] == "abs-sum"  # kept
    assert set(panel.controls) == {spec.name for spec in de.PostprocessingSettings.specs()}


def test_postprocessing_panel_starts_from_the_explanations_own_settings(shapes):
    masked = de.explain("star", shapes, preset="masked", steps=3, runs=1, verbose=False)
    panel = de.postprocessing_panel(masked)
    assert {name: c.value for name, c in panel.controls.items()} == masked.settings.postprocessing.as_dict()
    np.testing.assert_array_equal(panel.result.saliency, masked.saliency)
    panel.controls["smoothing"].value = 0.0
    assert panel.result.hyperparameters["smoothing"] == 0.0 and panel.result.hyperparameters["power"] == 4
