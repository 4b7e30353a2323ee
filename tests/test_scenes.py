"""Tests of the synthetic scenes and the bundled ShapesNet classifier."""

import numpy as np
import pytest
import torch

import deepexplain_scenes as ds

K = len(ds.CLASS_NAMES)
LOW, HIGH = ds.MARGIN, ds.SCENE_SIZE - 1 - ds.MARGIN


@pytest.fixture(scope="module")
def batch():
    return ds.scene_batch(range(300))


@pytest.fixture(scope="module")
def model():
    return ds.load_shapes_model()


def test_scene_types_and_ranges():
    scene = ds.make_scene(123)
    assert scene.image.shape == (224, 224, 3) and scene.image.dtype == np.uint8
    assert scene.mask.shape == (224, 224) and scene.mask.dtype == bool
    assert 0 <= scene.label < K and scene.name == ds.CLASS_NAMES[scene.label]
    assert scene.image.std() > 20  # not blank


def test_deterministic_per_seed():
    a, b, c = ds.make_scene(7), ds.make_scene(7), ds.make_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.mask, c.mask)


def test_label_argument_changes_only_the_object():
    scenes = [ds.make_scene(5, label=k) for k in range(K)]
    assert [s.label for s in scenes] == list(range(K))
    assert [s.name for s in scenes] == list(ds.CLASS_NAMES)
    outside = ~np.any([s.mask for s in scenes], axis=0)
    for s in scenes[1:]:
        assert np.array_equal(s.image[outside], scenes[0].image[outside])
        assert not np.array_equal(s.mask, scenes[0].mask)


def test_masks_nonempty_and_inside_central_window(batch):
    _, masks, _ = batch
    assert masks.sum(axis=(1, 2)).min() > 500
    assert not masks[:, :LOW].any() and not masks[:, HIGH + 1:].any()
    assert not masks[:, :, :LOW].any() and not masks[:, :, HIGH + 1:].any()


def test_object_sizes(batch):
    _, masks, _ = batch
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    extent = np.maximum(rows.sum(axis=1), cols.sum(axis=1))  # bounding box's longest side
    assert extent.min() >= 38 and extent.max() <= ds.SIZE_RANGE[1] + 1
    assert extent.max() - extent.min() > 40  # sizes really vary


def test_class_balance(batch):
    counts = np.bincount(batch[2], minlength=K)
    assert counts.min() >= 30 and counts.max() <= 70, counts


def test_background_colour_independent_of_class(batch):
    images, masks, labels = batch
    outside = ~masks[..., None]
    per_scene = (images * outside).sum(axis=(1, 2)) / outside.sum(axis=(1, 2))  # (N, 3) mean RGB
    per_class = np.array([per_scene[labels == k].mean(axis=0) for k in range(K)])
    assert np.abs(per_class - per_scene.mean(axis=0)).max() < 20


def test_normalize():
    pixel = np.round(np.array(ds.MEAN) * 255).astype(np.uint8)
    x = ds.normalize(np.broadcast_to(pixel, (224, 224, 3)))
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert x.abs().max() < 0.01
    assert ds.normalize(np.zeros((2, 224, 224, 3), np.uint8)).shape == (2, 3, 224, 224)


def test_shapesnet_size_and_output():
    net = ds.ShapesNet()
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    assert isinstance(net.features[-1], torch.nn.ReLU)
    assert isinstance(net.classifier, torch.nn.Linear)
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, K)


def test_trained_model_accuracy(model):
    assert not model.training
    assert ds.accuracy(model, n_scenes=200) >= 0.95


def test_missing_weights_raise(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ds.load_shapes_model(missing)


def test_samples_round_trip(tmp_path):
    ds.save_samples(tmp_path)
    for label, name in enumerate(ds.CLASS_NAMES):
        expected = ds.make_scene(ds.SAMPLE_FIRST_SEED + label, label=label)
        for folder in (tmp_path, ds.SAMPLES_DIR):  # freshly written and shipped samples
            scene = ds.load_sample(name, folder)
            assert scene.image.dtype == np.uint8 and scene.image.shape == (224, 224, 3)
            assert scene.mask.dtype == bool and scene.mask.shape == (224, 224)
            assert np.array_equal(scene.image, expected.image) and np.array_equal(scene.mask, expected.mask)
            assert (scene.label, scene.name) == (label, name)


def test_samples_classified_confidently(model):
    images = np.stack([ds.load_sample(name).image for name in ds.CLASS_NAMES])
    with torch.no_grad():
        probs = model(ds.normalize(images)).softmax(dim=1)
    assert probs.argmax(dim=1).tolist() == list(range(K))
    assert probs.max(dim=1).values.min() > 0.9
