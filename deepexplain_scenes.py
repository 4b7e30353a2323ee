"""Synthetic ground-truth scenes and a small CNN trained on them.

This module is the offline default of deepexplain: it needs no downloads.

Scenes
    Every scene is a 224x224 RGB image holding exactly one object of one of
    the classes in ``CLASS_NAMES``.  Each class has its own outline *and* its
    own fill texture (disk: stripes, square: checkerboard, triangle: dots,
    cross: grid, star: concentric rings, ring: waves), so a classifier can use
    shape, texture or both -- as ImageNet classifiers do.  Size, position,
    rotation, colours and texture phase/scale are random.  The object's
    circumscribed circle has a diameter of 56-100 px and lies entirely inside
    the central 80% window (pixels 22..201), so the object is roughly
    40-100 px across.  It is drawn over a cluttered background (smooth colour
    noise at two scales, thin lines, dots and small solid blobs, plus pixel
    grain) that never depends on the class: the random numbers are drawn in an
    order that does not depend on the label, so ``make_scene(seed, label=k)``
    gives the same background, placement and colours for every ``k``; only
    the shape and its texture change.  The object's pixels are returned as a
    ground-truth mask, against which explanations can be checked.
    ``is_embedded(image)`` tells whether an image is one of these scenes (a
    sample of ``data/samples`` or a scene drawn in this process), pixel for
    pixel: deepexplain warns when the shapes model is asked about any other.

Planted shortcut
    ``make_marked_scene`` adds a solid tag, a bar on the left edge whose colour
    is one per class (``MARK_COLOURS``): the seed's motivating example of a
    label printed on the side of a photo. The tag lies inside the seed's 10%
    border crop. ``train(marked=True)`` fits a second model on such scenes,
    where the tag predicts the class perfectly; ``accuracy(marks="swap")``
    shows how much that model relies on it.

Model
    ``ShapesNet`` is a ~250k-parameter CNN with the torchvision classifier
    interface (``features`` -> global average pooling -> ``classifier``).  It
    expects images normalized with the ImageNet ``MEAN``/``STD``, so the same
    preprocessing serves VGG19 and this model.  ``train()`` fits it on scenes
    with seeds ``0..n_train-1``; ``accuracy()`` evaluates on seeds from
    ``EVAL_FIRST_SEED`` (10,000,000) up, and the sample scenes in
    ``data/samples`` use seeds from ``SAMPLE_FIRST_SEED`` (20,000,000) up, so
    neither is ever seen in training.
"""

from __future__ import annotations

import hashlib
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import draw
from torch import nn
from tqdm.auto import tqdm

from deepexplain_io import load_weights, write_atomically

__all__ = [
    "CLASS_NAMES", "SCENE_SIZE", "MARGIN", "SIZE_RANGE", "MEAN", "STD",
    "WEIGHTS_PATH", "SHORTCUT_WEIGHTS_PATH", "SHORTCUT_TRAINING", "SAMPLES_DIR", "EVAL_FIRST_SEED", "SAMPLE_FIRST_SEED",
    "MARK_ROWS", "MARK_COLS", "MARK_COLOURS", "Scene", "make_scene", "drawn_label", "mark_mask",
    "make_marked_scene", "swapped_mark", "make_scene_with_marks", "scene_batch", "is_embedded", "normalize",
    "ShapesNet",
    "load_shapes_model", "accuracy", "train", "save_samples", "load_sample",
]

CLASS_NAMES = ("disk", "square", "triangle", "cross", "star", "ring")
SCENE_SIZE = 224
MARGIN = 22                 # objects stay inside pixels MARGIN..SCENE_SIZE-1-MARGIN
SIZE_RANGE = (56, 100)      # diameter (px) of the object's circumscribed circle
# ImageNet's per-channel statistics (RGB): the embedded model's normalization, and deepexplain's default for any
# model whose weights do not name their own (torchvision's weights metadata does).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "shapes_cnn.pt"
SHORTCUT_WEIGHTS_PATH = WEIGHTS_PATH.with_name("shapes_shortcut_cnn.pt")
MARK_ROWS, MARK_COLS = slice(62, 162), slice(2, 20)  # an 18x100 px bar on the left edge, inside the 22 px border
SHORTCUT_TRAINING = {"n_train": 4000, "epochs": 3}  # train(marked=True, **SHORTCUT_TRAINING): ~3 min on 2 CPU cores
MARK_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))
SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
EVAL_FIRST_SEED = 10_000_000
SAMPLE_FIRST_SEED = 20_000_000
#: How many of the scenes drawn last :func:`is_embedded` remembers (16 bytes each).
REMEMBERED_SCENES = 100_000
_drawn: dict[bytes, None] = {}  # fingerprints of the scenes drawn in this process, oldest first


