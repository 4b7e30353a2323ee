"""Contracts of deepexplain.py: shapes, ranges, no mutation, determinism, errors, loading, CLI."""

import json
import re
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import deepexplain as de
import deepexplain_cli as cli
import deepexplain_scenes as scenes
from helpers import RegionClassifier, square_mask

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = 30


@pytest.fixture(scope="module")
def explanation(shapes, sample):
    return de.explain(sample.image, shapes, preset="seed", steps=FEW_STEPS, verbose=False)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads and an empty torch hub cache."""
    monkeypatch.setenv(de.OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def save_random_state_dict(name, path):
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)
    return path


# --------------------------------------------------------------------------- images

def test_load_image_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    for name in ("rgb.png", "gray.png", "palette.png"):
        img = de.load_image(tmp_path / name)
        assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    assert np.array_equal(de.load_image(tmp_path / "rgb.png"), rgb)
    gray = de.load_image(tmp_path / "gray.png")
    assert np.array_equal(gray[..., 0], rgb[..., 0]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255          # red ...
    rgba[:10, :, 3] = 255       # ... opaque in the top half, transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = de.load_image(tmp_path / "rgba.png")
    assert (img[:10] == [255, 0, 0]).all() and (img[10:] == 255).all()


def test_load_image_takes_first_gif_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    img = de.load_image(tmp_path / "anim.gif")
    assert img.shape == (32, 32, 3) and img[..., 0].mean() > 200 and img[..., 2].mean() < 50


def test_load_image_scales_16_bit(tmp_path):
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    img = de.load_image(tmp_path / "deep.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255


BAD_FILES = {
    "not found": lambda path: None,
    "empty": lambda path: path.write_bytes(b""),
    "not a readable image": lambda path: path.write_text("hello, I am text"),
    "too small": lambda path: Image.new("RGB", (1, 1)).save(path, format="PNG"),
}


@pytest.mark.parametrize("message", BAD_FILES)
def test_load_image_rejects_bad_files(tmp_path, message):
    path = tmp_path / "bad.jpg"
    BAD_FILES[message](path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        de.load_image(path)


def test_load_image_rejects_truncated_jpeg(tmp_path, sample):
    Image.fromarray(sample.image).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable image"):
        de.load_image(tmp_path / "cut.jpg")


def test_read_image_takes_sample_names_paths_and_arrays(sample):
    assert np.array_equal(de.read_image(sample.name), sample.image)
    assert np.array_equal(de.read_image(scenes.SAMPLES_DIR / f"{sample.name}.png"), sample.image)
    assert np.array_equal(de.read_image(Image.fromarray(sample.image)), sample.image)
    with pytest.raises(FileNotFoundError, match="stars"):
        de.read_image("stars")


def test_to_rgb_uint8_does_not_mutate_and_checks_ranges():
    floats = np.full((20, 20, 3), 0.5)
    out = de.to_rgb_uint8(floats)
    assert out.dtype == np.uint8 and (out == 128).all() and (floats == 0.5).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        de.to_rgb_uint8(floats * 3)
    with pytest.raises(ValueError, match="shape"):
        de.to_rgb_uint8(np.zeros((20, 20, 2), dtype=np.uint8))


# --------------------------------------------------------------------------- preprocessing

def test_preprocessing_is_rgb_and_normalized():
    prep = de.Preprocessing()
    red = np.zeros((300, 200, 3), dtype=np.uint8)
    red[..., 0] = 255
    x = prep(red)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    expected = [(1 - prep.mean[0]) / prep.std[0], -prep.mean[1] / prep.std[1], -prep.mean[2] / prep.std[2]]
    assert torch.allclose(x[0, :, 100, 100], torch.tensor(expected), atol=1e-5)


def test_to_image_inverts_preprocessing(sample):
    prep = de.Preprocessing()
    back = prep.to_image(prep(sample.image))
    assert back.shape == (224, 224, 3) and 0 <= back.min() and back.max() <= 1
    assert np.abs(back * 255 - sample.image).max() < 1.0


# --------------------------------------------------------------------------- generator

@pytest.mark.parametrize("x", [torch.randn(2, 3, 32, 32), torch.full((1, 3, 32, 32), 0.7)])
def test_generator_output_finite_and_within_input_range(x):
    torch.manual_seed(0)
    out = de.PerturbationGenerator()(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    for xi, oi in zip(x, out):
        assert oi.min() >= xi.min() - 1e-5 and oi.max() <= xi.max() + 1e-5


def test_generator_survives_all_zero_relu_output():
    gen = de.PerturbationGenerator()
    with torch.no_grad():
        gen.conv.weight.zero_()
        gen.conv.bias.fill_(-1.0)  # every ReLU output is 0: the seed divided by zero here
    x = torch.randn(1, 3, 16, 16)
    out = gen(x)
    assert torch.isfinite(out).all() and torch.allclose(out, x.min().expand_as(out))


def test_generator_shares_one_conv_and_makes_kernel_odd():
    with pytest.warns(UserWarning, match="even"):
        gen = de.PerturbationGenerator(kernel_size=4, nblocks=2, nlayers=5)
    assert gen.conv.kernel_size == (5, 5) and gen.conv.padding == (2, 2)
    assert sum(p.numel() for p in gen.parameters()) == 3 * 3 * 5 * 5 + 3
    with pytest.raises(ValueError, match="nblocks"):
        de.PerturbationGenerator(nblocks=0)


# --------------------------------------------------------------------------- post-processing

def test_postprocessing_stages():
    diff = np.zeros((100, 100))
    diff[40, 70] = -2.0
    sharp = de.sharpen(diff, 6)
    assert sharp[40, 70] == 64.0 and sharp.min() == 0           # |d| ** 6, never negative
    cropped = de.crop_border(np.ones((100, 100)), 0.1)
    assert cropped[:10].sum() == 0 and cropped[90:].sum() == 0 and cropped[:, :10].sum() == 0
    assert cropped[10:90, 10:90].all()
    dilated = de.dilate(sharp, 5)
    assert (dilated == 64).sum() == 25 and dilated.max() == 64
    assert de.center_of_mass(dilated) == pytest.approx((40, 70), abs=1)
    assert de.center_of_mass(np.zeros((10, 10))) is None


def test_signed_mean_difference_cancels_and_abs_sum_does_not():
    x = torch.zeros(1, 3, 8, 8)
    x_pert = x.clone()
    x_pert[0, 0, 2, 3], x_pert[0, 1, 2, 3] = 0.5, -0.5  # opposite changes in two channels
    x_pert[0, 2, 5, 5] = -0.3
    signed = de.difference_map(x, x_pert)
    assert signed[2, 3] == 0 and signed[5, 5] == pytest.approx(0.1)  # the seed's mean of x − x_pert
    absolute = de.difference_map(x, x_pert, "abs-sum")
    assert absolute[2, 3] == pytest.approx(1.0) and absolute[5, 5] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown difference 'max'"):
        de.difference_map(x, x_pert, "max")


def test_crop_border_does_not_mutate():
    saliency = np.ones((50, 50))
    de.crop_border(saliency, 0.2)
    assert saliency.all()


def test_saliency_map_points_at_the_changed_region():
    x = torch.zeros(1, 3, 64, 64)
    x_pert = x.clone()
    x_pert[..., 20:26, 40:46] = 1.0
    saliency = de.saliency_map(x, x_pert, power=6, border=0.1, dilation=3)
    assert saliency.shape == (64, 64) and saliency.dtype == np.float32 and saliency.min() >= 0
    assert de.center_of_mass(saliency) == pytest.approx((22.5, 42.5), abs=0.5)


# --------------------------------------------------------------------------- hyperparameters

def test_seed_preset_is_the_seeds_values():
    seed = dict(kernel_size=3, nblocks=3, nlayers=3, steps=1000, lr=0.01, l1_coeff=1.0,
                power=6, border=0.1, dilation=20, difference="signed-mean", smoothing=0.0, patience=0,
                precision="fp32", generator="plain", mask_size=28, area_coeff=1.0, tv_coeff=0.2, preserve_coeff=0.0,
                removal="learned", jitter=0, runs=1)
    assert dict(de.PRESETS["seed"]) == seed
    assert de.resolve_hyperparameters("seed", steps=5) == {**seed, "steps": 5}
    assert de.Settings() == de.Settings.from_preset("seed")  # the stages' defaults are the seed's


def test_default_is_the_masked_preset_and_presets_differ_only_where_documented():
    assert de.resolve_hyperparameters() == dict(de.MASKED_PRESET) == dict(de.DEFAULTS)
    assert de.resolve_hyperparameters(steps=7)["generator"] == "masked"
    changed = {k for k in de.SEED_PRESET if de.MASKED_PRESET[k] != de.SEED_PRESET[k]}
    assert changed == {"lr", "steps", "patience", "precision", "generator", "l1_coeff", "tv_coeff",
                       "preserve_coeff", "removal", "jitter", "smoothing", "power", "border", "dilation"}


def test_settings_are_grouped_by_stage_and_changed_by_name():
    settings = de.Settings.from_preset("fast", lr=0.05, power=2.5, generator="masked")
    assert settings.optimization.lr == 0.05 and settings.postprocessing.power == 2.5
    assert settings.generator.kind == "masked" and settings.optimization.steps == de.FAST_PRESET["steps"]
    assert settings.updated(lr=None) == settings  # None keeps a value
    assert set(de.SETTINGS) == set(de.SEED_PRESET)
    assert [spec.stage for spec in de.SETTINGS.values()] == sorted(
        (spec.stage for spec in de.SETTINGS.values()), key=["generator", "optimization", "postprocessing"].index)
    with pytest.warns(DeprecationWarning, match="'plain'"):
        assert de.Settings.from_preset("seed", generator="seed").generator.kind == "plain"


@pytest.mark.parametrize("bad, error, message", [
    ({"steps": 0}, ValueError, "steps"), ({"steps": -3}, ValueError, "steps"), ({"lr": 0}, ValueError, "lr"),
    ({"lr": -0.1}, ValueError, "lr"), ({"lr": float("inf")}, ValueError, "lr must be a number in (0, 1000]"),
    ({"lr": float("nan")}, ValueError, "lr must be"), ({"steps": 2.5}, ValueError, "steps must be an integer"),
    ({"border": 0.5}, ValueError, "border"), ({"dilation": 0}, ValueError, "dilation"),
    ({"power": 0}, ValueError, "power"), ({"nlayers": 0}, ValueError, "nlayers"),
    ({"momentum": 1}, ValueError, "unknown setting"),
    ({"difference": "max"}, ValueError, "difference must be one of signed-mean, abs-sum"),
    ({"patience": -1}, ValueError, "patience must be"),
    ({"precision": "fp16"}, ValueError, "precision must be one of fp32, bf16"),
    ({"steps": "100"}, TypeError, "steps must be an integer"), ({"lr": True}, TypeError, "lr must be"),
    ({"precision": 16}, TypeError, "precision must be a string"),
])
def test_bad_settings_are_named(bad, error, message):
    with pytest.raises(error, match=re.escape(message)):
        de.resolve_hyperparameters(**bad)


def test_a_stage_function_names_a_positional_value_where_settings_belong(explanation):
    with pytest.raises(TypeError, match="expected PostprocessingSettings .* got int 6"):
        de.with_postprocessing(explanation, 6)  # power, where the signature before settings objects took it
    with pytest.raises(TypeError, match="expected OptimizationSettings"):
        de.optimize_perturbation(explanation.input, explanation.input, de.make_generator(), 0, 100)


def test_even_kernel_size_is_made_odd_with_a_warning():
    with pytest.warns(UserWarning, match="even"):
        assert de.resolve_hyperparameters(kernel_size=2)["kernel_size"] == 3


@pytest.mark.parametrize("kind", list(de.GENERATORS))
def test_every_generator_kind_is_built_by_name_from_a_seed(kind):
    assert set(de.GENERATORS) == set(de.SETTINGS["generator"].choices)
    state = torch.random.get_rng_state()
    a, b, c = (de.make_generator(generator=kind, seed=seed) for seed in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert isinstance(a, de.GENERATORS[kind]) and a.settings.kind == kind
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv.weight, c.conv.weight)
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == x.shape and torch.isfinite(a(x)).all()


@pytest.mark.parametrize("preset", list(de.PRESET_BASES))
@pytest.mark.parametrize("kind", list(de.GENERATORS))
def test_contract_of_every_preset_and_generator_kind(shapes, sample, preset, kind):
    values = dict(generator=kind, steps=4, **({"runs": 1} if kind == "plain" else {}))
    first, again = (de.explain(sample.image, shapes, preset=preset, verbose=False, **values) for _ in range(2))
    assert first.settings == de.Settings.from_preset(preset, **values)
    assert first.input.shape == first.perturbed.shape == (1, 3, 224, 224) and torch.isfinite(first.perturbed).all()
    assert first.saliency.shape == (224, 224) and first.saliency.dtype == np.float32
    assert np.isfinite(first.saliency).all() and first.saliency.min() >= 0 and first.saliency.any()
    assert 0 <= first.perturbed_score <= 1 and 0 < first.original_score <= 1
    assert first.steps_run == len(first.losses) <= 4 and np.isfinite(first.losses).all()
    assert (first.mask is None) == (kind == "plain")
    if first.mask is not None:
        assert first.mask.shape == (1, 1, 224, 224) and 0 <= first.mask.min() and first.mask.max() <= 1
    np.testing.assert_array_equal(first.saliency, again.saliency)  # reproducible
    assert json.loads(json.dumps(first.summary()))["generator"] == kind


def test_readme_settings_table_is_the_declarations():
    assert de.settings_table() in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- explain

def test_explanation_contract(explanation, sample):
    e = explanation
    assert e.input.shape == e.perturbed.shape == (1, 3, 224, 224)
    assert e.saliency.shape == (224, 224) and e.saliency.dtype == np.float32 and e.saliency.min() >= 0
    assert e.target == e.predictions[0].index == sample.label and e.label == sample.name
    assert 0 <= e.perturbed_score <= 1 and 0 <= e.original_score <= 1
    assert len(e.losses) == len(e.probabilities) == len(e.l1s) == e.steps_run == FEW_STEPS
    np.testing.assert_allclose(e.losses, e.probabilities + e.l1s, rtol=1e-5)
    row, col = e.center_of_mass
    assert 22 <= row < 202 and 22 <= col < 202  # inside the uncropped window


@pytest.mark.parametrize("name", scenes.CLASS_NAMES[:2])
def test_target_probability_drops_tenfold_on_samples(shapes, name):
    e = de.explain(scenes.load_sample(name).image, shapes, preset="seed", steps=FEW_STEPS, verbose=False)
    assert e.original_score > 0.5
    assert e.perturbed_score < e.original_score / 10


def test_same_seed_same_map_and_global_rng_untouched(shapes, sample, explanation):
    state = torch.get_rng_state()
    again = de.explain(sample.image, shapes, preset="seed", steps=FEW_STEPS, verbose=False)
    other = de.explain(sample.image, shapes, preset="seed", steps=FEW_STEPS, seed=1, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(again.saliency, explanation.saliency)
    assert not np.array_equal(other.saliency, explanation.saliency)


def test_explain_other_target(shapes, sample):
    e = de.explain(sample.image, shapes, preset="seed", steps=3, target=2, verbose=False)
    assert e.target == 2 and e.label == scenes.CLASS_NAMES[2]
    with pytest.raises(ValueError, match="out of range"):
        de.explain(sample.image, shapes, steps=3, target=len(scenes.CLASS_NAMES), verbose=False)


def test_users_model_and_image_are_not_changed(sample):
    model = scenes.ShapesNet()
    model.train()
    model.classifier.requires_grad_(False)
    grads = [p.requires_grad for p in model.parameters()]
    image = sample.image.copy()
    e = de.explain(image, model, steps=2, verbose=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == grads
    assert np.array_equal(image, sample.image)
    assert e.label == "class %d" % e.target


def test_verbose_prints_assessment_and_low_confidence_warning(capsys, sample):
    torch.manual_seed(0)
    untrained = scenes.ShapesNet()  # near-uniform over 6 classes: top probability < 0.5
    de.explain(sample.image, untrained, steps=1)
    out = capsys.readouterr().out
    assert "5 top classes identified by the model" in out and "*** Warning ***" in out


def test_plots_return_figures_and_mark_center_at_x_col_y_row(explanation):
    import matplotlib.pyplot as plt

    fig = de.plot_panels(explanation)
    marker = fig.axes[2].lines[0]
    row, col = explanation.center_of_mass
    assert marker.get_xdata()[0] == pytest.approx(col) and marker.get_ydata()[0] == pytest.approx(row)
    _, ax = plt.subplots()
    assert de.plot_overlay(explanation, ax=ax) is ax.figure
    assert de.plot_history(explanation).axes
    plt.close("all")


def _map_image(ax):
    """The map layer of a saliency panel: the last image drawn on it."""
    return ax.images[-1]


def test_panels_show_the_rgb_images_and_the_map_as_relative_importance(explanation, sample):
    import matplotlib.pyplot as plt

    fig = de.plot_panels(explanation, mask=sample.mask)
    inputs, perturbed, saliency = fig.axes[:3]
    # the first two panels: the images as the user knows them, RGB de-normalized with the model's mean and std
    rgb = explanation.preprocessing.to_image(explanation.input)
    assert rgb.shape == (224, 224, 3) and 0 <= rgb.min() and rgb.max() <= 1
    np.testing.assert_allclose(inputs.images[0].get_array(), rgb)
    np.testing.assert_allclose(perturbed.images[0].get_array(),
                               explanation.preprocessing.to_image(explanation.perturbed))
    # the map: divided by its peak, in [0, 1], on a 0-1 colour scale whose bar says what it means
    heat = np.asarray(_map_image(saliency).get_array())
    assert heat.shape == explanation.saliency.shape and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    np.testing.assert_allclose(heat, explanation.saliency / explanation.saliency.max(), rtol=1e-6)
    assert _map_image(saliency).get_clim() == (0.0, 1.0)
    assert _map_image(saliency).colorbar.ax.get_ylabel() == de.IMPORTANCE_LABEL == "relative importance"
    # class and scores in the title; the object's outline where a mask is given
    title = fig.get_suptitle()
    scores = [f"{p:.2f}" if p >= 0.1 else f"{p:.2g}" for p in (explanation.original_score, explanation.perturbed_score)]
    assert f"{explanation.label}: {scores[0]} → {scores[1]}" in title
    assert saliency.collections and inputs.collections  # the mask's contour
    assert not perturbed.collections
    plt.close("all")


def test_overlay_and_widget_panels_share_the_look(explanation):
    import matplotlib.pyplot as plt

    fig = de.plot_overlay(explanation)
    (ax, *_) = fig.axes
    assert np.asarray(_map_image(ax).get_array()).max() == pytest.approx(1.0)
    assert _map_image(ax).colorbar.ax.get_ylabel() == de.IMPORTANCE_LABEL
    assert explanation.label in ax.get_title() and "→" in ax.get_title()
    assert ax.lines[0].get_label() == "center of mass"
    assert not ax.collections  # no mask, no outline
    assert de.figure_to_jpeg(de.plot_panels(explanation))[:3] == b"\xff\xd8\xff"
    plt.close("all")


def test_relative_importance_is_the_map_over_its_peak():
    np.testing.assert_allclose(de.relative_importance(np.array([[0.0, 2.0], [1.0, 4.0]])), [[0, 0.5], [0.25, 1]])
    assert (de.relative_importance(np.zeros((3, 3))) == 0).all()
    with_nan = de.relative_importance(np.array([[np.nan, 2.0], [1.0, 0.0]]))
    assert np.isnan(with_nan[0, 0]) and np.nanmax(with_nan) == 1.0


def _photo_with_spots(spots, shape=(180, 300)):
    """A black photo, ``shape`` = (height, width), with white squares of 16 px whose (row, col) centers are
    ``spots``."""
    photo = np.zeros((*shape, 3), np.uint8)
    for row, col in spots:
        photo[row - 8:row + 8, col - 8:col + 8] = 255
    return photo


def _explained_as_itself(explanation, photo, preprocessing):
    """``explanation`` with a map that is the brightness of ``photo`` as the model's input saw it (the spots'
    pixels), so that placing the map back must bring each spot back where it is in the photo."""
    x = preprocessing(photo)
    saliency = preprocessing.to_image(x).mean(axis=2).astype(np.float32)
    return de.Explanation(**{**vars(explanation), "input": x, "saliency": saliency, "preprocessing": preprocessing,
                             "center_of_mass": de.center_of_mass(saliency),
                             "mapping": preprocessing.mapping(photo)})


def _center_of(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


@pytest.mark.parametrize("preprocessing", [de.Preprocessing(), de.Preprocessing(resize=256)],
                         ids=["stretch", "crop"])
def test_saliency_at_places_the_hot_spot_where_it_is_in_a_non_square_photo(explanation, preprocessing):
    spot = (60, 210)  # (row, col) in a 180×300 photo, inside the center crop (columns 71-228)
    photo = _photo_with_spots([spot])
    e = _explained_as_itself(explanation, photo, preprocessing)
    at = e.saliency_at()
    assert at.shape == (180, 300) and at.dtype == np.float64
    row, col = _center_of(at >= 0.5 * np.nanmax(at))
    assert row == pytest.approx(spot[0] - 0.5, abs=1.5) and col == pytest.approx(spot[1] - 0.5, abs=1.5)
    # the center of mass, in the input's pixels, lands on the spot too
    com = e.mapping.point_to_original(e.center_of_mass)
    assert com == pytest.approx((spot[0] - 0.5, spot[1] - 0.5), abs=1.5)
    # other sizes: the longest side as an int keeps the aspect ratio; (height, width) as given
    half = e.saliency_at(150)
    assert half.shape == (90, 150)
    row, col = _center_of(half >= 0.5 * np.nanmax(half))
    assert row == pytest.approx(spot[0] / 2 - 0.5, abs=1.5) and col == pytest.approx(spot[1] / 2 - 0.5, abs=1.5)
    assert e.saliency_at((36, 60)).shape == (36, 60)
    before = e.saliency.copy()
    e.saliency_at(fill=0.0)
    np.testing.assert_array_equal(e.saliency, before)  # the stored map is not changed


def test_saliency_at_fills_what_the_crop_left_out(explanation):
    outside, inside = (90, 30), (90, 150)
    photo = _photo_with_spots([outside, inside])
    crop = _explained_as_itself(explanation, photo, de.Preprocessing(resize=256))
    # 180×300 → 256×426, whose center 224×224 is rows 11.25-168.75 and columns 71.1-228.9 of the photo
    assert crop.mapping.crop_in_original() == pytest.approx((11.25, 71.13, 157.5, 157.75), abs=0.01)
    at = crop.saliency_at()
    assert np.isfinite(at[12:168, 72:228]).all() and np.isnan(at[:, :70]).all() and np.isnan(at[:, 230:]).all()
    assert np.isnan(at[:10]).all() and np.isnan(at[170:]).all()
    zero = crop.saliency_at(fill=0.0)
    assert (zero[:, :70] == 0).all() and np.isfinite(zero).all()
    # the stretch used the whole photo: both spots come back, and nothing is missing
    stretch = _explained_as_itself(explanation, photo, de.Preprocessing())
    at = stretch.saliency_at()
    assert np.isfinite(at).all() and at[outside] > 0.5 and at[inside] > 0.5 and at[90, 90] < 0.1


def test_saliency_at_without_a_mapping_is_the_map_itself(explanation):
    from dataclasses import replace

    bare = replace(explanation, mapping=None)
    np.testing.assert_allclose(bare.saliency_at(), explanation.saliency, rtol=1e-6)
    with pytest.raises(ValueError, match="size"):
        bare.saliency_at(0)


@pytest.mark.parametrize("preprocessing", [de.Preprocessing(), de.Preprocessing(resize=256)],
                         ids=["stretch", "crop"])
def test_overlay_on_the_original_photo_draws_it_whole_with_the_map_in_place(explanation, preprocessing):
    import matplotlib.pyplot as plt

    spot = (60, 210)
    photo = _photo_with_spots([spot])
    e = _explained_as_itself(explanation, photo, preprocessing)
    mask = np.zeros(photo.shape[:2], bool)
    mask[52:68, 202:218] = True
    fig = de.plot_overlay(e, image=photo, mask=mask)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape[:2] == (180, 300)  # the photo, at its own aspect ratio
    heat = np.asarray(_map_image(ax).get_array())
    assert heat.shape == (180, 300) and np.nanmax(heat) == pytest.approx(1.0)
    assert np.isnan(heat[:, 0]).all() == (preprocessing.mode == "crop")
    marker = ax.lines[0]
    assert (marker.get_ydata()[0], marker.get_xdata()[0]) == pytest.approx((spot[0] - 0.5, spot[1] - 0.5), abs=1.5)
    assert ax.collections  # the mask's outline
    assert len(ax.patches) == (preprocessing.mode == "crop")  # the crop's box, dashed
    small = de.plot_overlay(e, image=photo, max_side=100).axes[0]
    assert small.images[0].get_array().shape[:2] == (60, 100)
    with pytest.raises(ValueError, match="180×300"):
        de.plot_overlay(e, image=photo[:100])
    plt.close("all")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_explain_on_cuda_matches_cpu(sample, explanation):
    e = de.explain(sample.image, "shapes", device="cuda", steps=FEW_STEPS, verbose=False)
    assert e.input.is_cuda and e.perturbed_score < e.original_score / 10
    assert e.target == explanation.target


# --------------------------------------------------------------------------- loading models

def test_torchvision_model_from_local_state_dict(tmp_path, sample):
    path = save_random_state_dict("mobilenet_v3_small", tmp_path / "random.pt")
    loaded = de.load_model("mobilenet_v3_small", device="cpu", weights_path=path)
    assert len(loaded.labels) == 1000 and loaded.labels[0] == "tench"
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    e = de.explain(sample.image, loaded, steps=2, verbose=False)
    assert e.saliency.shape == (224, 224) and 0 <= e.target < 1000


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = save_random_state_dict("mobilenet_v3_small", tmp_path / "small.pt")
    with pytest.raises(ValueError, match="do not match the 'resnet18' architecture"):
        de.load_model("resnet18", device="cpu", weights_path=path)
    with pytest.raises(ValueError, match="do not match the 'shapes' architecture"):
        de.load_model("shapes", device="cpu", weights_path=path)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        de.load_model("shapes", device="cpu", weights_path=tmp_path / "junk.pt")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg1000'"):
        de.load_model("vgg1000", device="cpu")


def test_auto_falls_back_to_shapes_offline_with_a_note(offline, capsys):
    loaded = de.load_model("auto", device="cpu")
    assert loaded.name == "shapes" and "vgg19" in loaded.note and de.OFFLINE_ENV in loaded.note
    assert loaded.note in capsys.readouterr().err
    with pytest.raises(ValueError, match="not in the torch hub cache"):
        de.load_model("vgg19", device="cpu")


def test_auto_takes_cached_pretrained_weights(offline, monkeypatch):
    monkeypatch.setattr(de, "AUTO_MODEL", "mobilenet_v3_small")
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    offline.mkdir(parents=True)
    save_random_state_dict("mobilenet_v3_small", offline / Path(url).name)
    loaded = de.load_model("auto", device="cpu")
    assert loaded.name == "mobilenet_v3_small" and loaded.note == "" and len(loaded.labels) == 1000


def test_frozen_restores_modes_and_grads():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model[1].eval()
    model[0].bias.requires_grad_(False)
    with de.frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and not model[1].training
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_unavailable_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        de.resolve_device("cuda")


# --------------------------------------------------------------------------- command line

def test_cli_writes_four_files_with_documented_keys(tmp_path, capsys):
    image = scenes.SAMPLES_DIR / f"{scenes.CLASS_NAMES[1]}.png"
    code = cli.main(["explain", str(image), "--model", "shapes", "--steps", "5", "--dilation", "10",
                    "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    stem = image.stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{stem}_explanation.png", f"{stem}_overlay.png", f"{stem}_saliency.npy", f"{stem}_summary.json"])
    summary = json.loads((tmp_path / f"{stem}_summary.json").read_text())
    for key in ("model", "target", "label", "original_score", "perturbed_score", "center_of_mass",
                "steps_run", "seconds", *de.DEFAULTS):
        assert key in summary
    assert summary["steps"] == summary["steps_run"] == 5 and summary["dilation"] == 10
    assert summary["label"] == scenes.CLASS_NAMES[1]
    saliency = np.load(tmp_path / f"{stem}_saliency.npy")
    assert saliency.shape == (224, 224) and saliency.dtype == np.float32
    assert Image.open(tmp_path / f"{stem}_explanation.png").size[0] > 500
    out, err = capsys.readouterr()
    assert "5 top classes" in out and re.search(r"^score .* \(target 'square'\), stopped at step 5 of 5",
                                                out, re.MULTILINE)
    assert "note:" not in err  # an embedded sample: no warning about photos


@pytest.mark.parametrize("args, message", [
    (["missing.png"], "image file not found"),
    (["{empty}"], "empty"),
    (["{sample}", "--model", "nonsense"], "unknown model"),
    (["{sample}", "--steps", "0"], "steps must be"),
    (["{sample}", "--lr", "-1"], "lr must be"),
    (["{sample}", "--border", "0.5"], "border must be"),
    (["{sample}", "--dilation", "0"], "dilation must be"),
    (["{sample}", "--target", "99"], "out of range"),
    (["{sample}", "--weights", "{empty}", "--model", "shapes"], "not a PyTorch weights file"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty.png").write_bytes(b"")
    sample = scenes.SAMPLES_DIR / f"{scenes.CLASS_NAMES[0]}.png"
    args = [a.format(empty=tmp_path / "empty.png", sample=sample) for a in args]
    out = tmp_path / "out"
    defaults = ["--model", "shapes", "--steps", "2", "--device", "cpu", "--out", str(out)]
    code = cli.main(["explain", *defaults, *args])  # a later option overrides its default
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_overlays_the_map_on_the_original_photo(tmp_path):
    photo = tmp_path / "wide.png"
    Image.fromarray(_photo_with_spots([(90, 150)], shape=(180, 300))).save(photo)
    big = tmp_path / "big.png"
    Image.fromarray(_photo_with_spots([(600, 1200)], shape=(1200, 2000))).save(big)
    for image in (photo, big):
        assert cli.main(["explain", str(image), "--model", "shapes", "--steps", "2", "--device", "cpu",
                         "--out", str(tmp_path / "out")]) == 0
    panels = Image.open(tmp_path / "out" / "wide_explanation.png").size
    wide, large = (Image.open(tmp_path / "out" / f"{stem}_overlay.png").size for stem in ("wide", "big"))
    assert wide[0] > wide[1] and large[0] > large[1]  # the photo's landscape shape, not the model's square
    assert large[0] < 1024 * 1.5 and panels[0] > 500  # capped near 1024 px (plus the colour bar)


def test_cli_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch, explanation):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        de.save_outputs(explanation, tmp_path, "scene")
    assert list(tmp_path.iterdir()) == []


def test_cli_takes_each_setting_with_its_declared_type(tmp_path):
    code = cli.main(["explain", "star", "--model", "shapes", "--preset", "fast", "--power", "2.5", "--steps", "3",
                     "--device", "cpu", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "star_summary.json").read_text())
    assert code == 0 and summary["power"] == 2.5 and summary["lr"] == de.FAST_PRESET["lr"]


def test_cli_process_exit_code_and_message(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "deepexplain.py"), "explain",
                          str(tmp_path / "nope.jpg"), "--model", "shapes"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == f"deepexplain: error: image file not found: {tmp_path / 'nope.jpg'}"


# --------------------------------------------------------------------------- what a user sees

@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A PNG that is not an embedded scene: noise, as far from the six shapes as a photo."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def shapes_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, de.ShapesModelWarning)]


def test_embedded_scenes_are_known_pixel_for_pixel(photo):
    sample = scenes.SAMPLES_DIR / "disk.png"
    assert scenes.is_embedded(de.read_image("star")) and scenes.is_embedded(de.load_image(sample))
    scene = scenes.make_scene(123_456)
    assert scenes.is_embedded(scene.image) and scenes.is_embedded(scenes.make_marked_scene(7).image)
    assert scenes.is_embedded(de.read_image(torch.from_numpy(scene.image).permute(2, 0, 1)))  # as a tensor
    changed = scene.image.copy()
    changed[0, 0, 0] ^= 1
    assert not scenes.is_embedded(changed) and not scenes.is_embedded(de.load_image(photo))


def test_shapes_model_warns_once_about_a_photo_and_never_about_its_scenes(shapes, photo):
    options = dict(preset="fast", steps=1, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for image in ("star", scenes.SAMPLES_DIR / "ring.png", scenes.make_scene(99).image):
            de.explain(image, shapes, **options)
        assert shapes_warnings(record) == []
        de.explain(photo, shapes, **options)
        warned = shapes_warnings(record)
        assert len(warned) == 1 and "six synthetic shapes" in str(warned[0].message)
        assert "--model vgg19" in str(warned[0].message) and "\n" not in str(warned[0].message)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's own: shown once
        for _ in range(2):
            de.explain(photo, shapes, **options)
    assert len(shapes_warnings(record)) == 1


def test_another_model_does_not_warn_about_photos(photo):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        de.explain(photo, scenes.ShapesNet(), preset="fast", steps=1, verbose=False)
    assert shapes_warnings(record) == []


def test_cli_notes_a_photo_explained_by_the_shapes_model_in_one_line(tmp_path, capsys, photo):
    code = cli.main(["explain", str(photo), "--model", "shapes", "--preset", "fast", "--steps", "1",
                     "--device", "cpu", "--out", str(tmp_path)])
    notes = [line for line in capsys.readouterr().err.splitlines() if "deepexplain: note:" in line]
    assert code == 0 and len(notes) == 1
    assert notes[0].startswith("deepexplain: note: the embedded shapes model knows only six synthetic shapes")


def with_run(e, *, steps_run, runs_converged, steps=30, **changes):
    return replace(e, steps_run=steps_run, runs_steps=(steps_run,), runs_converged=runs_converged,
                   settings=e.settings.updated(steps=steps), label="square", **changes)


def test_result_line_says_where_the_run_stopped_and_whether_it_converged(explanation):
    e = with_run(explanation, steps_run=12, runs_converged=(True,), original_score=0.98, perturbed_score=0.003)
    assert e.converged
    assert e.result_line() == "score 0.98 → 0.003 (target 'square'), stopped at step 12 of 30 (converged)"
    e = with_run(explanation, steps_run=30, runs_converged=(False,), original_score=0.69, perturbed_score=0.59,
                 removed_score=None)
    assert not e.converged and e.result_line().startswith("did not converge: score 0.69 → 0.59 (target 'square') "
                                                          "in 30 steps; try more --steps")
    at_floor = replace(e, original_score=0.98, perturbed_score=0.27, removed_score=0.26)  # the blur can do no more
    assert at_floor.result_line() == ("score 0.98 → 0.27 (target 'square'), stopped at step 30 of 30: the wholly "
                                      "blurred image still scores 0.26, so a blur cannot take the class lower; the "
                                      "map shows where blurring lowers it (--removal learned can change more than "
                                      "detail)")
    assert replace(at_floor, removed_score=0.05).result_line().startswith("did not converge")
    e = with_run(explanation, steps_run=30, runs_converged=(False,), original_score=0.9, perturbed_score=0.001)
    assert "stopped at step 30 of 30, not converged: the loss was still falling" in e.result_line()
    two = replace(e, runs_steps=(12, 30), runs_converged=(True, False))
    assert not two.converged and "2 runs stopped at steps 12, 30 of 30" in two.result_line()
    assert replace(two, runs_converged=(True, True)).converged


def test_run_converged_follows_the_stopping_rule(explanation):
    settings = de.OptimizationSettings.from_preset("fast").updated(steps=40, patience=5)
    flat, falling = np.r_[np.ones(10), np.full(30, 0.5)], np.linspace(1.0, 0.1, 40)  # flat for the last 30
    low = np.full(40, 1e-3)
    run = replace(explanation, steps_run=40, losses=flat, probabilities=low, original_score=0.9)
    assert de.run_converged(run, settings)
    assert not de.run_converged(replace(run, losses=falling), settings)
    assert de.run_converged(replace(run, losses=falling[:12], steps_run=12), settings)  # it stopped early
    seed = de.OptimizationSettings.from_preset("seed").updated(steps=40)  # patience 0: judged with the fast's 20
    assert de.run_converged(run, seed) and not de.run_converged(replace(run, losses=falling), seed)


def test_verbose_run_prints_its_result_line_and_a_bar_that_ends_where_it_stopped(capsys, shapes, sample):
    e = de.explain(sample.image, shapes, preset="masked", steps=3, runs=2)
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == e.result_line() and len(e.runs_steps) == 2
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "6/6" in last and "stopped: run 1 at step 3, run 2 at step 3 (of 3)" in last


def test_a_bar_of_its_own_says_the_run_stopped_early(capsys):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    model = RegionClassifier(square_mask(8, 8, 16, shape=(32, 32)), x)
    model.sharpness.data.fill_(1e4)  # any change wrecks class 0; a tiny lr keeps the loss flat: it stops at once
    result = de.optimize_perturbation(model, x, de.PerturbationGenerator(), 0, steps=50, lr=1e-9, patience=2)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert result.steps_run < 50
    assert f"stopped early at step {result.steps_run} of 50 (converged)" in last and "50/50" in last


def test_explain_help_names_the_presets_and_where_each_default_comes_from(capsys):
    assert cli.main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for preset, description in de.PRESET_DESCRIPTIONS.items():
        assert f"{preset}{' (the default)' * (preset == de.DEFAULT_PRESET)}: {description}" in text
    assert "= fast with --generator masked" in text and "--lr 0.1" in text
    for spec in de.SETTINGS.values():
        values = {p: spec.value_in(p) for p in de.PRESET_BASES}
        default = values.pop(de.DEFAULT_PRESET)
        if len(set(values.values()) | {default}) == 1:
            assert f"{spec.allowed()}; default: {default} (every preset)" in text
        else:
            others = "; ".join(f"{p}: {v}" for p, v in values.items())
            assert f"{spec.allowed()}; default: {default} ({de.DEFAULT_PRESET} preset); {others}" in text
