"""Real photos and real classifiers: torchvision's preprocessing, where the input lies in the photo, tie
handling of deletion/insertion, RISE, and the photo evaluation (a smoke run on ../shared/real/ when present)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import deepexplain as de
import deepexplain_cli as cli
import deepexplain_eval as ev
from helpers import RegionClassifier, square_mask

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
REAL_WEIGHTS = REAL / "mobilenet_v2_imagenet.pt"
REAL_PHOTOS = REAL / "imagenet-samples"
needs_real = pytest.mark.skipif(not (REAL_WEIGHTS.is_file() and REAL_PHOTOS.is_dir()),
                                reason="../shared/real/ (ImageNet weights and photos) is not here")


def _photo(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (232, 232)])
def test_crop_preprocessing_is_torchvisions_transform(name, shape):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    prep = de.Preprocessing.from_weights(weights)
    t = weights.transforms()
    assert (prep.resize, prep.size, prep.mean, prep.std) == (t.resize_size[0], (t.crop_size[0],) * 2,
                                                            tuple(t.mean), tuple(t.std))
    image = _photo(shape)
    expected = t(torch.from_numpy(image).permute(2, 0, 1))[None]
    assert torch.equal(prep(image), expected)
    assert prep.mode == "crop" and f"{t.resize_size[0]} px" in prep.describe()


def test_mapping_records_the_resize_and_the_center_crop():
    prep = de.Preprocessing(resize=256)
    m = prep.mapping(_photo((375, 500)))
    assert m.original == (375, 500) and m.resized == (256, 341) and m.crop == (16, 58, 224, 224)
    top, left, height, width = m.crop_in_original()
    assert height == pytest.approx(224 * 375 / 256) and left == pytest.approx(58 * 500 / 341)
    portrait = prep.mapping(_photo((500, 375)))
    assert portrait.resized == (341, 256) and portrait.crop == (58, 16, 224, 224)
    stretch = de.Preprocessing().mapping(_photo((375, 500)))
    assert stretch.resized == (224, 224) and stretch.crop == (0, 0, 224, 224)


def test_map_placed_back_on_the_photo_covers_the_crop_only():
    m = de.Preprocessing(resize=256).mapping(_photo((375, 500)))
    back = m.to_original(np.ones((224, 224)))
    assert back.shape == (375, 500)
    inside = ~np.isnan(back)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    top, left, height, width = m.crop_in_original()
    assert rows[0] == round(top) and rows[-1] + 1 == round(top + height)
    assert cols[0] == round(left) and cols[-1] + 1 == round(left + width)
    assert np.allclose(back[inside], 1.0)
    full = de.Preprocessing().mapping(_photo((375, 500))).to_original(np.ones((224, 224)), fill=0.0)
    assert np.allclose(full, 1.0)  # a stretched input covers the whole photo
    with pytest.raises(ValueError, match="2-D"):
        m.to_original(np.ones((1, 224, 224)))


def test_preprocessing_rejects_a_resize_smaller_than_the_crop_and_leaves_the_image_alone():
    with pytest.raises(ValueError, match="resize must be"):
        de.Preprocessing(resize=200)
    image = _photo((300, 400))
    before = image.copy()
    de.Preprocessing(resize=256)(image)
    assert np.array_equal(image, before)


def test_named_torchvision_models_crop_the_embedded_one_stretches(tmp_path):
    path = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    loaded = de.load_model("mobilenet_v2", device="cpu", weights_path=path)
    assert loaded.preprocessing == de.Preprocessing.from_weights(
        torchvision.models.get_model_weights("mobilenet_v2").DEFAULT)
    assert de.load_model("shapes", device="cpu").preprocessing.mode == "stretch"
    stretched = de.load_model("mobilenet_v2", device="cpu", weights_path=path, preprocessing=de.Preprocessing())
    assert stretched.preprocessing.mode == "stretch"  # the seed's way, when asked for


def test_summary_says_how_the_photo_became_the_input(shapes):
    crop = de.LoadedModel(shapes.model, de.Preprocessing(resize=240), shapes.labels, "shapes-cropped")
    image = np.ascontiguousarray(np.pad(de.read_image("star"), ((0, 0), (40, 40), (0, 0)), mode="edge"))
    result = de.explain(image, crop, preset="fast", steps=2, verbose=False)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["preprocessing"].startswith("resize the short side to 240 px, center crop 224×224")
    assert summary["mapping"] == {"original": [224, 304], "resized": [240, 325], "crop": [8, 50, 224, 224]}
    assert result.mapping.to_original(result.saliency).shape == (224, 304)
    plain = de.explain("star", shapes, preset="fast", steps=2, verbose=False).summary()
    assert plain["preprocessing"] == "stretch the whole image to 224×224"


# --------------------------------------------------------------------------- tie handling

@pytest.fixture
def region_case():
    mask = square_mask()
    x = torch.zeros(1, 3, 224, 224)
    x[..., 100:130, 100:130] = 1.0
    return RegionClassifier(mask, x).eval(), x, mask


def test_a_flat_map_cannot_win_by_luck_with_pessimistic_ties(region_case):
    model, x, _ = region_case
    flat = np.ones((224, 224))
    deletion, insertion = ev.deletion_insertion_curves(model, x, 0, flat, n_steps=10, ties="pessimistic")
    # nothing moves before 100%: deletion stays at the input's probability, insertion at the blurred one's
    assert np.allclose(deletion[:-1], deletion[0]) and np.allclose(insertion[:-1], insertion[0])
    assert deletion[-1] == pytest.approx(insertion[0]) and insertion[-1] == pytest.approx(deletion[0])
    scores = ev.faithfulness_scores(model, x, 0, flat, n_steps=10)
    assert scores["deletion_pessimistic"] == pytest.approx(deletion[0] * 0.95 + deletion[-1] * 0.05)
    # with random ties the same flat map is scored like a random map; pessimistic is never better for it
    assert scores["deletion_pessimistic"] > scores["deletion"] and scores["insertion_pessimistic"] < scores["insertion"]


def test_a_map_without_ties_scores_the_same_under_both_tie_orders(region_case):
    model, x, mask = region_case
    saliency = mask + np.random.default_rng(0).random(mask.shape) * 0.5
    scores = ev.faithfulness_scores(model, x, 0, saliency, n_steps=10)
    assert scores["deletion"] == scores["deletion_pessimistic"]
    assert scores["insertion"] == scores["insertion_pessimistic"]
    deletion, _ = ev.deletion_insertion_curves(model, x, 0, saliency, n_steps=10)
    assert scores["deletion"] == ev.curve_auc(deletion)  # the random-ties AUC is the scenes' AUC


def test_pessimistic_ties_move_a_tied_group_only_once_all_of_it_fits():
    saliency = np.array([[3.0, 2.0], [2.0, 1.0]])
    moved = ev._moved(saliency, [0, 1, 2, 3, 4], "pessimistic")
    assert [int(m.sum()) for m in moved] == [0, 1, 1, 3, 4]  # the two 2.0s move together, at count 3
    assert [int(m.sum()) for m in ev._moved(saliency, [0, 1, 2, 3, 4], "random")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ties must be one of"):
        ev._moved(saliency, [0], "optimistic")


# --------------------------------------------------------------------------- RISE

def test_rise_finds_the_region_the_model_reads_and_is_seeded(region_case):
    model, x, mask = region_case
    saliency = ev.rise(model, x, 0, n_masks=200, seed=1)
    assert saliency.shape == (224, 224) and np.isfinite(saliency).all() and saliency.min() >= 0
    # masks that keep the region keep p(target) high, so RISE weighs the region's pixels most
    assert saliency[mask].mean() > np.percentile(saliency[~mask], 90)
    assert np.array_equal(saliency, ev.rise(model, x, 0, n_masks=200, seed=1))
    with pytest.raises(ValueError, match="n_masks"):
        ev.rise(model, x, 0, n_masks=0)


# --------------------------------------------------------------------------- extremal perturbation

def test_extremal_perturbation_keeps_the_region_the_model_reads_and_is_seeded(region_case):
    model, x, mask = region_case
    saliency = ev.extremal_perturbation(model, x, 0, steps=40, seed=1)
    assert saliency.shape == (224, 224) and np.isfinite(saliency).all()
    assert saliency.min() >= 0 and saliency.max() <= 1
    # only the region raises class 0's logit, so every area's mask keeps it: the region ranks first
    assert saliency[mask].mean() > np.percentile(saliency[~mask], 90)
    assert ev.pointing_hit(saliency, mask) and ev.energy_inside(saliency, mask) > 3 * mask.mean()
    assert np.array_equal(saliency, ev.extremal_perturbation(model, x, 0, steps=40, seed=1))
    assert not model.training and model.sharpness.requires_grad  # frozen only while it ran


def test_extremal_perturbation_masks_keep_about_their_area(region_case):
    model, x, mask = region_case
    for area in (0.05, 0.2):
        kept = ev.extremal_perturbation(model, x, 0, areas=(area,), steps=40)
        assert kept.mean() == pytest.approx(area, abs=0.03)


@pytest.mark.parametrize("options, message", [(dict(areas=(0.1, 1.0)), "areas in"), (dict(areas=(0.0,)), "areas in"),
                                              (dict(areas=()), "areas in"), (dict(steps=0), "steps"),
                                              (dict(steps=2.5), "steps")])
def test_extremal_perturbation_rejects_bad_options(region_case, options, message):
    model, x, _ = region_case
    with pytest.raises(ValueError, match=message):
        ev.extremal_perturbation(model, x, 0, **options)


def test_extremal_perturbation_runs_as_a_method(shapes):
    (case,) = ev.scene_cases(shapes, [ev.FIRST_SCENE_ID])
    maps, seconds = ev.run_methods(shapes, case, ["extremal-perturbation"], steps=3)
    assert set(maps) == {"extremal-perturbation"} and seconds["extremal-perturbation"] > 0
    assert maps["extremal-perturbation"].shape == (224, 224) and np.isfinite(maps["extremal-perturbation"]).all()
    assert "extremal-perturbation" in ev.PHOTO_METHODS and "extremal-perturbation" not in ev.SCENE_METHODS


# --------------------------------------------------------------------------- photo evaluation

@pytest.fixture
def photo_folder(tmp_path):
    """Five synthetic 'photos' of different sizes, with a labels.csv listing them in an order of its own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"p{i}.png" for i in (4, 0, 3, 1, 2)]
    for i, name in enumerate(names):
        Image.fromarray(_photo((240 + 10 * i, 260), seed=i)).save(folder / name)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "index"])
        writer.writerows([name, i] for i, name in enumerate(names))
    return folder, names