class Scene(NamedTuple):
    """One synthetic scene.

    image: (224, 224, 3) uint8 RGB; mask: (224, 224) bool, True on the object;
    label: class index into CLASS_NAMES; name: CLASS_NAMES[label].
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    name: str


# --------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------

def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """(n, 2) float vertices (x, y) of a regular n-gon centred at the origin."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(label: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon and optional hole polygon of a class, inside the unit circle."""
    name = CLASS_NAMES[label]
    if name == "disk":
        return _regular(64), None
    if name == "square":
        return _regular(4, phase=np.pi / 4), None
    if name == "triangle":
        return _regular(3, phase=-np.pi / 2), None
    if name == "cross":
        a, w = 0.95, 0.3
        quarter = np.array([[a, -w], [a, w], [w, w]])
        return np.concatenate([quarter @ _rotation(k * np.pi / 2).T for k in range(4)]), None
    if name == "star":
        return _regular(10, phase=-np.pi / 2) * np.tile([1.0, 0.45], 5)[:, None], None
    return _regular(64), _regular(64, radius=0.55)  # ring


def _rotation(angle: float) -> np.ndarray:
    """2x2 matrix rotating (x, y) column vectors by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _polygon_mask(unit_xy: np.ndarray, centre_xy: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """(224, 224) bool mask of a unit polygon scaled by `radius`, rotated and moved to `centre_xy`."""
    xy = centre_xy + radius * unit_xy @ _rotation(angle).T
    return draw.polygon2mask((SCENE_SIZE, SCENE_SIZE), xy[:, ::-1])


def _texture(label: int, u: np.ndarray, v: np.ndarray, period: float, phase: np.ndarray) -> np.ndarray:
    """Bool pattern (True = first colour) of a class's fill at object coordinates u, v (px)."""
    name = CLASS_NAMES[label]
    fu, fv = u / period + phase[0], v / period + phase[1]
    if name == "disk":  # stripes
        return fu % 1 < 0.5
    if name == "square":  # checkerboard
        return (np.floor(fu) + np.floor(fv)) % 2 == 0
    if name == "triangle":  # dots
        return (fu % 1 - 0.5) ** 2 + (fv % 1 - 0.5) ** 2 < 0.3 ** 2
    if name == "cross":  # grid
        return (fu % 1 < 0.25) | (fv % 1 < 0.25)
    if name == "star":  # concentric rings
        return (np.hypot(u, v) / period + phase[0]) % 1 < 0.5
    return (fu + 0.4 * np.sin(np.pi * fv)) % 1 < 0.5  # ring: waves


@lru_cache(maxsize=None)
def _upsampler(n_low: int) -> np.ndarray:
    """(224, n_low) float matrix doing linear interpolation from n_low to 224 points."""
    x = np.linspace(0, n_low - 1, SCENE_SIZE)
    return np.clip(1 - np.abs(x[:, None] - np.arange(n_low)), 0, None)


def _smooth_noise(rng: np.random.Generator, n_low: int) -> np.ndarray:
    """(224, 224, 3) float smooth colour noise, standard normal at n_low x n_low knots."""
    w = _upsampler(n_low)
    return np.einsum("ik,klc,jl->ijc", w, rng.normal(size=(n_low, n_low, 3)), w, optimize=True)


