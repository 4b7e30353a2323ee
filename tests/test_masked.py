"""The masked generator (generator="masked", preset "masked"): shapes, ranges, and that its map finds
the one region a classifier depends on."""

import re

import numpy as np
import pytest
import torch

import deepexplain as de
import deepexplain_eval as ev
import deepexplain_scenes as scenes
from helpers import AllRegionsClassifier, RegionClassifier, square_mask

SIZE = scenes.SCENE_SIZE
#: The region the toy classifier reads: rows 30..79, cols 130..179 (away from the center and the border).
REGION = square_mask(top=30, left=130, size=50)


def textured_scene(scene_id: int = 30_000_000) -> np.ndarray:
    """A scene with fine noise added everywhere (H×W×3 uint8): blurring any region of it, the default's
    removal, changes its pixels, as it does a photo's."""
    noise = np.random.default_rng(0).integers(-60, 61, (SIZE, SIZE, 3))
    return np.clip(scenes.make_scene(scene_id).image + noise, 0, 255).astype(np.uint8)


def test_masked_generator_shapes_and_ranges():
    torch.manual_seed(0)
    generator = de.MaskedPerturbationGenerator(mask_size=7, copies=2)
    with torch.no_grad():
        generator.logits.normal_(0, 3)  # a mask far from its initial 0.5
    x = torch.randn(2, 3, 40, 48)
    out = generator(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    for image, perturbed in zip(x, out):  # a blend of x and G(x), both within x's range
        assert image.min() - 1e-5 <= perturbed.min() and perturbed.max() <= image.max() + 1e-5
    mask = generator.mask((40, 48))
    assert mask.shape == (2, 1, 40, 48) and 0 <= mask.min() and mask.max() <= 1
    penalty = generator.penalty()
    assert penalty.shape == (2,) and (penalty > 0).all()
    assert generator.logits.shape == (2, 1, 7, 7)
    with pytest.raises(ValueError, match="mask_size"):
        de.MaskedPerturbationGenerator(mask_size=1)


def test_mask_zero_keeps_the_image_and_one_replaces_it():
    generator = de.MaskedPerturbationGenerator(mask_size=4)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        generator.logits.fill_(-30.0)
        torch.testing.assert_close(generator(x), x)
        generator.logits.fill_(30.0)
        torch.testing.assert_close(generator(x), de.PerturbationGenerator.forward(generator, x))


def test_seed_generator_has_no_mask_and_no_penalty():
    generator = de.PerturbationGenerator(copies=3)
    assert generator.mask((8, 8)) is None
    assert generator.penalty().tolist() == [0.0, 0.0, 0.0]


def test_stacked_masked_generator_keeps_each_copys_mask():
    torch.manual_seed(0)
    singles = [de.MaskedPerturbationGenerator(mask_size=5) for _ in range(3)]
    for i, single in enumerate(singles):
        with torch.no_grad():
            single.logits.fill_(i - 1.0)
    stacked = de.MaskedPerturbationGenerator.stack(singles)
    assert isinstance(stacked, de.MaskedPerturbationGenerator) and stacked.logits.shape == (3, 1, 5, 5)
    x = torch.randn(3, 3, 20, 20)
    expected = torch.cat([g(x[i:i + 1]) for i, g in enumerate(singles)])
    torch.testing.assert_close(stacked(x), expected, atol=1e-5, rtol=1e-5)


def test_mask_stays_in_unit_range_under_a_huge_learning_rate(shapes):
    result = de.explain("star", shapes, preset="masked", lr=50.0, steps=15, patience=0, verbose=False)
    assert result.mask.shape == (1, 1, SIZE, SIZE)
    assert 0 <= result.mask.min() and result.mask.max() <= 1
    assert np.isfinite(result.saliency).all() and 0 <= result.saliency.min() and result.saliency.max() <= 1


def test_masked_map_is_the_mask_and_keeps_the_seed_path_separate(shapes):
    masked = de.explain("disk", shapes, preset="masked", steps=20, verbose=False)
    # no crop, no dilation: the map is the (combined) mask, smoothed and raised to the power
    hp = masked.hyperparameters
    expected = de.smooth(masked.mask[0, 0].double().numpy(), hp["smoothing"]) ** hp["power"]
    np.testing.assert_allclose(masked.saliency, expected, rtol=1e-5, atol=1e-9)
    assert hp["smoothing"] > 0 and hp["border"] == 0 and hp["dilation"] == 1
    assert masked.hyperparameters["generator"] == "masked" and masked.hyperparameters["jitter"] > 0
    seed = de.explain("disk", shapes, preset="seed", steps=5, verbose=False)
    assert seed.mask is None and seed.hyperparameters["generator"] == "plain"


def test_batched_masked_explanations_equal_separate_runs(shapes, images):
    # ring and disk stop after 6 steps, star runs on: its copy's mask logits must survive the compaction.
    # lr 0.01 in fp32, as the optimization amplifies rounding differences fast at the preset's lr 0.1
    options = dict(preset="masked", steps=20, patience=3, lr=0.01, precision="fp32", verbose=False)
    separate = [de.explain(image, shapes, **options) for image in images]
    batched = de.explain_batch(images, shapes, **options)
    assert len({e.steps_run for e in separate}) > 1
    for one, many in zip(separate, batched):
        assert many.steps_run == one.steps_run
        torch.testing.assert_close(many.mask, one.mask, atol=5e-3, rtol=0)
        np.testing.assert_allclose(many.losses, one.losses, atol=1e-2)


@pytest.mark.parametrize("bad, message", [({"generator": "unet"}, "generator must be one of plain, masked"),
                                          ({"mask_size": 1}, "mask_size must be an integer in [2, 512]"),
                                          ({"tv_coeff": -1.0}, "tv_coeff must be a number in [0, inf)"),
                                          ({"preserve_coeff": -0.5}, "preserve_coeff must be a number in [0, inf)"),
                                          ({"removal": "noise"}, "removal must be one of learned, blur"),
                                          ({"jitter": -2}, "jitter must be an integer in [0, 1000]"),
                                          ({"runs": 2, "generator": "plain"}, "runs must be 1 with the 'plain'")])
def test_masked_hyperparameters_are_checked(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        de.resolve_hyperparameters("masked", **bad)


def test_masked_map_points_at_the_only_region_the_classifier_reads(shapes):
    image = textured_scene()
    x = scenes.normalize(image[None])
    model = RegionClassifier(REGION, x)
    loaded = de.LoadedModel(model, shapes.preprocessing, ["region", "other"], "toy")
    assert de.class_probabilities(model, x)[0, 0] > 0.95
    result = de.explain(image, loaded, preset="masked", target=0, verbose=False)
    assert result.perturbed_score < 0.5
    wholly_blurred = de.class_probabilities(model, de.blurred(result.input))[0, 0]
    assert result.removed_score == pytest.approx(float(wholly_blurred)) and result.summary()["removed_score"] < 0.5
    assert ev.pointing_hit(result.saliency, REGION, tolerance=0)
    assert ev.com_hit(result.saliency, REGION, tolerance=0)
    assert ev.energy_inside(result.saliency, REGION) > 0.5


def test_perturb_adds_the_preserved_image_only_with_a_preservation_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 20)
    plain = de.MaskedPerturbationGenerator(mask_size=4, copies=2)
    perturbed, kept = plain.perturb(x)
    assert kept is None
    torch.testing.assert_close(perturbed, plain(x))
    torch.manual_seed(0)
    preserving = de.MaskedPerturbationGenerator(mask_size=4, copies=2, preserve_coeff=1.5)
    with torch.no_grad():
        preserving.logits.normal_(0, 2)
    assert preserving.from_settings(preserving.settings, copies=2).preserve_coeff == 1.5
    perturbed, kept = preserving.perturb(x)
    m, g = preserving.mask((16, 20)), de.PerturbationGenerator.forward(preserving, x)
    torch.testing.assert_close(perturbed, preserving(x))
    torch.testing.assert_close(kept, m * x + (1 - m) * g)  # perturbed outside the mask, the original inside
    kept.sum().backward()  # G's output is detached there: only the mask learns from the preservation game
    assert preserving.conv.weight.grad is None and preserving.logits.grad.abs().sum() > 0
    assert de.PerturbationGenerator().perturb(x[:1])[1] is None  # the seed's generator: deletion only


def test_blur_removal_puts_the_blurred_image_under_the_mask_and_only_the_mask_learns():
    torch.manual_seed(0)
    generator = de.MaskedPerturbationGenerator(mask_size=4, copies=2, preserve_coeff=1.0, removal="blur")
    assert generator.from_settings(generator.settings, copies=2).removal == "blur"
    with torch.no_grad():
        generator.logits.normal_(0, 2)
    for x in (torch.randn(2, 3, 48, 40), torch.randn(2, 3, 48, 40)):  # a new image is blurred anew
        m, background = generator.mask((48, 40)), de.blurred(x)
        perturbed, kept = generator.perturb(x)
        torch.testing.assert_close(perturbed, m * background + (1 - m) * x)
        torch.testing.assert_close(kept, m * x + (1 - m) * background)
        torch.testing.assert_close(generator(x), perturbed)
    (perturbed.sum() + kept.sum()).backward()
    assert generator.conv.weight.grad is None and generator.logits.grad.abs().sum() > 0
    with torch.no_grad():
        x = torch.randn(2, 3, 48, 40)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generator(x)  # the blur of a bf16 step is not the one full precision gets afterwards
        torch.testing.assert_close(generator(x), m * de.blurred(x) + (1 - m) * x)


def test_preservation_makes_the_mask_cover_every_region_the_class_needs(shapes):
    # The class needs both squares intact: deleting one is enough, so the deletion game alone
    # keeps the mask on one of them; preserving the class needs the mask on both. (The learned removal: the
    # games are under test, and it changes these flat squares enough to delete the class; blurring them barely does.)
    first, second = square_mask(top=30, left=30, size=50), square_mask(top=140, left=140, size=50)
    image = scenes.make_scene(30_000_000).image
    x = scenes.normalize(image[None])
    loaded = de.LoadedModel(AllRegionsClassifier([first, second], x), shapes.preprocessing, ["both", "other"], "toy")
    assert de.class_probabilities(loaded.model, x)[0, 0] > 0.95
    covered = {}
    for weight in (0.0, 1.0):
        mask = de.explain(image, loaded, preset="masked", target=0, runs=1, preserve_coeff=weight,
                          removal="learned", verbose=False).mask[0, 0].numpy()
        covered[weight] = sorted(float(mask[region].mean()) for region in (first, second))
    assert covered[0.0][0] < 0.2 and covered[0.0][1] > 0.2
    assert covered[1.0][0] > 0.6