def test_photo_cases_follow_the_list_and_the_split(shapes, photo_folder):
    folder, names = photo_folder
    assert ev.photo_files(folder) == names
    odd = ev.photo_cases(shapes, folder, split="odd")
    assert [c.scene_id for c in odd] == [1, 3] and [c.name for c in odd] == [names[1], names[3]]
    even = ev.photo_cases(shapes, folder, split="even", first=1, limit=1)
    assert [c.scene_id for c in even] == [2]
    assert [c.scene_id for c in ev.photo_cases(shapes, folder, first=1, every=2)] == [1, 3]
    case = even[0]
    assert case.mask is None and case.x.shape == (1, 3, 224, 224) and 0 <= case.target < 10
    (folder / "labels.csv").unlink()
    assert ev.photo_files(folder) == sorted(names)
    for kwargs, message in ((dict(split="train"), "split must be"), (dict(first=-1), "first must be"),
                            (dict(limit=0), "limit must be"), (dict(every=0), "every must be"),
                            (dict(first=9), "no photo left")):
        with pytest.raises(ValueError, match=message):
            ev.photo_cases(shapes, folder, **kwargs)
    with pytest.raises(ValueError, match="not a folder"):
        ev.photo_files(folder / "p0.png")


def test_evaluate_photos_writes_numbers_only(shapes, photo_folder, tmp_path):
    folder, _ = photo_folder
    result = ev.evaluate_photos(folder, shapes, ["random", "center", "grad-cam", "rise"], limit=2, steps=20,
                                sanity_images=1, curve_steps=10, progress=False)
    assert len(result.scores) == 2 * 4
    assert all(set(ev.PHOTO_METRICS) <= set(r) and 0 <= r["deletion"] <= 1 for r in result.scores)
    out = tmp_path / "report"
    paths = ev.write_report(result, out, command="python deepexplain.py evaluate --images photos")
    assert sorted(p.name for p in paths) == ["evaluation.csv", "evaluation.md", "sanity.csv", "scores.csv"]
    assert ev.read_scores(out) == result.scores
    report = (out / "evaluation.md").read_text()
    assert "pessimistic ties" in report and "| grad-cam | 2 |" in report and "Sanity check" in report
    table = ev.comparison_table(result.scores, "grad-cam", ["random"], photos=True)
    assert "| grad-cam − random | 2 |" in table