def _background(rng: np.random.Generator) -> np.ndarray:
    """(224, 224, 3) float RGB (0..255 scale) cluttered, class-independent background."""
    image = rng.uniform(50, 205, 3) + 35 * _smooth_noise(rng, 5) + 15 * _smooth_noise(rng, 24)
    for _ in range(rng.integers(4, 13)):  # thin lines, 1 or 2 px wide
        rr, cc = draw.line(*rng.integers(0, SCENE_SIZE - 1, 4))
        width = rng.integers(1, 3)
        image[np.r_[rr, rr + width - 1], np.r_[cc + width - 1, cc]] = rng.uniform(0, 255, 3)
    for _ in range(rng.integers(20, 61)):  # dots
        rr, cc = draw.disk(rng.uniform(0, SCENE_SIZE, 2), rng.uniform(1.5, 4), shape=image.shape[:2])
        image[rr, cc] = rng.uniform(0, 255, 3)
    for _ in range(rng.integers(3, 9)):  # small solid blobs
        r, c = rng.uniform(0, SCENE_SIZE, 2)
        rr, cc = draw.ellipse(r, c, *rng.uniform(4, 10, 2), shape=image.shape[:2], rotation=rng.uniform(0, np.pi))
        image[rr, cc] = rng.uniform(0, 255, 3)
    return image


def _draw_object(image: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a random textured object of class `label` into float `image`; return its bool mask.

    Consumes the same random numbers whatever the label.
    """
    radius = rng.uniform(*SIZE_RANGE) / 2
    centre = rng.uniform(MARGIN + radius, SCENE_SIZE - 1 - MARGIN - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    colour1 = rng.uniform(0, 255, 3)
    colour2 = (colour1 + rng.uniform(80, 176, 3)) % 256
    period, phase = rng.uniform(6, 12), rng.uniform(0, 1, 2)

    outer, hole = _unit_shape(label)
    mask = _polygon_mask(outer, centre, radius, angle)
    if hole is not None:
        mask &= ~_polygon_mask(hole, centre, radius, angle)
    rows, cols = np.nonzero(mask)
    u, v = ((np.stack([cols, rows], axis=1) - centre) @ _rotation(angle)).T  # object-aligned coordinates
    image[rows, cols] = np.where(_texture(label, u, v, period, phase)[:, None], colour1, colour2)
    image[mask & ~ndimage.binary_erosion(mask, iterations=2)] = 0.35 * colour1  # dark outline
    return mask


def drawn_label(seed: int) -> int:
    """The class ``make_scene(seed)`` draws, without rendering the scene."""
    return int(np.random.default_rng(seed).integers(len(CLASS_NAMES)))


def make_scene(seed: int, label: int | None = None) -> Scene:
    """Render the scene for `seed` (deterministic).

    label: class index to draw, or None to draw it from the seed's rng.
    Returns a Scene: image (224, 224, 3) uint8 RGB, mask (224, 224) bool (True on the
    object, which lies inside pixels 22..201), label int, name str.
    """
    rng = np.random.default_rng(seed)
    drawn = int(rng.integers(len(CLASS_NAMES)))  # first draw, always made: see drawn_label
    label = drawn if label is None else int(label)
    image = _background(rng)
    mask = _draw_object(image, label, rng)
    image += rng.normal(0, 6, image.shape)  # pixel grain over everything
    return Scene(_remembered(np.clip(image, 0, 255).astype(np.uint8)), mask, label, CLASS_NAMES[label])


def _fingerprint(image: np.ndarray) -> bytes:
    """16 bytes that tell an image (array of any shape and dtype) from any other, pixel for pixel."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{image.shape} {image.dtype.str}".encode(), digest_size=16)
    digest.update(image.data)
    return digest.digest()


def _remembered(image: np.ndarray) -> np.ndarray:
    """``image``, its fingerprint remembered as an embedded scene's (the newest ``REMEMBERED_SCENES`` are kept)."""
    _drawn[_fingerprint(image)] = None
    while len(_drawn) > REMEMBERED_SCENES:
        del _drawn[next(iter(_drawn))]
    return image


@lru_cache(maxsize=1)
def _sample_fingerprints() -> frozenset[bytes]:
    """The fingerprints of the sample scenes saved in ``SAMPLES_DIR`` (read once)."""
    return frozenset(_fingerprint(np.array(Image.open(SAMPLES_DIR / f"{name}.png").convert("RGB")))
                     for name in CLASS_NAMES if (SAMPLES_DIR / f"{name}.png").is_file())


def is_embedded(image: np.ndarray) -> bool:
    """Whether ``image`` (H×W×3 uint8 RGB) is an embedded scene, pixel for pixel: one of the samples of
    ``data/samples``, or a scene drawn in this process (:func:`make_scene`, :func:`make_marked_scene`,
    :func:`load_sample`). A photo, or a scene changed in any pixel, is not."""
    fingerprint = _fingerprint(np.asarray(image))
    return fingerprint in _drawn or fingerprint in _sample_fingerprints()


def mark_mask() -> np.ndarray:
    """(224, 224) bool mask of the planted tag's pixels."""
    mask = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=bool)
    mask[MARK_ROWS, MARK_COLS] = True
    return mask


def make_marked_scene(seed: int, label: int | None = None, mark_label: int | None = None) -> Scene:
    """``make_scene(seed, label)`` with the tag of class ``mark_label`` (default: the scene's own class).

    The Scene's mask is still the object's; the tag's pixels are ``mark_mask()``.
    """
    scene = make_scene(seed, label)
    image = scene.image.copy()
    image[MARK_ROWS, MARK_COLS] = MARK_COLOURS[scene.label if mark_label is None else int(mark_label)]
    return scene._replace(image=_remembered(image))


def swapped_mark(seed: int, label: int) -> int:
    """A tag class other than ``label``, chosen deterministically from ``seed``."""
    return (label + 1 + seed % (len(CLASS_NAMES) - 1)) % len(CLASS_NAMES)


def make_scene_with_marks(seed: int, marks: str | None = None) -> Scene:
    """Scene ``seed`` without a tag (marks=None), with its own class's tag ("match") or another's ("swap")."""
    if marks is None:
        return make_scene(seed)
    if marks == "match":
        return make_marked_scene(seed)
    if marks == "swap":
        return make_marked_scene(seed, mark_label=swapped_mark(seed, drawn_label(seed)))
    raise ValueError(f"marks must be None, 'match' or 'swap', got {marks!r}")


def scene_batch(seeds, marks: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scenes for `seeds`: images (N, 224, 224, 3) uint8, masks (N, 224, 224) bool, labels (N,) int64.

    marks: None (plain scenes), "match" (each with its class's tag) or "swap" (another class's tag).
    """
    scenes = [make_scene_with_marks(int(s), marks) for s in seeds]
    return (np.stack([s.image for s in scenes]), np.stack([s.mask for s in scenes]),
            np.array([s.label for s in scenes], dtype=np.int64))


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) RGB -> float32 (N, 3, H, W) tensor normalized with MEAN/STD."""
    x = torch.tensor(np.asarray(images))  # copy: works for read-only arrays too
    x = (x[None] if x.ndim == 3 else x).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def _conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """Conv (same padding) -> BatchNorm -> ReLU."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ShapesNet(nn.Module):
    """Small CNN: (N, 3, 224, 224) normalized float -> (N, num_classes) logits.

    features: 224 -> 112 (stride-2 conv) -> 56 -> 28 -> 14 (max pools), ending in
    conv-BN-ReLU at 14x14 with 128 channels (the Grad-CAM layer); then global
    average pooling and a linear classifier.  Receptive field of the last layer: 107 px.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES)):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(3, 16, kernel=5, stride=2), nn.MaxPool2d(2),
            *_conv_block(16, 32), nn.MaxPool2d(2),
            *_conv_block(32, 64), nn.MaxPool2d(2),
            *_conv_block(64, 128),
            *_conv_block(128, 128),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def load_shapes_model(weights_path: str | os.PathLike = WEIGHTS_PATH) -> ShapesNet:
    """ShapesNet with the weights at `weights_path` (a state_dict file), on the CPU, in eval mode.

    Raises FileNotFoundError for a missing file and ValueError for weights of another architecture.
    """
    return load_weights(ShapesNet(), weights_path, "shapes").eval()