def test_cli_evaluate_photos(shapes, photo_folder, tmp_path, capsys):
    folder, _ = photo_folder
    code = cli.main(["evaluate", "--images", str(folder), "--model", "shapes", "--methods", "random", "grad-cam",
                     "--split", "even", "--limit", "1", "--sanity-scenes", "0", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "| grad-cam | 1 |" in capsys.readouterr().out
    assert cli.main(["evaluate", "--images", str(folder), "--first", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepexplain: error:") and "first must be" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


@needs_real
def test_real_photo_evaluation_smoke(tmp_path):
    """Two held-out photos on the real ImageNet model: every map scored, the sanity check run, no pixels written."""
    result = ev.evaluate_photos(REAL_PHOTOS, "mobilenet_v2", ["grad-cam", "rise", "ours-masked"],
                                weights_path=REAL_WEIGHTS, split=ev.REPORT_SPLIT, limit=2, steps=3,
                                sanity_images=1, curve_steps=10, device="cpu", progress=False)
    assert {r["method"] for r in result.scores} == {"grad-cam", "rise", "ours-masked"}
    assert len(result.scores) == 6 and all(0 <= r["insertion"] <= 1 for r in result.scores)
    assert result.settings["preprocessing"].startswith("resize the short side to")
    assert {r["level"] for r in result.sanity} and all(-1 <= r["spearman"] <= 1 for r in result.sanity
                                                       if not np.isnan(r["spearman"]))
    paths = ev.write_report(result, tmp_path)
    assert all(p.suffix in (".md", ".csv") for p in paths)


def test_photo_maps_figure_has_a_row_per_photo_and_a_map_per_method(shapes, images):
    fig = ev.plot_photo_maps(shapes, {"star": images[0], "disk": images[1]}, ["center", "grad-cam"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == ["star: star 0.98", "center", "grad-cam"] and titles[3].startswith("disk: disk ")
    colour_bars = [ax for ax in fig.axes if ax.get_ylabel() == de.IMPORTANCE_LABEL]
    assert len(colour_bars) == 4  # one per map