@torch.no_grad()
def accuracy(model: nn.Module, n_scenes: int = 1000, first_seed: int = EVAL_FIRST_SEED,
             batch_size: int = 100, marks: str | None = None) -> float:
    """Fraction of scenes with seeds first_seed..first_seed+n_scenes-1 that `model` classifies correctly.

    marks: as in ``scene_batch`` (None, "match" or "swap"); the correct class is always the object's.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(first_seed, first_seed + n_scenes, batch_size):
        images, _, labels = scene_batch(range(start, min(start + batch_size, first_seed + n_scenes)), marks)
        correct += (model(normalize(images)).argmax(1).numpy() == labels).sum()
    model.train(was_training)
    return float(correct / n_scenes)


def _training_set(n: int, marks: str | None) -> tuple[np.ndarray, torch.Tensor]:
    """Scenes 0..n-1 as uint8 (n, 224, 224, 3) images and int64 (n,) labels, with a progress bar."""
    images = np.empty((n, SCENE_SIZE, SCENE_SIZE, 3), dtype=np.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for seed in tqdm(range(n), desc="scenes"):
        images[seed], _, labels[seed], _ = make_scene_with_marks(seed, marks)
    return images, labels


def _fit(model: ShapesNet, images: np.ndarray, labels: torch.Tensor, *, epochs: int, batch_size: int,
         lr: float, seed: int) -> float:
    """Train `model` in place (AdamW, one-cycle learning rate, seeded data order); return the last loss."""
    n_batches = len(images) // batch_size  # each epoch drops its last partial batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * n_batches)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=epochs * n_batches, desc="training") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=order_rng)[: n_batches * batch_size]
            for batch in order.view(n_batches, batch_size):
                x = normalize(images[batch.numpy()]).contiguous(memory_format=torch.channels_last)
                loss = nn.functional.cross_entropy(model(x), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def train(out_path: str | os.PathLike = WEIGHTS_PATH, *, n_train: int = 12_000, epochs: int = 6,
          seed: int = 0, batch_size: int = 64, lr: float = 5e-3, marked: bool = False) -> dict:
    """Train ShapesNet on scenes 0..n_train-1 and save its state_dict to `out_path`.

    marked: train on scenes carrying their class's tag (the planted shortcut);
    the returned dict then also holds ``swapped_accuracy``, on the same 1,000
    fresh scenes with another class's tag.

    Deterministic for a given seed and thread count: scenes are pre-generated into
    memory (~150 kB each, 1.8 GB for the default 12,000), the data order comes from a
    seeded torch.Generator, and torch deterministic algorithms are enabled while
    training.  Uses torch's default thread count.  Returns a dict with accuracy (on
    1,000 fresh scenes), seconds, n_params, n_train, epochs and final_loss.
    """
    assert n_train <= EVAL_FIRST_SEED, "training seeds must stay below the evaluation seeds"
    start = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        marks = "match" if marked else None
        images, labels = _training_set(n_train, marks)
        model = ShapesNet().to(memory_format=torch.channels_last)  # faster convolutions on CPU
        final_loss = _fit(model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    scores = {"accuracy": accuracy(model, marks=marks)}
    if marked:
        scores["swapped_accuracy"] = accuracy(model, marks="swap")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically({out_path: lambda f: torch.save(model.state_dict(), f)})
    seconds = time.perf_counter() - start
    print(f"ShapesNet {scores} on 1,000 fresh scenes ({seconds:.0f} s); saved {out_path}")
    return {**scores, "seconds": seconds, "n_params": sum(p.numel() for p in model.parameters()),
            "n_train": n_train, "epochs": epochs, "final_loss": final_loss}


# --------------------------------------------------------------------------
# Sample scenes
# --------------------------------------------------------------------------

def save_samples(folder: str | os.PathLike = SAMPLES_DIR) -> list[Path]:
    """Write one scene per class (seed SAMPLE_FIRST_SEED + label) as <name>.png and <name>_mask.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, name in enumerate(CLASS_NAMES):
        scene = make_scene(SAMPLE_FIRST_SEED + label, label=label)
        paths += [folder / f"{name}.png", folder / f"{name}_mask.png"]
        Image.fromarray(scene.image).save(paths[-2])
        Image.fromarray(scene.mask.astype(np.uint8) * 255).save(paths[-1])
    return paths


def load_sample(name: str, folder: str | os.PathLike = SAMPLES_DIR) -> Scene:
    """Read back a saved sample: image (224, 224, 3) uint8 RGB, mask (224, 224) bool."""
    folder = Path(folder)
    image = np.array(Image.open(folder / f"{name}.png").convert("RGB"))
    mask = np.array(Image.open(folder / f"{name}_mask.png").convert("L")) > 127
    return Scene(_remembered(image), mask, CLASS_NAMES.index(name), name)


if __name__ == "__main__":
    train()
    save_samples()
