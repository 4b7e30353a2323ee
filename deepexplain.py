"""deepexplain: why does an image classifier pick its top class?

A tiny CNN, the *perturbation generator*, is trained so that the classifier's
score for the explained class collapses while an L1 term keeps the perturbed
image close to the original. Where the two images differ most is where the
classifier looked: the difference ``|x - x_pert|`` is sharpened (power 6), its
border is cropped and it is dilated into a saliency map whose center of mass
marks the region that mattered. This is the method of "Deep Explanation: Using
AI for Explaining the Results of AI" (roberto1648 on GitHub), rebuilt stage by
stage.

Example (runs offline on the embedded shapes model)::

    import deepexplain as de

    result = de.explain("star", model="shapes", steps=100)  # an embedded sample scene
    print(result.label, result.original_score, "->", result.perturbed_score)
    print("center of mass (row, col):", result.center_of_mass)
    de.plot_panels(result).savefig("explanation.png")

Stages, each a function of its own: :func:`read_image` → :class:`Preprocessing`
(the whole-image stretch, or a torchvision model's resize + center crop, with
the :class:`PhotoMapping` back to the photo) → :func:`load_model` and :func:`assess` → :func:`make_generator`
(:data:`GENERATORS`: :class:`PerturbationGenerator`,
:class:`MaskedPerturbationGenerator`) and :func:`optimize_perturbation` →
:func:`difference_map`, :func:`sharpen`, :func:`crop_border`, :func:`dilate`,
:func:`smooth`, :func:`center_of_mass` → plots (:func:`plot_panels`,
:func:`plot_overlay`, :func:`plot_history`: the images in RGB, the map as
relative importance in [0, 1]) and :meth:`Explanation.saliency_at`, the map at
the original photo's size. Every setting is declared once, in
the settings class of its stage (:class:`GeneratorSettings`,
:class:`OptimizationSettings`, :class:`PostprocessingSettings`, together
:class:`Settings`), with its presets (:data:`PRESETS`: ``"seed"`` the seed
document's values exactly, ``"fast"``, and ``"masked"``, the default).
:func:`explain` runs it all, :func:`explain_batch` several images in one
optimization; the ``*_panel`` functions build the notebooks' widgets. The
embedded scenes and their model live in :mod:`deepexplain_scenes`, file writes
and weights loading in :mod:`deepexplain_io`, the evaluation harness in
:mod:`deepexplain_eval`, the speed benchmark in :mod:`deepexplain_bench` and
the command line (``python deepexplain.py --help``) in :mod:`deepexplain_cli`;
this module imports only the first two.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python deepexplain.py ...` runs the command line (deepexplain_cli), started before
    import runpy             # this module's heavy imports so that a Ctrl-C during them is handled too

    runpy.run_module("deepexplain_cli", run_name="__main__")

import io
import json
import os
import sys
import time
import typing
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Callable, ClassVar, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage
from skimage import morphology, transform
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

import deepexplain_scenes as scenes
from deepexplain_io import load_weights, read_state_dict, write_atomically

__all__ = [
    "DIFFERENCES", "PRECISIONS", "GENERATOR_KINDS", "REMOVALS", "BLUR_SIGMA", "AUTO_MODEL", "OFFLINE_ENV",
    "MAX_IMAGE_PIXELS", "MAX_PIXELS_ENV", "max_image_pixels", "load_image", "read_image", "to_rgb_uint8",
    "Preprocessing", "PhotoMapping", "channel_mean",
    "LoadedModel", "load_model", "frozen", "resolve_device", "ShapesModelWarning",
    "Prediction", "class_probabilities", "checked_probabilities", "assess", "format_predictions",
    "PRESET_BASES", "PRESET_DESCRIPTIONS", "DEFAULT_PRESET", "Interval", "setting", "SettingSpec", "GeneratorSettings",
    "OptimizationSettings", "PostprocessingSettings", "STAGES", "Settings", "SETTINGS", "PRESETS",
    "SEED_PRESET", "FAST_PRESET", "MASKED_PRESET", "DEFAULTS", "resolve_hyperparameters", "settings_table",
    "PerturbationGenerator", "MaskedPerturbationGenerator", "blurred", "GENERATORS", "make_generator",
    "total_variation", "OptimizationResult", "optimize_perturbation", "optimize_perturbations",
    "STOP_PROBABILITY", "STOP_IMPROVEMENT", "converged", "run_converged",
    "difference_map", "sharpen", "crop_border", "dilate", "smooth", "center_of_mass",
    "saliency_map", "Explanation", "explain", "explain_batch",
    "with_postprocessing", "SALIENCY_CMAP", "IMPORTANCE_LABEL", "OVERLAY_MAX_SIDE", "relative_importance",
    "plot_panels", "plot_overlay", "draw_importance", "plot_history", "plot_tensors", "compact_figures",
    "figure_to_png", "figure_to_jpeg", "Panel", "generator_panel", "optimization_panel", "postprocessing_panel",
    "save_outputs",
]

#: How :func:`difference_map` reduces the three channels to one map (the seed's first).
DIFFERENCES = ("signed-mean", "abs-sum")
#: Arithmetic of the optimization's forward passes: fp32, or bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")
#: Generator kinds (:data:`GENERATORS`): the seed's, which perturbs everywhere, and the masked one.
GENERATOR_KINDS = ("plain", "masked")
#: What the masked generator puts where its mask acts: the seed's learned perturbation G(x), or the image
#: blurred (:func:`blurred`, as Fong & Vedaldi's masks and the evaluation's deletion and insertion do).
REMOVALS = ("learned", "blur")
#: The Gaussian blur's σ in px, for :func:`blurred` (Fong & Vedaldi's 2017 value).
BLUR_SIGMA = 10.0
#: Old names of generator kinds, still accepted with a DeprecationWarning.
GENERATOR_ALIASES = MappingProxyType({"seed": "plain"})

#: The model ``"auto"`` prefers when its pretrained weights can be had.
AUTO_MODEL = "vgg19"
#: Set this environment variable to 1 to forbid any download attempt.
OFFLINE_ENV = "DEEPEXPLAIN_OFFLINE"
#: Below this top-class probability the seed warns that the explanation may not be accurate.
LOW_CONFIDENCE = 0.5
#: Images smaller than this on either side carry too little to explain.
MIN_IMAGE_SIDE = 16
#: Images with more pixels than this are refused before they are decoded (a 100-megapixel photo needs about
#: 1.2 GB as floats); set the environment variable ``DEEPEXPLAIN_MAX_PIXELS`` to raise or lower it.
MAX_IMAGE_PIXELS = 100_000_000
#: The environment variable that overrides :data:`MAX_IMAGE_PIXELS`.
MAX_PIXELS_ENV = "DEEPEXPLAIN_MAX_PIXELS"


# --------------------------------------------------------------------------- images

def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read a JPEG/PNG/GIF (anything Pillow reads) as an RGB uint8 H×W×3 array.

    The first frame of an animated image is used, turned upright as its EXIF
    orientation says (a phone's portrait photo is explained standing). Palette,
    grayscale, CMYK and 16-bit images are converted to 8-bit RGB; images with
    transparency (RGBA, LA, palette with a transparent colour) are composited on white.

    Raises FileNotFoundError for a missing file and ValueError for an empty,
    unreadable, truncated or too small (< 16 px a side) image, and for one of
    more than :func:`max_image_pixels` pixels (checked before decoding).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with _open_unlimited(path) as img:
            _check_pixel_count(img, str(path))
            img.seek(0)
            img.load()
            return _pil_to_rgb(ImageOps.exif_transpose(img), source=str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a readable image: {path} ({err})") from None


def max_image_pixels() -> int:
    """The largest image :func:`load_image` decodes: ``$DEEPEXPLAIN_MAX_PIXELS`` or :data:`MAX_IMAGE_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def _open_unlimited(path: Path) -> Image.Image:
    """``Image.open`` without Pillow's own decompression-bomb limit (deepexplain checks its own instead)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixel_count(img: Image.Image, source: str) -> None:
    limit = max_image_pixels()
    if img.width * img.height > limit:
        raise ValueError(f"{source}: image of {img.width}×{img.height} px has {img.width * img.height:,} pixels, "
                         f"over the limit of {limit:,}; set {MAX_PIXELS_ENV} to a larger number to explain it")


def _pil_to_rgb(img: Image.Image, source: str = "image") -> np.ndarray:
    """Convert a Pillow image in any mode to RGB uint8 H×W×3 (alpha composited on white)."""
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grayscale
        return to_rgb_uint8(np.asarray(img), source)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return to_rgb_uint8(np.asarray(img.convert("RGB")), source)


def to_rgb_uint8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Return a new RGB uint8 H×W×3 copy of an image array; the input is not changed.

    Accepts H×W (grayscale), H×W×3 (RGB) or H×W×4 (RGBA, composited on white)
    arrays of dtype uint8 (0–255), uint16 or int32 holding 16-bit values
    (0–65535, scaled down when any value exceeds 255) or float (0–1).
    """
    array = np.asarray(array)
    if array.ndim in (2, 3) and min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f"{source}: image of {array.shape[0]}×{array.shape[1]} px is too small "
                         f"(at least {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE} needed)")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{source}: expected an H×W, H×W×3 or H×W×4 image, got shape {array.shape}")
    if array.dtype == np.uint8:
        unit = array / 255.0
    elif np.issubdtype(array.dtype, np.integer):
        unit = array / (65535.0 if array.max(initial=0) > 255 else 255.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{source}: a float image must hold finite values in [0, 1]")
        unit = array
    else:
        raise ValueError(f"{source}: unsupported image dtype {array.dtype}")
    if unit.shape[2] == 4:
        alpha = unit[..., 3:]
        unit = unit[..., :3] * alpha + (1.0 - alpha)
    return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


def read_image(image: str | os.PathLike | np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """An image given as a path, an embedded sample's name, an array, a Pillow image or a tensor → RGB uint8 H×W×3.

    Files and Pillow images are turned upright as their EXIF orientation says.
    A string that is not an existing file but names a class of the embedded
    scenes (``"star"``) reads that sample scene from ``data/samples/``. A
    tensor is read in torchvision's layout, C×H×W (or 1×C×H×W), uint8 or float
    in [0, 1]; it is not changed (nor its gradient).
    """
    if isinstance(image, str) and image in scenes.CLASS_NAMES and not Path(image).exists():
        return scenes.load_sample(image).image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        return to_rgb_uint8(_tensor_to_hwc(image), "tensor image")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image must be a path, a sample name, an array, a PIL image or a tensor, "
                        f"got {type(image).__name__}")
    return to_rgb_uint8(image)


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """A C×H×W or 1×C×H×W image tensor (C = 1, 3 or 4) as an H×W×C array, detached and on the CPU."""
    t = tensor.detach().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"a tensor image must be C×H×W or 1×C×H×W with C = 1, 3 or 4, got shape {tuple(tensor.shape)}")
    hwc = t.permute(1, 2, 0).numpy()
    return hwc[..., 0] if hwc.shape[2] == 1 else hwc


@dataclass(frozen=True)
class PhotoMapping:
    """Where the classifier's input came from in the original photo (:meth:`Preprocessing.mapping`).

    ``original``: the photo's (height, width); ``resized``: its (height, width)
    after resizing; ``crop``: (top, left, height, width) of the model's input
    inside the resized image. Stretch preprocessing resizes to the input size
    and crops nothing.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    def crop_in_original(self, size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
        """(top, left, height, width) of the model's input in the original photo's pixels (floats), or in
        the pixels of the photo drawn at ``size`` = (height, width)."""
        sy, sx = self._scale(size)
        top, left, height, width = self.crop
        return top * sy, left * sx, height * sy, width * sx

    def point_to_original(self, point: tuple[float, float], size: tuple[int, int] | None = None
                          ) -> tuple[float, float]:
        """A (row, col) point of the model's input (pixel centers at whole numbers) in the original photo's
        pixels, or in those of the photo drawn at ``size`` = (height, width)."""
        top, left, height, width = self.crop_in_original(size)
        row = top + (point[0] + 0.5) * height / self.crop[2] - 0.5
        return row, left + (point[1] + 0.5) * width / self.crop[3] - 0.5

    def to_original(self, saliency: np.ndarray, fill: float = np.nan,
                    size: tuple[int, int] | None = None) -> np.ndarray:
        """An h×w map of the model's input placed back on the original photo: a float H0×W0 array
        (H0×W0 = ``original``, or ``size``: the photo drawn at another resolution), bilinearly resized into
        the crop's box, ``fill`` outside it."""
        saliency = np.asarray(saliency, dtype=float)
        if saliency.ndim != 2:
            raise ValueError(f"a saliency map must be 2-D (h×w), got shape {saliency.shape}")
        size = self.original if size is None else tuple(int(n) for n in size)
        sy, sx = self._scale(size)
        top, left, height, width = self.crop
        rows = slice(round(top * sy), round((top + height) * sy))
        cols = slice(round(left * sx), round((left + width) * sx))
        out = np.full(size, fill, dtype=float)
        box = (rows.stop - rows.start, cols.stop - cols.start)
        if min(box) > 0:
            out[rows, cols] = transform.resize(saliency, box, order=1, anti_aliasing=False)
        return out

    def _scale(self, size: tuple[int, int] | None) -> tuple[float, float]:
        """Photo pixels (at ``size``, default ``original``) per pixel of the resized image, down and across."""
        size = self.original if size is None else size
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) in whole pixels, got {size}")
        return size[0] / self.resized[0], size[1] / self.resized[1]

    def as_dict(self) -> dict:
        """JSON-ready: original and resized (height, width), crop (top, left, height, width)."""
        return {"original": list(self.original), "resized": list(self.resized), "crop": list(self.crop)}


@dataclass(frozen=True)
class Preprocessing:
    """The classifier's input transform and its inverse.

    ``__call__`` maps an RGB uint8 H×W×3 image to the model's input ``size``
    in one of two ways, scales it to [0, 1] and normalizes each channel with
    ``mean``/``std``, in **RGB** order (by default ImageNet's,
    :data:`deepexplain_scenes.MEAN`/``STD``):

    * ``resize=None`` (*stretch*, the seed's and the embedded model's): the whole
      image is resized to ``size`` (``skimage.transform.resize``, anti-aliased),
      non-square photos are squeezed;
    * ``resize=n`` (*crop*, what torchvision's ImageNet weights were trained
      with): the shorter side is resized to n px (bilinear, anti-aliased, aspect
      kept), then the center ``size`` is cropped — torchvision's
      ``weights.transforms()`` exactly; :meth:`from_weights` takes n, ``size``,
      mean and std from a weights' metadata. Named torchvision models get this.

    :meth:`mapping` says where the input lies in the original photo. (The seed
    flipped the image to BGR before applying these RGB statistics; torchvision's
    weights expect RGB, so that flip is a bug and is not reproduced here.)
    """

    mean: tuple[float, float, float] = scenes.MEAN
    std: tuple[float, float, float] = scenes.STD
    size: tuple[int, int] = (224, 224)
    resize: int | None = None
    source: str = ""

    def __post_init__(self):
        if self.resize is not None and (int(self.resize) != self.resize or self.resize < max(self.size)):
            raise ValueError(f"resize must be a whole number of px ≥ the crop size {max(self.size)} "
                             f"(or None to stretch), got {self.resize}")

    @classmethod
    def from_weights(cls, weights: torchvision.models.WeightsEnum) -> Preprocessing:
        """Resize + center crop with the size, crop, mean and std of ``weights.transforms()``."""
        t = weights.transforms()
        if list(t.resize_size) != list(t.resize_size[:1]) or len(t.crop_size) != 1:
            raise ValueError(f"{weights}: expected one resize size and one square crop, "
                             f"got {t.resize_size} and {t.crop_size}")
        return cls(tuple(t.mean), tuple(t.std), (t.crop_size[0],) * 2, t.resize_size[0],
                   f"torchvision {type(weights).__name__}.{weights.name}")

    @property
    def mode(self) -> str:
        """``"stretch"`` (whole image to ``size``) or ``"crop"`` (resize the short side, crop the center)."""
        return "stretch" if self.resize is None else "crop"

    def describe(self) -> str:
        """One line: how an image becomes the model's input, e.g. "resize short side to 232 px, center
        crop 224×224 (torchvision ...)"."""
        h, w = self.size
        text = (f"stretch the whole image to {h}×{w}" if self.resize is None else
                f"resize the short side to {self.resize} px, center crop {h}×{w}")
        return text + (f" ({self.source})" if self.source else "")

    def mapping(self, image: np.ndarray) -> PhotoMapping:
        """Where the model's input lies in ``image`` (H×W×…): original size, resized size, crop box."""
        original = tuple(int(n) for n in np.shape(image)[:2])
        if self.resize is None:
            return PhotoMapping(original, self.size, (0, 0, *self.size))
        short, long = sorted(original)
        resized_long = int(self.resize * long / short)  # torchvision's rounding
        resized = (self.resize, resized_long) if original[0] <= original[1] else (resized_long, self.resize)
        top, left = (int(round((r - c) / 2.0)) for r, c in zip(resized, self.size))
        return PhotoMapping(original, resized, (top, left, *self.size))

    def __call__(self, image: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """RGB uint8 H×W×3 → normalized float32 tensor 1×3×size, on ``device``; ``image`` is not changed."""
        image = to_rgb_uint8(image)
        if self.resize is None:
            resized = transform.resize(image, self.size, order=1, anti_aliasing=True)
            normalized = (resized - np.array(self.mean)) / np.array(self.std)
            tensor = torch.from_numpy(normalized.astype(np.float32).transpose(2, 0, 1).copy())
            return tensor.unsqueeze(0).to(device)
        mapping = self.mapping(image)
        chw = torch.from_numpy(image.transpose(2, 0, 1).copy())
        resized = torchvision.transforms.functional.resize(
            chw, list(mapping.resized), interpolation=torchvision.transforms.InterpolationMode.BILINEAR,
            antialias=True)
        cropped = torchvision.transforms.functional.center_crop(resized, list(self.size))
        unit = cropped.float() / 255.0
        tensor = torchvision.transforms.functional.normalize(unit, list(self.mean), list(self.std))
        return tensor.unsqueeze(0).to(device)

    def to_image(self, tensor: torch.Tensor) -> np.ndarray:
        """Normalized 1×3×H×W (or 3×H×W) tensor → displayable H×W×3 float array in [0, 1]."""
        hwc = tensor.detach().float().cpu().reshape(3, *tensor.shape[-2:]).permute(1, 2, 0).numpy()
        return np.clip(hwc * np.array(self.std) + np.array(self.mean), 0.0, 1.0)


def channel_mean(tensor: torch.Tensor) -> np.ndarray:
    """1×3×H×W (or 3×H×W) tensor → H×W float array: the mean over channels, as the seed plots it."""
    return tensor.detach().float().cpu().reshape(3, *tensor.shape[-2:]).mean(0).numpy()


# --------------------------------------------------------------------------- models

@dataclass
class LoadedModel:
    """A classifier ready to explain: the model with its preprocessing and class labels.

    ``model`` maps a normalized N×3×H×W tensor to N×K logits; ``labels`` has K
    names (or is None: classes are then called "class i"); ``note`` says why
    ``"auto"`` chose this model, when it fell back.
    """

    model: nn.Module
    preprocessing: Preprocessing
    labels: Sequence[str] | None
    name: str
    note: str = ""

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a model without parameters)."""
        return next(self.model.parameters(), torch.empty(0)).device

    def label(self, index: int) -> str:
        """The name of class ``index``."""
        return self.labels[index] if self.labels is not None else f"class {index}"


class ShapesModelWarning(UserWarning):
    """The embedded shapes model was asked to explain an image that is not one of its scenes (e.g. a photo):
    it knows six synthetic shapes only, so its explanation says nothing about that image."""


#: What :class:`ShapesModelWarning` says (one line; the same every time, so Python shows it once per place).
SHAPES_MODEL_WARNING = (
    f"the embedded shapes model knows only six synthetic shapes ({', '.join(scenes.CLASS_NAMES)}): its explanation "
    "of this photo says nothing about the photo. Explain it with a real classifier: --model vgg19 (Python: "
    "model='vgg19'), or another torchvision model name, with --weights FILE when offline")


def _warn_if_not_embedded(loaded: LoadedModel, images: Sequence[np.ndarray]) -> None:
    """A :class:`ShapesModelWarning` when ``loaded`` is the embedded shapes model and an image (H×W×3 uint8) is
    not one of its scenes (:func:`deepexplain_scenes.is_embedded`); the warning points at the caller of
    :func:`explain_batch`."""
    if loaded.name == "shapes" and not all(scenes.is_embedded(image) for image in images):
        warnings.warn(SHAPES_MODEL_WARNING, ShapesModelWarning, stacklevel=3)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None → CUDA when available, else CPU; a named CUDA device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
    return device


def load_model(name: str | nn.Module | LoadedModel = "auto", device: torch.device | str | None = None,
               weights_path: str | os.PathLike | None = None, *,
               preprocessing: Preprocessing | None = None,
               labels: Sequence[str] | None = None) -> LoadedModel:
    """Load a classifier to explain, frozen and in eval mode, with its preprocessing and labels.

    ``name`` is one of:

    * ``"vgg19"`` (the seed's model) or any other torchvision classification
      model name: pretrained ImageNet weights through torchvision's weights API,
      from the torch hub cache (``torch.hub.get_dir()``) or downloaded into it;
      labels and normalization from the weights' metadata;
    * the same names with ``weights_path``: a local state_dict file, loaded with
      ``torch.load(..., weights_only=True)``, instead of the pretrained weights;
    * ``"shapes"``: the embedded model trained on :mod:`deepexplain_scenes`
      (``weights_path`` may point at another training run of it);
    * ``"auto"``: ``AUTO_MODEL`` (VGG19) when its weights are cached or can be
      downloaded now, otherwise ``"shapes"``, with a one-line note on stderr;
      set ``DEEPEXPLAIN_OFFLINE=1`` to forbid any download attempt;
    * a user's own ``nn.Module`` (with ``preprocessing`` and ``labels``; by
      default ImageNet normalization and "class i" labels). It is neither
      copied nor changed: moved only when ``device`` is given; :func:`explain`
      freezes it only while it runs and restores it after.

    A named torchvision model gets the resize + center crop of its weights'
    metadata (:meth:`Preprocessing.from_weights`), ``"shapes"`` and a user's
    module the whole-image stretch; ``preprocessing`` replaces either (e.g.
    ``Preprocessing()`` to stretch a photo for VGG19 as the seed did).

    Raises ValueError for an unknown name, unusable weights or an unavailable device.
    """
    if isinstance(name, LoadedModel):
        return name
    if isinstance(name, nn.Module):
        if device is not None:
            name.to(resolve_device(device))
        return LoadedModel(name, preprocessing or Preprocessing(), labels, type(name).__name__)
    if not isinstance(name, str):
        raise ValueError(f"model must be a name or an nn.Module, got {type(name).__name__}")
    device = resolve_device(device)
    note = ""
    if name == "auto":
        if weights_path is not None:
            raise ValueError("a weights file needs an architecture: give a model name such as "
                             "'vgg19' or 'shapes' instead of 'auto'")
        name, note = _choose_auto_model()
        if note:
            print(note, file=sys.stderr)
    if name == "shapes":
        model = scenes.load_shapes_model(scenes.WEIGHTS_PATH if weights_path is None else weights_path)
        loaded = LoadedModel(model, Preprocessing(), scenes.CLASS_NAMES, name, note)
    else:
        loaded = _load_torchvision_model(name, weights_path)
        loaded.note = note
    if preprocessing is not None:
        loaded.preprocessing = preprocessing
    loaded.model.to(device).eval().requires_grad_(False)
    return loaded


def _load_torchvision_model(name: str, weights_path: str | os.PathLike | None) -> LoadedModel:
    """A torchvision classifier with pretrained or local weights; labels/normalization from its metadata."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model {name!r}: use 'auto', 'shapes', or a torchvision "
                         "classification model such as 'vgg19' or 'resnet50' "
                         "(torchvision.models.list_models() lists them)")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    if weights_path is None:
        state, source = _pretrained_state_dict(name, weights), weights.url
    else:
        state, source = read_state_dict(weights_path), str(weights_path)
    model = load_weights(torchvision.models.get_model(name, weights=None), state, name, source)
    return LoadedModel(model, Preprocessing.from_weights(weights), weights.meta["categories"], name)


def _cached_weights_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def _pretrained_state_dict(name: str, weights: torchvision.models.WeightsEnum) -> dict:
    """Pretrained weights from the hub cache, downloaded into it unless offline."""
    cached = _cached_weights_file(weights.url)
    if not cached.is_file() and _offline():
        raise ValueError(f"pretrained weights for {name!r} are not in the torch hub cache ({cached}) "
                         f"and {OFFLINE_ENV}=1 forbids downloading them")
    try:
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=True,
                                                  check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise ValueError(f"could not get pretrained weights for {name!r} from {weights.url} ({err}); "
                         f"download the file on another machine into {cached.parent}") from None


def _can_download(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url`` answers a HEAD request within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _choose_auto_model() -> tuple[str, str]:
    """(model name, note): AUTO_MODEL when its weights are cached or downloadable, else "shapes"."""
    url = torchvision.models.get_model_weights(AUTO_MODEL).DEFAULT.url
    cached = _cached_weights_file(url)
    if cached.is_file():
        return AUTO_MODEL, ""
    if _offline():
        why = f"{OFFLINE_ENV}=1 forbids downloading them"
    elif _can_download(url):
        return AUTO_MODEL, ""
    else:
        why = f"{urlparse(url).netloc} cannot be reached"
    folder = _home_relative(cached.parent)
    return "shapes", (f"note: explaining with the embedded 'shapes' model: {AUTO_MODEL}'s weights are not "
                      f"in {folder} and {why}; to use {AUTO_MODEL}, run once online or copy "
                      f"{cached.name} there")


def _home_relative(path: Path) -> str:
    """``path`` with the home folder written as ~ (so notes carry no user-specific path)."""
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` and restore both on exit."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- assessment

@dataclass(frozen=True)
class Prediction:
    """One class of the model's ranking: index, name and softmax probability in [0, 1]."""

    index: int
    label: str
    probability: float


@torch.no_grad()
def class_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities N×K of a (frozen) model for a normalized N×3×H×W input."""
    return torch.softmax(model(x).float(), dim=1)


@torch.no_grad()
def checked_probabilities(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """:func:`class_probabilities` after checking, once, what the model returns for ``x`` (N×3×H×W).

    It must be one floating N×K tensor of finite logits with K ≥ 2, and K must
    equal the number of labels when the model has labels; otherwise a
    ValueError says what the model returned and what is needed.
    """
    logits = loaded.model(x)
    what = f"model {loaded.name!r} returned"
    if isinstance(logits, (tuple, list)):
        raise ValueError(f"{what} a {type(logits).__name__} of {len(logits)} items; an explained model must return "
                         "one N×K tensor of logits (wrap it in a module that returns the logits)")
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{what} a {type(logits).__name__}; an explained model must return an N×K tensor of logits")
    n = x.shape[0]
    if logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise ValueError(f"{what} a tensor of shape {tuple(logits.shape)} for {n} image(s); it must return "
                         f"{n}×K logits, one row per image and K ≥ 2 classes")
    if not logits.is_floating_point():
        raise ValueError(f"{what} {logits.dtype} values; it must return floating-point logits")
    if loaded.labels is not None and len(loaded.labels) != logits.shape[1]:
        raise ValueError(f"{what} {logits.shape[1]} classes but has {len(loaded.labels)} labels; "
                         "give one label per class")
    if not torch.isfinite(logits).all():
        raise ValueError(f"{what} NaN or infinite logits for the input image(s); nothing can be explained")
    return torch.softmax(logits.float(), dim=1)


def assess(loaded: LoadedModel, x: torch.Tensor, k: int = 5) -> list[Prediction]:
    """The model's top-``k`` classes for a 1×3×H×W input, most probable first."""
    with frozen(loaded.model):
        return _top_k(checked_probabilities(loaded, x)[0], loaded, k)


def _top_k(probs: torch.Tensor, loaded: LoadedModel, k: int) -> list[Prediction]:
    top = torch.topk(probs, min(k, probs.numel()))
    return [Prediction(int(i), loaded.label(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """The seed's top-k table, with its warning when the top probability is below 0.5."""
    lines = [f"{len(predictions)} top classes identified by the model:",
             "(class index) class description: model score"]
    lines += [f"({p.index}) {p.label}: {p.probability:.4f}" for p in predictions]
    if predictions and predictions[0].probability < LOW_CONFIDENCE:
        lines += ["*** Warning ***", f"top category score under {LOW_CONFIDENCE}, extracted explanation "
                  "may not be accurate on not well defined class"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- settings

#: Named sets of values for every setting. Each preset changes some values of the one before it: ``"seed"`` is
#: the seed document's method exactly (its section 3.1); ``"fast"`` the same method on the project's fast
#: schedule (README, "Performance"); ``"masked"`` the generator that also learns where to perturb (README,
#: "Beyond the seed").
PRESET_BASES: Mapping[str, str | None] = MappingProxyType({"seed": None, "fast": "seed", "masked": "fast"})
#: Each preset in a few words (the command line's ``explain --help``).
PRESET_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "seed": "the seed document's method with its values, exactly (its section 3.1): each setting's 'seed:' value",
    "fast": "the seed's method on the project's fast schedule: the seed's map quality about 12x sooner "
            "(README, Performance)",
    "masked": "learns a mask of where blurring the image deletes the class and where keeping it preserves the "
              "class: a lower deletion AUC than Grad-CAM on the scenes and on real photos, and than the seed's "
              "method on the scenes (README, Beyond the seed)"})
#: The preset :func:`explain` and the command line use when none is given: it measured better than the seed
#: preset on every metric of the evaluation (README, "Beyond the seed").
DEFAULT_PRESET = "masked"


@dataclass(frozen=True)
class Interval:
    """A closed or open range of numbers, written as in mathematics: ``Interval.parse("[0, 0.5)")``."""

    low: float
    high: float
    closed_low: bool = True
    closed_high: bool = True

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"[1, inf)"``, ``"(0, inf)"``, ``"[0, 0.5)"``: brackets say whether an end is included."""
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.closed_low else value > self.low
        below = value <= self.high if self.closed_high else value < self.high
        return above and below

    def __str__(self) -> str:
        def end(v: float) -> str:
            return "inf" if np.isinf(v) else f"{int(v)}" if v == int(v) and abs(v) >= 1e5 else f"{v:g}"
        return f"{'[' if self.closed_low else '('}{end(self.low)}, {end(self.high)}{']' if self.closed_high else ')'}"


def setting(seed: float | int | str, *, help: str, values: str | None = None, choices: Sequence[str] = (),
            widget: tuple[float, float, float | str] | None = None, name: str | None = None, **presets):
    """Declare one setting as a field of a stage's settings class: its value in the seed preset (the field's
    default), the values other presets change it to (``fast=300``), the allowed ``values`` (an
    :class:`Interval` text) or ``choices``, the range and step of its slider (``widget``, (low, high, step)),
    (step ``"log"``: a logarithmic slider), the one-line ``help`` shown by the command line and the README, and its public ``name`` when that
    differs from the field's."""
    unknown = set(presets) - set(PRESET_BASES)
    if unknown:
        raise TypeError(f"setting(): unknown preset(s) {sorted(unknown)}")
    return field(default=seed, metadata=dict(
        help=help, interval=None if values is None else Interval.parse(values), choices=tuple(choices),
        widget=widget, name=name, presets={"seed": seed, **presets}))


@dataclass(frozen=True)
class SettingSpec:
    """What :func:`setting` declared, with the stage and Python type it belongs to."""

    name: str
    attribute: str
    stage: str
    type: type
    help: str
    interval: Interval | None
    choices: tuple[str, ...]
    widget: tuple[float, float, float | str] | None
    presets: Mapping[str, float | int | str]

    def value_in(self, preset: str) -> float | int | str:
        """The value preset ``preset`` gives this setting (the closest preset before it that sets one)."""
        while preset not in self.presets:
            preset = PRESET_BASES[preset]
        return self.presets[preset]

    def allowed(self) -> str:
        """The allowed values in words: ``"an integer in [1, inf)"``, ``"one of fp32, bf16"``."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        return f"{'an integer' if self.type is int else 'a number'} in {self.interval}"

    def check(self, value: object) -> float | int | str:
        """``value`` as this setting's type; TypeError for a wrong type, ValueError outside the allowed values."""
        if self.type is str:
            if not isinstance(value, str):
                raise TypeError(f"{self.name} must be a string ({self.allowed()}), got {type(value).__name__}")
            if value not in self.choices:
                raise ValueError(f"{self.name} must be {self.allowed()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{self.name} must be {self.allowed()}, got {type(value).__name__} {value!r}")
        if (self.type is int and (not np.isfinite(value) or int(value) != value)) or value not in self.interval:
            raise ValueError(f"{self.name} must be {self.allowed()}, got {value}")
        return int(value) if self.type is int or isinstance(value, (int, np.integer)) else float(value)


class _Stage:
    """Shared behaviour of the three settings classes: declarations, validation, presets and overrides."""

    @classmethod
    def specs(cls) -> tuple[SettingSpec, ...]:
        """The declarations of this stage's settings, in order."""
        types = typing.get_type_hints(cls)
        return tuple(SettingSpec(f.metadata["name"] or f.name, f.name, cls.STAGE, types[f.name], f.metadata["help"],
                                 f.metadata["interval"], f.metadata["choices"], f.metadata["widget"],
                                 f.metadata["presets"]) for f in fields(cls))

    @classmethod
    def from_preset(cls, preset: str = "seed"):
        """This stage's settings as preset ``preset`` gives them."""
        return cls(**{spec.attribute: spec.value_in(preset) for spec in cls.specs()})

    def __post_init__(self):
        for spec in self.specs():
            object.__setattr__(self, spec.attribute, spec.check(getattr(self, spec.attribute)))

    def updated(self, **values):
        """A copy with some settings changed, by public name (``generator=`` for ``kind``); None keeps a value."""
        by_name = {spec.name: spec.attribute for spec in self.specs()}
        unknown = set(values) - set(by_name)
        if unknown:
            raise ValueError(f"unknown {self.STAGE} setting(s): {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(by_name)})")
        return replace(self, **{by_name[name]: v for name, v in values.items() if v is not None})

    def as_dict(self) -> dict:
        """The settings by public name."""
        return {spec.name: getattr(self, spec.attribute) for spec in self.specs()}


@dataclass(frozen=True)
class GeneratorSettings(_Stage):
    """How the perturbation generator is built (:func:`make_generator`). Defaults: the seed preset's."""

    STAGE: ClassVar[str] = "generator"
    kind: str = setting("plain", masked="masked", name="generator", choices=GENERATOR_KINDS,
                        help="generator kind: 'plain' perturbs everywhere (the seed's), 'masked' also "
                             "learns where")
    kernel_size: int = setting(3, values="[1, 31]", widget=(1, 9, 2),
                               help="side of the generator's shared square conv kernel (made odd)")
    nblocks: int = setting(3, values="[1, 20]", widget=(1, 6, 1), help="blocks of convolutions, each ending in a ReLU")
    nlayers: int = setting(3, values="[1, 20]", widget=(1, 6, 1), help="convolutions per block (one shared conv)")
    mask_size: int = setting(28, values="[2, 512]", widget=(7, 56, 7),
                             help="masked generator: side of the mask's grid of logits")
    area_coeff: float = setting(1.0, values="[0, inf)", widget=(0.0, 4.0, 0.1),
                                help="masked generator: weight of the mask's area in the loss")
    tv_coeff: float = setting(0.2, masked=1.0, values="[0, inf)", widget=(0.0, 4.0, 0.1),
                              help="masked generator: weight of the mask's total variation in the loss")
    preserve_coeff: float = setting(0.0, masked=1.0, values="[0, inf)", widget=(0.0, 4.0, 0.1),
                                    help="masked generator: weight of the preservation game, 1 − the class "
                                         "score when only the mask's complement is perturbed")
    removal: str = setting("learned", masked="blur", choices=REMOVALS,
                           help="masked generator: what replaces the image under the mask: 'learned' the "
                                f"seed's generator G(x), 'blur' the image blurred (σ {BLUR_SIGMA:g} px)")

    def __post_init__(self):
        if self.kind in GENERATOR_ALIASES:
            warnings.warn(f"generator {self.kind!r} is now called {GENERATOR_ALIASES[self.kind]!r}",
                          DeprecationWarning, stacklevel=4)
            object.__setattr__(self, "kind", GENERATOR_ALIASES[self.kind])
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            warnings.warn(f"kernel_size {self.kernel_size} is even; using {self.kernel_size + 1}", stacklevel=4)
            object.__setattr__(self, "kernel_size", self.kernel_size + 1)


@dataclass(frozen=True)
class OptimizationSettings(_Stage):
    """How the generator is trained (:func:`optimize_perturbations`). Defaults: the seed preset's."""

    STAGE: ClassVar[str] = "optimization"
    steps: int = setting(1000, fast=300, values="[1, 1000000]", widget=(1, 2000, 1),
                         help="Adam steps (at most, when patience > 0)")
    lr: float = setting(0.01, fast=0.03, masked=0.1, values="(0, 1000]", widget=(1e-4, 1.0, "log"),
                        help="Adam's learning rate")
    l1_coeff: float = setting(1.0, masked=0.0, values="[0, inf)", widget=(0.0, 5.0, 0.1),
                              help="weight of the L1 term, mean abs(x - x_pert), in the loss")
    patience: int = setting(0, fast=20, values="[0, 1000000]",
                            help="stop when the stopping rule held for this many steps (0: never stop early)")
    precision: str = setting("fp32", fast="bf16", choices=PRECISIONS,
                             help="arithmetic of the forward passes: fp32 or bfloat16 autocast")
    jitter: int = setting(0, masked=4, values="[0, 1000]", help="shift the perturbed image by up to this many px "
                                                               "each step (0: never)")
    runs: int = setting(1, values="[1, 100]",
                        help="optimizations from successive generator seeds; their masks are combined")


@dataclass(frozen=True)
class PostprocessingSettings(_Stage):
    """How the saliency map is made from the optimization's result (:func:`saliency_map`).
    Defaults: the seed preset's."""

    STAGE: ClassVar[str] = "postprocessing"
    difference: str = setting("signed-mean", choices=DIFFERENCES,
                              help="how x - x_pert is reduced over channels (plain generator)")
    smoothing: float = setting(0.0, masked=4.0, values="[0, 1000]", widget=(0.0, 32.0, 1.0),
                               help="Gaussian blur sigma in px before sharpening (0: none)")
    power: float = setting(6, masked=4, values="(0, 100]", widget=(0.5, 12.0, 0.5),
                           help="exponent that sharpens the map")
    border: float = setting(0.1, masked=0.0, values="[0, 0.5)", widget=(0.0, 0.45, 0.01),
                            help="fraction of rows and columns zeroed on every side")
    dilation: int = setting(20, masked=1, values="[1, 1000]", widget=(1, 40, 1),
                            help="side of the square of the grey dilation (1: none)")


#: The three stages' settings classes, in pipeline order.
STAGES = (GeneratorSettings, OptimizationSettings, PostprocessingSettings)


@dataclass(frozen=True)
class Settings:
    """Every setting of an explanation, by stage. ``Settings.from_preset("fast", lr=0.05)``."""

    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    postprocessing: PostprocessingSettings = field(default_factory=PostprocessingSettings)

    def __post_init__(self):
        if self.optimization.runs > 1 and self.generator.kind != "masked":
            raise ValueError(f"runs must be 1 with the {self.generator.kind!r} generator (more runs combine "
                             f"masks, which only the masked generator has), got {self.optimization.runs}")

    @classmethod
    def from_preset(cls, preset: str | None = None, **values) -> Settings:
        """Preset ``preset`` (None: :data:`DEFAULT_PRESET`) with some settings changed by name (None = unchanged).

        Raises ValueError for an unknown preset or setting name or a value out of range, TypeError for a
        value of the wrong type.
        """
        preset = DEFAULT_PRESET if preset is None else preset
        if preset not in PRESET_BASES:
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESET_BASES)})")
        return cls(*(stage.from_preset(preset) for stage in STAGES)).updated(**values)

    def updated(self, **values) -> Settings:
        """A copy with settings changed by public name, whatever their stage; None keeps a value."""
        unknown = set(values) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))} (known: {', '.join(SETTINGS)})")
        return Settings(*(getattr(self, stage.STAGE).updated(
            **{name: v for name, v in values.items() if SETTINGS[name].stage == stage.STAGE}) for stage in STAGES))

    def as_dict(self) -> dict:
        """Every setting by public name, stage after stage."""
        return {name: value for stage in STAGES for name, value in getattr(self, stage.STAGE).as_dict().items()}


#: Every setting's declaration by public name, stage after stage.
SETTINGS: Mapping[str, SettingSpec] = MappingProxyType({spec.name: spec for stage in STAGES for spec in stage.specs()})
#: Every preset's values by public name, as flat read-only dicts (``PRESETS["fast"]["lr"]``).
PRESETS: Mapping[str, Mapping[str, float | int | str]] = MappingProxyType(
    {name: MappingProxyType(Settings.from_preset(name).as_dict()) for name in PRESET_BASES})
SEED_PRESET, FAST_PRESET, MASKED_PRESET = PRESETS["seed"], PRESETS["fast"], PRESETS["masked"]
#: What :func:`explain` uses when neither a preset nor a value is given.
DEFAULTS = PRESETS[DEFAULT_PRESET]


def resolve_hyperparameters(preset: str | None = None, **overrides) -> dict:
    """The settings to use as one flat dict: ``Settings.from_preset(preset, **overrides).as_dict()``."""
    return Settings.from_preset(preset, **overrides).as_dict()


def _stage_settings(settings: _Stage | None, stage: type[_Stage], values: Mapping[str, object]) -> _Stage:
    """``settings`` (default: ``stage()``, the seed preset's) with ``values`` changed by name; a TypeError when
    ``settings`` is not of that stage (e.g. a number given where the old signatures took one positionally)."""
    if settings is None:
        settings = stage()
    elif not isinstance(settings, stage):
        raise TypeError(f"expected {stage.__name__} (or settings as keywords such as "
                        f"{stage.specs()[0].name}=...), got {type(settings).__name__} {settings!r}")
    return settings.updated(**values)


def settings_table() -> str:
    """The settings as a Markdown table (the README's): name, stage, allowed values, each preset's value, help."""
    header = ["setting", "stage", "allowed", *(f"`{p}`" for p in PRESET_BASES), "what it does"]
    rows = [[f"`{spec.name}`", spec.stage, spec.allowed(), *(f"{spec.value_in(p)}" for p in PRESET_BASES),
             spec.help] for spec in SETTINGS.values()]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])


# --------------------------------------------------------------------------- generator

class PerturbationGenerator(nn.Module):
    """The seed's perturbation CNN (kind ``"plain"``): one 3→3 conv, shared by every layer.

    ``forward`` maps a normalized N×3×H×W tensor to a perturbed tensor of the
    same shape: ``nblocks`` blocks of (the conv applied ``nlayers`` times, then a
    ReLU), then each image rescaled to its input's [min, max]. 'Same' padding
    keeps H×W; an even ``kernel_size`` is made odd with a warning. Unlike the
    seed, a constant ReLU output (e.g. all zeros) does not divide by zero: it
    maps to the input's minimum, so the output is always finite.

    With ``copies`` n > 1 it holds n independent generators in one grouped
    convolution (weights 3n×3×k×k, ``groups=n``) and takes exactly n images:
    image i goes through generator i only (with one copy, every image of a
    batch goes through the same generator), so one optimization explains n images as n
    separate runs would. :meth:`stack` builds one from single generators.
    Its settings (:class:`GeneratorSettings`) are kept in ``settings``.
    """

    KIND: ClassVar[str] = "plain"

    def __init__(self, kernel_size: int = GeneratorSettings.kernel_size, nblocks: int = GeneratorSettings.nblocks,
                 nlayers: int = GeneratorSettings.nlayers, *, copies: int = 1):
        super().__init__()
        if isinstance(copies, bool) or int(copies) != copies or copies < 1:
            raise ValueError(f"copies must be a positive integer, got {copies}")
        self.settings = GeneratorSettings(kind=self.KIND, kernel_size=kernel_size, nblocks=nblocks, nlayers=nlayers)
        k = self.settings.kernel_size
        self.conv = nn.Conv2d(3 * copies, 3 * copies, k, padding=k // 2, groups=int(copies))
        self.nblocks, self.nlayers, self.copies = self.settings.nblocks, self.settings.nlayers, int(copies)

    @classmethod
    def from_settings(cls, settings: GeneratorSettings, copies: int = 1) -> PerturbationGenerator:
        """A generator of this kind built from the settings it reads (the global RNG draws its weights)."""
        return cls(settings.kernel_size, settings.nblocks, settings.nlayers, copies=copies)

    @classmethod
    def stack(cls, generators: Sequence[PerturbationGenerator]) -> PerturbationGenerator:
        """One generator with ``len(generators)`` copies, copy i holding ``generators[i]``'s weights."""
        stacked = generators[0]._with_copies(len(generators))
        with torch.no_grad():
            for target, *sources in zip(stacked.parameters(), *(g.parameters() for g in generators)):
                target.copy_(torch.cat(sources))
        return stacked

    def _with_copies(self, copies: int) -> PerturbationGenerator:
        """A generator of the same kind and settings with ``copies`` copies, on the same device;
        the global RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            fresh = type(self).from_settings(self.settings, copies)
        return fresh.to(self.conv.weight.device)

    def penalty(self) -> torch.Tensor:
        """Per-copy regularization added to the loss: none for the seed's generator (zeros, shape (copies,))."""
        return self.conv.bias.new_zeros(self.copies)

    def mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """Where the generator perturbs (copies×1×H×W in [0, 1]); None: the seed's generator perturbs everywhere."""
        return None

    def perturb(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(:meth:`forward` of ``x``, the image the preservation game scores or None): the seed's generator
        plays only the deletion game, so None."""
        return self(x), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.copies > 1 and n != self.copies:
            raise ValueError(f"this generator holds {self.copies} copies; it cannot perturb a batch of {n}")
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        grouped = self.copies > 1
        y = x.reshape(1, 3 * n, h, w) if grouped else x  # the copies side by side as channel groups
        for _ in range(self.nblocks):
            for _ in range(self.nlayers):
                y = self.conv(y)
            y = torch.relu(y)
        return lo + (hi - lo) * _unit_range(y.reshape(n, 3, h, w) if grouped else y)


def blurred(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """A Gaussian-blurred copy (σ in px, torchvision's kernel of side 2·⌊2σ⌋ + 1) of an N×3×H×W tensor."""
    kernel = 2 * int(2 * sigma) + 1
    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


class MaskedPerturbationGenerator(PerturbationGenerator):
    """A removal applied only where a learned mask says: x_pert = m·r(x) + (1 − m)·x.

    Kind ``"masked"``. The removal r (``removal``, :data:`REMOVALS`) is G(x), the seed's generator
    (:class:`PerturbationGenerator`, same arguments), trained with the mask, or the image :func:`blurred`
    (σ = :data:`BLUR_SIGMA` px; G then goes unused and the mask alone learns). The mask m ∈ [0, 1]
    (1 = perturbed) is the sigmoid of a ``mask_size``×``mask_size`` grid of logits per copy, upsampled
    bilinearly to the image's H×W, so it is smooth by construction. The logits start at
    ``INITIAL_LOGIT`` (m ≈ 0.95 everywhere: the image almost wholly perturbed,
    the class score already low) and the area term shrinks the mask to what the
    score needs; from m = 0.5 the score is often still saturated near 1, gives
    no gradient, and the area term alone collapses the mask to nothing
    (measured: one scene in eight). :meth:`penalty` charges each copy ``area_coeff`` ×
    mean(m) (area) + ``tv_coeff`` × mean |∇m|³ (total variation) — Fong &
    Vedaldi's (2017) mask priors. The explanation is then *where the mask had to act*
    (:meth:`mask`), not where the perturbation changed pixels most.

    With ``preserve_coeff`` c > 0 it also plays Fong et al.'s (2019) preservation game:
    :meth:`perturb` returns, beside x_pert, x_keep = m·x + (1 − m)·r(x) (the image perturbed
    *outside* the mask, r(x) detached so that only the mask learns from it), and the
    optimization adds c·(1 − p_target(x_keep)) to the loss: the mask must cover all the
    evidence the class needs, not only enough of it to delete.
    """

    KIND: ClassVar[str] = "masked"
    INITIAL_LOGIT = 3.0

    def __init__(self, kernel_size: int = GeneratorSettings.kernel_size, nblocks: int = GeneratorSettings.nblocks,
                 nlayers: int = GeneratorSettings.nlayers, *, copies: int = 1,
                 mask_size: int = GeneratorSettings.mask_size, area_coeff: float = GeneratorSettings.area_coeff,
                 tv_coeff: float = GeneratorSettings.tv_coeff, preserve_coeff: float = GeneratorSettings.preserve_coeff,
                 removal: str = GeneratorSettings.removal):
        super().__init__(kernel_size, nblocks, nlayers, copies=copies)
        self.settings = replace(self.settings, mask_size=mask_size, area_coeff=area_coeff, tv_coeff=tv_coeff,
                                preserve_coeff=preserve_coeff, removal=removal)
        size = self.settings.mask_size
        self.logits = nn.Parameter(torch.full((self.copies, 1, size, size), self.INITIAL_LOGIT))
        self.area_coeff, self.tv_coeff = self.settings.area_coeff, self.settings.tv_coeff
        self.preserve_coeff, self.removal = self.settings.preserve_coeff, self.settings.removal
        self._blur_cache: tuple[torch.Tensor, bool, torch.Tensor] | None = None  # x, autocast on, blurred(x)

    @classmethod
    def from_settings(cls, settings: GeneratorSettings, copies: int = 1) -> MaskedPerturbationGenerator:
        return cls(settings.kernel_size, settings.nblocks, settings.nlayers, copies=copies,
                   mask_size=settings.mask_size, area_coeff=settings.area_coeff, tv_coeff=settings.tv_coeff,
                   preserve_coeff=settings.preserve_coeff, removal=settings.removal)

    def penalty(self) -> torch.Tensor:
        """area_coeff · mean(m) + tv_coeff · total_variation(m), on the low-resolution mask; shape (copies,)."""
        m = torch.sigmoid(self.logits)
        return self.area_coeff * m.mean(dim=(1, 2, 3)) + self.tv_coeff * total_variation(m)

    def mask(self, size: tuple[int, int]) -> torch.Tensor:
        """The mask upsampled to ``size`` = (H, W): copies×1×H×W in [0, 1], 1 = perturbed."""
        return nn.functional.interpolate(torch.sigmoid(self.logits), size=size, mode="bilinear",
                                         align_corners=False)

    def removed(self, x: torch.Tensor) -> torch.Tensor:
        """r(x), what replaces ``x`` under the mask (shaped as ``x``): G(x), or :func:`blurred` ``x``.
        The blur of the tensor last given is kept (an optimization passes the same ``x`` at every step), apart
        for autocast (bf16) and full precision."""
        if self.removal == "learned":
            return super().forward(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        if self._blur_cache is None or self._blur_cache[0] is not x or self._blur_cache[1] != autocast:
            self._blur_cache = (x, autocast, blurred(x))
        return self._blur_cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask(tuple(x.shape[-2:])).to(x.dtype)
        return m * self.removed(x) + (1 - m) * x

    def perturb(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_pert = m·r(x) + (1 − m)·x, x_keep = m·x + (1 − m)·r(x) with r(x) detached), both shaped as ``x``;
        x_keep is None when ``preserve_coeff`` is 0 (no preservation game)."""
        if not self.preserve_coeff:
            return self(x), None
        m = self.mask(tuple(x.shape[-2:])).to(x.dtype)
        r = self.removed(x)
        return m * r + (1 - m) * x, m * x + (1 - m) * r.detach()


def total_variation(m: torch.Tensor, power: float = 3.0) -> torch.Tensor:
    """Per-image mean of |∇m|^power over vertical and horizontal neighbours of an N×C×h×w mask; shape (N,)."""
    return ((m[..., 1:, :] - m[..., :-1, :]).abs() ** power).mean(dim=(1, 2, 3)) + \
        ((m[..., :, 1:] - m[..., :, :-1]).abs() ** power).mean(dim=(1, 2, 3))


def _unit_range(y: torch.Tensor) -> torch.Tensor:
    """Rescale each image of N×C×H×W to [0, 1]; a constant image becomes all zeros (never NaN)."""
    y_min = y.amin(dim=(1, 2, 3), keepdim=True)
    span = y.amax(dim=(1, 2, 3), keepdim=True) - y_min
    return (y - y_min) / span.clamp_min(torch.finfo(y.dtype).tiny)


#: Generator classes by kind (the ``generator`` setting): each builds itself from :class:`GeneratorSettings`.
GENERATORS: Mapping[str, type[PerturbationGenerator]] = MappingProxyType(
    {cls.KIND: cls for cls in (PerturbationGenerator, MaskedPerturbationGenerator)})


def make_generator(settings: GeneratorSettings | None = None, *, seed: int = 0, copies: int = 1,
                   **values) -> PerturbationGenerator:
    """A new generator of kind ``settings.kind`` (:data:`GENERATORS`), its weights drawn from random seed
    ``seed`` without touching the caller's global RNG state, so the same seed gives the same generator.

    ``settings`` defaults to the seed preset's; ``values`` change settings by name:
    ``make_generator(kernel_size=5, seed=1)``, ``make_generator(generator="masked")``.
    """
    settings = _stage_settings(settings, GeneratorSettings, values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GENERATORS[settings.kind].from_settings(settings, copies)


# --------------------------------------------------------------------------- optimization

@dataclass
class OptimizationResult:
    """What :func:`optimize_perturbation` found.

    ``perturbed`` is the final generator's output (1×3×H×W, detached);
    ``original_score``/``perturbed_score`` are the target's softmax probability
    for the input and for ``perturbed``; histories hold one value per step;
    ``mask`` is a masked generator's final mask (1×1×H×W in [0, 1], 1 =
    perturbed), None for the seed's generator.
    """

    perturbed: torch.Tensor
    target: int
    original_score: float
    perturbed_score: float
    losses: np.ndarray
    probabilities: np.ndarray
    l1s: np.ndarray
    steps_run: int
    seconds: float
    mask: torch.Tensor | None


def optimize_perturbation(model: nn.Module, x: torch.Tensor, generator: PerturbationGenerator, target: int,
                          settings: OptimizationSettings | None = None, *, progress: bool | tqdm = True,
                          callback: Callable[[int, float], None] | None = None, **values) -> OptimizationResult:
    """Train ``generator`` so that ``model`` loses confidence in ``target`` on ``generator(x)``.

    ``settings`` (default: the seed preset's :class:`OptimizationSettings`), with
    ``values`` changing some by name (``steps=300``), say how. The seed's loss: softmax probability of ``target`` + ``l1_coeff`` ·
    mean|x − x_pert| (+ the generator's :meth:`~PerturbationGenerator.penalty`,
    zero for the seed's), minimized with Adam (``lr``) over the generator's
    parameters only, for ``steps`` steps — or fewer with ``patience`` > 0 (see
    :func:`converged`). With ``jitter`` > 0 the perturbed image is shifted
    (rolled) by up to ``jitter`` px before each step's forward pass (Fong &
    Vedaldi's guard against adversarial masks; the shifts come from a fixed
    seed, so a run is reproducible). ``x`` is a normalized 1×3×H×W tensor; the work runs on
    its device (the generator is moved there). The model is frozen for the
    duration and restored afterwards. ``callback(step, probability)``, when
    given, is called after every step (step counts from 1), e.g. to drive a
    progress widget. :func:`optimize_perturbations` does the same for a batch.
    """
    return optimize_perturbations(model, x, generator, [target], settings, progress=progress,
                                  callback=_first_image(callback), **values)[0]


def optimize_perturbations(model: nn.Module, x: torch.Tensor, generator: PerturbationGenerator,
                           targets: Sequence[int], settings: OptimizationSettings | None = None, *,
                           progress: bool | tqdm = True, callback: Callable[[int, np.ndarray], None] | None = None,
                           **values) -> list[OptimizationResult]:
    """:func:`optimize_perturbation` for n images at once: one result per image, in order.

    ``x`` is n×3×H×W, ``targets`` n class indices, ``generator`` holds n copies
    (:meth:`PerturbationGenerator.stack`). The summed loss of the n images is
    minimized; image i's loss depends on copy i only and Adam works element by
    element, so image i gets the result of a separate run (up to floating-point
    rounding). With ``patience`` > 0 each image stops at the first step where
    :func:`converged` holds for it, and its copy leaves the batch. With
    ``precision="bf16"`` the forward passes run under ``torch.autocast`` in
    bfloat16; the final perturbed images and their scores are computed in fp32.
    A result's ``seconds`` is the wall time from the start until that image
    finished. ``callback(step, probabilities)`` gets the target probabilities
    of the images still running. ``settings.runs`` is :func:`explain_batch`'s, not read here. ``progress``:
    show a progress bar of the steps (True), none (False), or advance a tqdm bar of the caller's by ``steps``;
    a run that stops early fills the rest of its steps (and says so in a bar of its own).
    """
    settings = _stage_settings(settings, OptimizationSettings, values)
    steps, lr, patience, jitter = settings.steps, settings.lr, settings.patience, settings.jitter
    n = x.shape[0]
    if len(targets) != n or generator.copies != n:
        raise ValueError(f"{n} images need {n} targets and a generator with {n} copies, "
                         f"got {len(targets)} and {generator.copies}")
    generator = _in_cpu_layout(generator.to(x.device), x)
    if x.device.type == "cpu":  # measured 2.5x faster for the generator's 3-channel convs on CPU
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    running = list(range(n))  # images still optimizing, as indices into the batch
    targets = torch.as_tensor(list(targets), device=x.device)
    xs, ts = x, targets  # the running images and their targets
    history = np.zeros((n, steps, 3))  # loss, probability, L1 of each image at each step
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=torch.Generator().manual_seed(0)).tolist()
    results: list[OptimizationResult | None] = [None] * n
    start = time.perf_counter()
    own_bar = isinstance(progress, bool)  # else the caller's bar, which stays open
    bar = tqdm(total=steps, desc="optimizing", unit="step", disable=not progress, leave=False) if own_bar else progress
    with frozen(model), (bar if own_bar else nullcontext(bar)):
        originals = class_probabilities(model, x)[torch.arange(n), targets].tolist()
        for step in range(1, steps + 1):
            bar.update(1)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
                x_pert, x_keep = generator.perturb(xs)
                scored = x_pert if x_keep is None else torch.cat([x_pert, x_keep])  # one forward pass for both
                logits = model(torch.roll(scored, shifts[step - 1], dims=(2, 3)) if jitter else scored)
            scores = torch.softmax(logits.float(), dim=1)[torch.arange(len(scored)), ts.repeat(len(scored) // len(ts))]
            probabilities = scores[:len(running)]
            l1s = (xs - x_pert.float()).abs().mean(dim=(1, 2, 3))
            losses = probabilities + settings.l1_coeff * l1s + generator.penalty()
            if x_keep is not None:
                losses = losses + generator.preserve_coeff * (1 - scores[len(running):])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            history[running, step - 1] = torch.stack([losses, probabilities, l1s], dim=1).detach().cpu().numpy()
            _check_finite(history[running, step - 1, 0], f"the loss at step {step}", lr)
            if callback is not None:
                callback(step, history[running, step - 1, 1])
            done = [k for k, i in enumerate(running) if step == steps or (
                patience and converged(history[i, :step, 0], history[i, :step, 1], originals[i], patience))]
            if not done:
                continue
            with torch.no_grad():
                x_pert = generator(xs)
                finals = class_probabilities(model, x_pert)[torch.arange(len(running)), ts]
                _check_finite(finals.cpu().numpy(), "the perturbed image's score after the last step", lr)
                masks = generator.mask(tuple(x.shape[-2:]))
            for k in done:
                i = running[k]
                losses_i, probabilities_i, l1s_i = history[i, :step].T
                results[i] = OptimizationResult(x_pert[k:k + 1].detach(), int(targets[i]), originals[i],
                                                float(finals[k]), losses_i, probabilities_i, l1s_i, step,
                                                time.perf_counter() - start,
                                                None if masks is None else masks[k:k + 1].contiguous())
            keep = [k for k in range(len(running)) if k not in done]
            if not keep:
                bar.update(steps - step)
                if own_bar and step < steps:
                    bar.set_postfix_str(f"stopped early at step {step} of {steps} (converged)")
                break
            generator, optimizer = _keep_copies(generator, optimizer, keep, lr, x)
            running = [running[k] for k in keep]
            xs, ts = x[running], targets[running]
    return results


def _check_finite(values: np.ndarray, what: str, lr: float) -> None:
    """Stop the optimization with a ValueError when ``values`` hold NaN or inf (never return a NaN result)."""
    if not np.isfinite(values).all():
        raise ValueError(f"the optimization diverged: {what} is {values[~np.isfinite(values)][0]} "
                         f"(with lr {lr:g}; a smaller lr, or a model that stays finite on perturbed images, "
                         f"avoids this)")


def _first_image(callback: Callable[[int, float], None] | None) -> Callable[[int, np.ndarray], None] | None:
    """A batch callback ``(step, probabilities)`` that calls a one-image ``callback(step, probability)``."""
    return None if callback is None else (lambda step, probabilities: callback(step, float(probabilities[0])))


def _in_cpu_layout(generator: PerturbationGenerator, x: torch.Tensor) -> PerturbationGenerator:
    """``generator`` in channels_last when ``x`` is on the CPU (measured faster there), else unchanged."""
    return generator.to(memory_format=torch.channels_last) if x.device.type == "cpu" else generator


def _keep_copies(generator: PerturbationGenerator, optimizer: torch.optim.Adam, keep: Sequence[int],
                 lr: float, x: torch.Tensor) -> tuple[PerturbationGenerator, torch.optim.Adam]:
    """A generator with only copies ``keep`` of ``generator``, and an Adam that goes on from ``optimizer``'s state."""
    kept = _in_cpu_layout(generator._with_copies(len(keep)), x)
    kept_optimizer = torch.optim.Adam(kept.parameters(), lr=lr)
    with torch.no_grad():
        for old, new in zip(generator.parameters(), kept.parameters()):
            per_copy = old.shape[0] // generator.copies  # a parameter's rows: copy after copy
            rows = torch.tensor([per_copy * k + r for k in keep for r in range(per_copy)], device=x.device)
            new.copy_(old[rows])
            kept_optimizer.state[new] = {name: value[rows].clone() if value.dim() else value.clone()
                                         for name, value in optimizer.state[old].items()}
    return kept, kept_optimizer


#: The stopping rule of :func:`converged`: the target's probability must stay below this
#: fraction of its original value ...
STOP_PROBABILITY = 0.1
#: ... and the best loss must improve by less than this fraction of itself.
STOP_IMPROVEMENT = 0.01


def converged(losses: Sequence[float], probabilities: Sequence[float], original: float, patience: int) -> bool:
    """The stopping rule, on one image's loss and probability histories so far (one value per step).

    True when, over the last ``patience`` steps, the target's probability stayed
    below ``STOP_PROBABILITY`` × ``original`` (its probability for the unperturbed
    image) *and* the lowest loss among them is less than ``STOP_IMPROVEMENT``
    (relatively) below the lowest loss before them. It needs ``2 × patience``
    steps of history; ``patience`` 0 never stops. The probability alone would
    stop at once: a random generator wrecks the image, so the probability is
    usually below 1% after the first step; the real work is the L1 term pulling
    the image back, which is what the loss condition waits for.
    """
    t = len(losses)
    if patience < 1 or t < 2 * patience:
        return False
    losses, probabilities = np.asarray(losses), np.asarray(probabilities)
    if not (probabilities[t - patience:] < STOP_PROBABILITY * original).all():
        return False
    best_before, best_recent = losses[:t - patience].min(), losses[t - patience:].min()
    return bool(best_before - best_recent < STOP_IMPROVEMENT * best_before)


def run_converged(result: OptimizationResult, settings: OptimizationSettings) -> bool:
    """Whether an optimization run with ``settings`` converged: it stopped before ``settings.steps`` (the
    stopping rule held), or :func:`converged` holds on its whole history. With ``patience`` 0 (the seed
    preset, which never stops early) the rule is judged with the fast preset's patience."""
    if result.steps_run < settings.steps:
        return True
    patience = settings.patience or SETTINGS["patience"].value_in("fast")
    return converged(result.losses, result.probabilities, result.original_score, patience)


# --------------------------------------------------------------------------- post-processing

def difference_map(x: torch.Tensor, x_pert: torch.Tensor,
                   difference: str = PostprocessingSettings.difference) -> np.ndarray:
    """x − x_pert reduced over channels to an H×W float64 map.

    ``"signed-mean"`` (the seed's): channel mean of x minus channel mean of
    x_pert, so opposite changes in two channels cancel; ``"abs-sum"``:
    Σ_c |x_c − x_pert,c|, which cannot cancel.
    """
    if difference == "signed-mean":
        return channel_mean(x).astype(np.float64) - channel_mean(x_pert)
    if difference == "abs-sum":
        return (x[0] - x_pert[0]).abs().sum(0).detach().cpu().double().numpy()
    raise ValueError(f"unknown difference {difference!r} (known: {', '.join(DIFFERENCES)})")


def sharpen(diff: np.ndarray, power: float = PostprocessingSettings.power) -> np.ndarray:
    """|diff| ** power: a soft threshold that keeps the largest differences (≥ 0, H×W)."""
    return np.abs(diff) ** power


def crop_border(saliency: np.ndarray, border: float = PostprocessingSettings.border) -> np.ndarray:
    """A copy with a ``border`` fraction of rows and columns zeroed on every side (the seed's 10%)."""
    h, w = saliency.shape
    out = np.zeros_like(saliency)
    rows = slice(int(border * h), int((1 - border) * h))
    cols = slice(int(border * w), int((1 - border) * w))
    out[rows, cols] = saliency[rows, cols]
    return out


def dilate(saliency: np.ndarray, dilation: int = PostprocessingSettings.dilation) -> np.ndarray:
    """Grey dilation with a ``dilation``×``dilation`` square (scikit-image, as the seed)."""
    return morphology.dilation(saliency, np.ones((dilation, dilation), dtype=bool))


def smooth(saliency: np.ndarray, sigma: float = PostprocessingSettings.smoothing) -> np.ndarray:
    """Gaussian blur with σ = ``sigma`` px (SciPy); 0 returns the map unchanged.

    Unlike :func:`dilate`, which keeps every peak, a blur ranks regions by their
    mass: after it the map's maximum marks the largest strongly salient region,
    not a small isolated spot. The seed does not smooth (0); the masked preset
    blurs its mask by 4 px (half a mask cell: 224 / 28 = 8 px) before the power.
    """
    return ndimage.gaussian_filter(saliency, sigma) if sigma > 0 else saliency


def center_of_mass(saliency: np.ndarray) -> tuple[float, float] | None:
    """The map's center of mass as (row, col) in pixels, or None for an all-zero map."""
    if not saliency.any():
        return None
    row, col = ndimage.center_of_mass(saliency)
    return float(row), float(col)


def saliency_map(x: torch.Tensor, x_pert: torch.Tensor, settings: PostprocessingSettings | None = None, *,
                 mask: torch.Tensor | None = None, **values) -> np.ndarray:
    """All post-processing stages: difference → smooth → sharpen → crop border → dilate. H×W float32, ≥ 0.

    ``x``, ``x_pert``: normalized 1×3×H×W tensors. ``settings`` (default: the
    seed preset's :class:`PostprocessingSettings`), with ``values`` changing
    some by name (``power=2``). With a masked generator's ``mask`` (1×1×H×W in
    [0, 1]) the first stage is the mask itself — where the perturbation had to
    act — instead of the difference.
    """
    s = _stage_settings(settings, PostprocessingSettings, values)
    source = difference_map(x, x_pert, s.difference) if mask is None else mask[0, 0].detach().cpu().double().numpy()
    return dilate(crop_border(sharpen(smooth(source, s.smoothing), s.power), s.border), s.dilation).astype(np.float32)


# --------------------------------------------------------------------------- explain

@dataclass
class Explanation(OptimizationResult):
    """Everything :func:`explain` found for one image: the optimization's result and more.

    ``input``/``perturbed``: normalized 1×3×H×W tensors; ``saliency``: H×W
    float32 ≥ 0; ``center_of_mass``: (row, col) in pixels of the H×W map, or
    None when the map is all zero; ``label``: the target's class name;
    ``predictions``: the model's top 5 for ``input``; ``settings``: every
    setting used; ``seed``: the random seed of the (first) generator;
    ``mapping``: where ``input`` (and so the map) lies in the original image
    (:meth:`saliency_at` gives the map at the photo's resolution);
    ``runs_steps``/``runs_converged``: each run's steps and whether it converged
    (:attr:`converged`); the other optimization fields are the first run's;
    ``removed_score``: with the blur removal, the target's probability for the wholly blurred input, the
    lowest the blur can take it (None for the other removals).
    """

    input: torch.Tensor
    saliency: np.ndarray
    center_of_mass: tuple[float, float] | None
    label: str
    settings: Settings
    model_name: str
    predictions: list[Prediction]
    preprocessing: Preprocessing = field(repr=False)
    seed: int = 0
    mapping: PhotoMapping | None = None
    runs_steps: tuple[int, ...] = ()
    runs_converged: tuple[bool, ...] = ()
    removed_score: float | None = None

    @property
    def converged(self) -> bool:
        """Whether every run converged (:func:`run_converged`): stopped early by the stopping rule, or
        met it at its last step."""
        if self.runs_converged:
            return all(self.runs_converged)
        return run_converged(self, self.settings.optimization)

    def result_line(self) -> str:
        """The run in one line: the target's score before → after, where it stopped, and whether it
        converged, with what to try when it did not; e.g. ``score 0.98 → 0.0031 (target 'star'), stopped
        at step 142 of 300 (converged)``."""
        steps = self.settings.optimization.steps
        scores = f"score {self.original_score:.2g} → {self.perturbed_score:.2g} (target {self.label!r})"
        runs = self.runs_steps or (self.steps_run,)
        where = (f"stopped at step {runs[0]}" if len(runs) == 1 else
                 f"{len(runs)} runs stopped at steps {', '.join(map(str, runs))}") + f" of {steps}"
        if self.converged:
            return f"{scores}, {where} (converged)"
        if self.perturbed_score < STOP_PROBABILITY * self.original_score:
            return f"{scores}, {where}, not converged: the loss was still falling; more --steps may change the map"
        if self.removed_score is not None and self.perturbed_score < self.removed_score + STOP_PROBABILITY * (
                self.original_score - self.removed_score):
            return (f"{scores}, {where}: the wholly blurred image still scores {self.removed_score:.2g}, so a blur "
                    f"cannot take the class lower; the map shows where blurring lowers it (--removal learned "
                    f"can change more than detail)")
        seed = "" if self.settings == Settings.from_preset("seed") else " or --preset seed"
        return f"did not converge: {scores} in {steps} steps; try more --steps, a higher --lr{seed}"

    def photo_mapping(self) -> PhotoMapping:
        """``mapping``, or, for an explanation made without one, the identity (the input is the photo)."""
        if self.mapping is not None:
            return self.mapping
        shape = tuple(self.saliency.shape)
        return PhotoMapping(shape, shape, (0, 0, *shape))

    def saliency_at(self, size: int | tuple[int, int] | None = None, fill: float = np.nan) -> np.ndarray:
        """The saliency map at the original photo's resolution: a new float64 H×W array, ``saliency``'s
        values (not rescaled) placed back where the model's input came from (:class:`PhotoMapping`).

        ``size``: None for the photo's own (height, width) (``mapping.original``);
        an int for the photo scaled so that its longest side has that many px
        (aspect ratio kept); or (height, width). Stretch preprocessing used the
        whole photo, so the map covers it all, stretched back to the photo's
        aspect ratio; a resize + center crop saw only the crop, so outside the
        crop's box the map is ``fill``: NaN by default (the model never saw those
        pixels — ``np.nanmax`` and friends skip them), or pass ``fill=0.0``.
        :func:`relative_importance` scales the result to [0, 1].
        """
        mapping = self.photo_mapping()
        if size is None:
            size = mapping.original
        elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            if size < 1:
                raise ValueError(f"size must be a positive number of pixels, got {size}")
            scale = size / max(mapping.original)
            size = tuple(max(1, round(n * scale)) for n in mapping.original)
        return mapping.to_original(self.saliency, fill=fill, size=size)

    @property
    def hyperparameters(self) -> dict:
        """Every setting by name, as one flat dict (``settings.as_dict()``)."""
        return self.settings.as_dict()

    def summary(self) -> dict:
        """A JSON-ready dict: model, target, scores, center of mass, steps, time, the preprocessing (how the
        image became the input, and where the input lies in it) and every setting."""
        return {
            "model": self.model_name, "target": self.target, "label": self.label,
            "original_score": self.original_score, "perturbed_score": self.perturbed_score,
            "center_of_mass": None if self.center_of_mass is None else list(self.center_of_mass),
            "steps_run": self.steps_run, "converged": self.converged, "removed_score": self.removed_score,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
            "device": str(self.input.device), "preprocessing": self.preprocessing.describe(),
            "mapping": None if self.mapping is None else self.mapping.as_dict(), **self.hyperparameters,
            "top5": [{"index": p.index, "label": p.label, "probability": p.probability}
                     for p in self.predictions],
        }


def explain(image: str | os.PathLike | np.ndarray | Image.Image,
            model: str | nn.Module | LoadedModel = "auto", *, preset: str | None = None,
            settings: Settings | None = None, target: int | None = None, seed: int = 0,
            device: torch.device | str | None = None, weights_path: str | os.PathLike | None = None,
            verbose: bool = True, callback: Callable[[int, float], None] | None = None, **values) -> Explanation:
    """Explain why ``model`` gives ``image`` its top class (or class ``target``): the seed's ``main()``.

    ``image`` is anything :func:`read_image` takes; ``model`` is
    anything :func:`load_model` takes (or a :class:`LoadedModel`). The settings
    (:data:`SETTINGS`; the README's table) come from ``preset`` (default
    :data:`DEFAULT_PRESET`, the masked generator that also learns where to
    perturb; ``"seed"`` is the seed's method and values exactly, ``"fast"`` the
    seed's method on the project's fast schedule) or from a :class:`Settings`
    object, with ``values`` changing some by name (``lr=0.05``). ``seed`` fixes
    the generator's initialisation, so a run is reproducible on the same device.
    With ``verbose`` the top-5 assessment is printed, a progress bar shown and
    :meth:`Explanation.result_line` printed after the run; ``callback`` goes to
    :func:`optimize_perturbation`. The embedded ``"shapes"`` model warns
    (:class:`ShapesModelWarning`) when the image is not one of its scenes.
    """
    return explain_batch([image], model, preset=preset, settings=settings,
                         targets=None if target is None else [target], seed=seed, device=device,
                         weights_path=weights_path, verbose=verbose, callback=_first_image(callback), **values)[0]


def explain_batch(images: Sequence[str | os.PathLike | np.ndarray | Image.Image],
                  model: str | nn.Module | LoadedModel = "auto", *, preset: str | None = None,
                  settings: Settings | None = None, targets: Sequence[int] | None = None, seed: int = 0,
                  device: torch.device | str | None = None, weights_path: str | os.PathLike | None = None,
                  verbose: bool = True, callback: Callable[[int, np.ndarray], None] | None = None,
                  **values) -> list[Explanation]:
    """:func:`explain` for several images in one optimization: one Explanation per image, in order.

    Each image gets its own generator, initialised from ``seed`` exactly as
    :func:`explain` would, as one copy of a grouped generator
    (:meth:`PerturbationGenerator.stack`); so each result is that of
    ``explain(image, seed=seed)`` up to floating-point rounding. A GPU runs the
    copies in parallel; a CPU is already busy with one image, and measured no
    faster batched (README, "Performance"). ``targets``: one class index per
    image (default: each image's top class). With ``runs`` > 1 (the masked
    generator) the batch is optimized ``runs`` times, from seeds ``seed``,
    ``seed + 1``, …, and each image's map comes from the geometric mean of its
    runs' masks; the other fields are the first run's, ``seconds`` the sum.
    ``callback(step, probabilities)`` gets the target probabilities of the
    images still running, run after run. Memory grows with the number of
    images: split a long list into batches of about 16.
    """
    settings = _resolve_settings(preset, settings, values)
    _check_seed(seed)
    if len(images) == 0:
        raise ValueError("no images to explain")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(images)} images need {len(images)} targets, got {len(targets)}")
    loaded = load_model(model, device=device, weights_path=weights_path)
    arrays = [read_image(image) for image in images]
    _warn_if_not_embedded(loaded, arrays)
    x = torch.cat([loaded.preprocessing(array, device=loaded.device) for array in arrays])
    with frozen(loaded.model):
        probs = checked_probabilities(loaded, x)
    predictions = [_top_k(p, loaded, 5) for p in probs]
    if verbose:
        print("\n".join(format_predictions(p) for p in predictions))
    targets = [p[0].index for p in predictions] if targets is None else list(targets)
    for target in targets:
        _check_target(target, probs.shape[1])
    runs = _optimization_runs(loaded, x, targets, settings, seed, verbose, callback)  # runs[r][i]: run r, image i
    removed_scores = [None] * len(images)
    if settings.generator.kind == "masked" and settings.generator.removal == "blur":
        with frozen(loaded.model):
            removed_scores = class_probabilities(loaded.model, blurred(x))[torch.arange(len(x)), targets].tolist()
    explanations = []
    for i in range(len(images)):
        xi = x[i:i + 1]
        result = _combined_runs([results[i] for results in runs])
        saliency = saliency_map(xi, result.perturbed, settings.postprocessing, mask=result.mask)
        explanations.append(Explanation(
            **vars(result), input=xi, saliency=saliency, center_of_mass=center_of_mass(saliency),
            label=loaded.label(result.target), settings=settings, model_name=loaded.name,
            predictions=predictions[i], preprocessing=loaded.preprocessing, seed=seed,
            mapping=loaded.preprocessing.mapping(arrays[i]),
            runs_steps=tuple(results[i].steps_run for results in runs),
            runs_converged=tuple(run_converged(results[i], settings.optimization) for results in runs),
            removed_score=removed_scores[i]))
    if verbose:
        print("\n".join(e.result_line() for e in explanations))
    return explanations


def _optimization_runs(loaded: LoadedModel, x: torch.Tensor, targets: Sequence[int], settings: Settings, seed: int,
                       verbose: bool, callback) -> list[list[OptimizationResult]]:
    """``settings.optimization.runs`` optimizations of the n×3×H×W batch ``x``, from generator seeds ``seed``,
    ``seed + 1``, …: one list of n results per run. With ``verbose``, one progress bar for all the runs' steps,
    which says where each run stopped."""
    n_runs, steps = settings.optimization.runs, settings.optimization.steps
    runs = []
    with tqdm(total=n_runs * steps, desc="optimizing", unit="step", disable=not verbose) as bar:
        for run in range(n_runs):
            if n_runs > 1:
                bar.set_description(f"optimizing, run {run + 1} of {n_runs}")
            generator = PerturbationGenerator.stack([make_generator(settings.generator, seed=seed + run)] * len(x))
            runs.append(optimize_perturbations(loaded.model, x, generator, targets, settings.optimization,
                                               progress=bar, callback=callback))
            stops = [max(r.steps_run for r in results) for results in runs]
            bar.set_postfix_str(f"stopped at step {stops[0]} of {steps}" if n_runs == 1 else "stopped: " + ", ".join(
                f"run {k + 1} at step {stop}" for k, stop in enumerate(stops)) + f" (of {steps})")
    return runs


def _resolve_settings(preset: str | None, settings: Settings | None, values: Mapping[str, object]) -> Settings:
    """``settings`` or preset ``preset``'s, with ``values`` changed by name; not both a preset and settings."""
    if settings is None:
        return Settings.from_preset(preset, **values)
    if preset is not None:
        raise ValueError(f"give a preset or a Settings object, not both (got preset {preset!r})")
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a deepexplain.Settings, got {type(settings).__name__}")
    return settings.updated(**values)


def _combined_runs(results: Sequence[OptimizationResult]) -> OptimizationResult:
    """One result from several runs on one image: the first run's, with the geometric mean of all runs'
    masks (a region stays only where every run put it) and the runs' seconds summed."""
    if len(results) == 1:
        return results[0]
    mask = torch.stack([r.mask for r in results]).prod(dim=0) ** (1 / len(results))
    return replace(results[0], mask=mask, seconds=sum(r.seconds for r in results))


def _check_seed(seed: int) -> None:
    """A generator seed must be an integer that torch takes, also after adding the run number."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not -2**62 <= seed <= 2**62:
        raise ValueError(f"seed must be an integer in [-2**62, 2**62], got {seed}")


def _check_target(target: int, num_classes: int) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"a target class must be an integer index, got {type(target).__name__} {target!r}")
    if not 0 <= target < num_classes:
        raise ValueError(f"target class {target} is out of range: the model has {num_classes} classes "
                         f"(0 to {num_classes - 1})")


def with_postprocessing(explanation: Explanation, settings: PostprocessingSettings | None = None,
                        **values) -> Explanation:
    """A copy of ``explanation`` with its map recomputed (no re-optimization) for other post-processing
    ``settings`` (default: the explanation's own), with ``values`` changing some by name (``power=2``)."""
    post = _stage_settings(settings or explanation.settings.postprocessing, PostprocessingSettings, values)
    saliency = saliency_map(explanation.input, explanation.perturbed, post, mask=explanation.mask)
    return replace(explanation, saliency=saliency, center_of_mass=center_of_mass(saliency),
                   settings=replace(explanation.settings, postprocessing=post))


# --------------------------------------------------------------------------- plots

#: The colour map of every saliency figure: :func:`plot_panels`, :func:`plot_overlay`, the command line's
#: PNGs and the widget panels.
SALIENCY_CMAP = "turbo"
#: The label of every saliency figure's colour bar: the map divided by its peak, so 1 marks the most important
#: pixel and 0 one that did not matter.
IMPORTANCE_LABEL = "relative importance"
#: The longest side, in pixels, of a photo drawn under its map (:func:`plot_overlay` with ``image=``).
OVERLAY_MAX_SIDE = 1024


def relative_importance(saliency: np.ndarray) -> np.ndarray:
    """A map divided by its peak: a new float array in [0, 1] (1 at the maximum; all zeros for an all-zero
    map), NaN where ``saliency`` is NaN (outside the model's input, :meth:`Explanation.saliency_at`)."""
    saliency = np.asarray(saliency, dtype=float)
    peak = np.nanmax(saliency) if np.isfinite(saliency).any() else 0.0
    return saliency / peak if peak > 0 else np.where(np.isnan(saliency), np.nan, 0.0)


def _new_axes(ax, ncols: int = 1, width: float = 4.0, height: float | None = None):
    """The given axes (one or a sequence) with their figure, or a new figure with ``ncols`` axes."""
    if ax is None:
        fig, ax = plt.subplots(ncols=ncols, figsize=(width * ncols, width if height is None else height))
        return fig, ax
    first = ax[0] if isinstance(ax, (list, tuple, np.ndarray)) else ax
    return first.figure, ax


def _score(p: float) -> str:
    """A probability in two decimals from 0.1 up (1.00, 0.98, 0.50), else in two significant digits (0.021,
    0.0031, 4.2e-05)."""
    return f"{p:.2f}" if p >= 0.1 else f"{p:.2g}"


def _scores_title(explanation: Explanation) -> str:
    """"star: 0.98 → 0.021": the class and its probability before → after the perturbation."""
    return f"{explanation.label}: {_score(explanation.original_score)} → {_score(explanation.perturbed_score)}"


def _outline(ax, mask: np.ndarray | None) -> None:
    """The object's outline (a white line on a dark edge, visible on any colour) where ``mask`` is known."""
    if mask is not None and np.asarray(mask).any() and not np.asarray(mask).all():
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="white", linewidths=1.4,
                   path_effects=[_stroke()])


def _stroke():
    from matplotlib import patheffects

    return patheffects.withStroke(linewidth=3, foreground="black")


def _mark_center(ax, com: tuple[float, float] | None, size: float = 11) -> None:
    """Draw the center of mass, given as (row, col), at matplotlib's (x=col, y=row): a white × edged in black."""
    if com is not None:
        ax.plot(com[1], com[0], "X", markersize=size, markerfacecolor="white", markeredgecolor="black",
                markeredgewidth=1.2, linestyle="none", label="center of mass")


def _legend(ax, with_outline: bool) -> None:
    """A small legend for the marks: the center of mass, and the outline where one is drawn."""
    from matplotlib.lines import Line2D

    handles = [h for h in ax.get_lines() if h.get_label() == "center of mass"]
    if with_outline:
        handles.append(Line2D([], [], color="white", linewidth=1.4, path_effects=[_stroke()], label="object"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize="x-small", framealpha=0.7)


def _grey(image: np.ndarray) -> np.ndarray:
    """An H×W×3 image (uint8, or floats in [0, 1]) as its luminance in [0.15, 0.85]: a backdrop that shows
    the scene without competing with the map's colours."""
    rgb = np.asarray(image, dtype=float) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    return 0.15 + 0.7 * np.clip(rgb[..., :3] @ np.array([0.299, 0.587, 0.114]), 0.0, 1.0)


def draw_importance(ax, image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.85,
                    cmap: str = SALIENCY_CMAP) -> object:
    """``image`` (H×W×3 in [0, 1] or uint8) in grey with ``heat`` (H×W relative importance in [0, 1], NaN:
    no map) over it in colour. The map's opacity grows with the importance, up to ``alpha`` at 1, so that
    unimportant pixels show the scene; a colour bar labelled :data:`IMPORTANCE_LABEL`. Returns the map's
    AxesImage."""
    ax.imshow(_grey(image), cmap="gray", vmin=0.0, vmax=1.0)
    opacity = alpha * np.sqrt(np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0))
    shown = ax.imshow(heat, cmap=cmap, vmin=0.0, vmax=1.0, alpha=opacity, interpolation="nearest")
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    bar_ax = make_axes_locatable(ax).append_axes("right", size="4.5%", pad=0.06)  # as tall as the image
    bar = ax.figure.colorbar(shown, cax=bar_ax, ticks=[0, 0.5, 1])
    bar.set_label(IMPORTANCE_LABEL)
    bar.solids.set_alpha(1.0)
    ax.set_xticks([]), ax.set_yticks([])
    return shown


def plot_panels(explanation: Explanation, axes=None, *, mask: np.ndarray | None = None,
                alpha: float = 0.85, cmap: str = SALIENCY_CMAP) -> plt.Figure:
    """Three panels: the input as the model sees it, the perturbed input, and where it mattered.

    The first two are RGB images in [0, 1], de-normalized with the explanation's
    :class:`Preprocessing` (``to_image``): for a stretch model the whole photo
    squeezed to the input size, for a crop model the center crop. The third is
    the saliency map as relative importance (divided by its peak, so in [0, 1],
    colour bar :data:`IMPORTANCE_LABEL`) over the input, with its center of
    mass (white ×) and, given ``mask`` (an H×W boolean array at the input's
    size, True on the object), the object's outline. The title names the class
    and its probability before → after the perturbation. ``axes``: three
    matplotlib axes, or None for a new figure. Returns the figure.
    """
    fig, axes = _new_axes(axes, ncols=3, width=3.6, height=3.9)
    image, perturbed = (explanation.preprocessing.to_image(t) for t in (explanation.input, explanation.perturbed))
    h, w = image.shape[:2]
    axes[0].imshow(image)
    axes[0].set_title(f"input ({h}×{w}): {_score(explanation.original_score)}", fontsize="medium")
    axes[1].imshow(perturbed)
    axes[1].set_title(f"perturbed: {_score(explanation.perturbed_score)}", fontsize="medium")
    what = "where it perturbed (mask)" if explanation.mask is not None else "where it changed the image"
    draw_importance(axes[2], image, relative_importance(explanation.saliency), alpha=alpha, cmap=cmap)
    axes[2].set_title(what, fontsize="medium")
    for ax in axes[:2]:
        ax.set_xticks([]), ax.set_yticks([])
    for ax in (axes[0], axes[2]):
        _outline(ax, mask)
    _mark_center(axes[2], explanation.center_of_mass)
    _legend(axes[2], mask is not None)
    fig.suptitle(f"{explanation.model_name} · {_scores_title(explanation)} (probability before → after)")
    fig.tight_layout()
    return fig


def plot_overlay(explanation: Explanation, ax=None, alpha: float = 0.85, cmap: str = SALIENCY_CMAP, *,
                 image: str | os.PathLike | np.ndarray | Image.Image | None = None,
                 mask: np.ndarray | None = None, max_side: int | None = OVERLAY_MAX_SIDE) -> plt.Figure:
    """The saliency map as relative importance in [0, 1] over the image; returns the figure.

    Without ``image`` the map is drawn over the model's input (de-normalized
    RGB). With ``image``, the original photo (anything :func:`read_image`
    takes), the map is placed back where the model's input came from
    (:meth:`Explanation.saliency_at`) and drawn over the whole photo, scaled so
    that its longest side is at most ``max_side`` px (None: full size); a crop
    model's input box is drawn dashed, and the photo outside it has no map.
    The map's opacity grows with the importance, up to ``alpha``; the colour
    bar reads :data:`IMPORTANCE_LABEL`. The center of mass is marked (white ×)
    and ``mask`` (True on the object, at the input's size or, with ``image``,
    at the photo's) is outlined. The title names the class and its probability
    before → after the perturbation.
    """
    if image is None:
        fig, ax = _new_axes(ax)
        picture = explanation.preprocessing.to_image(explanation.input)
        heat, com, box = relative_importance(explanation.saliency), explanation.center_of_mass, None
    else:
        photo = read_image(image)
        size = _display_size(photo.shape[:2], max_side)
        picture = photo if size == photo.shape[:2] else np.asarray(
            Image.fromarray(photo).resize(size[::-1], Image.Resampling.LANCZOS))
        mapping = explanation.photo_mapping()
        if mapping.original != photo.shape[:2]:
            raise ValueError(f"the explanation was made for a {mapping.original[0]}×{mapping.original[1]} "
                             f"image, got one of {photo.shape[0]}×{photo.shape[1]}")
        heat = relative_importance(explanation.saliency_at(size))
        com = None if explanation.center_of_mass is None else mapping.point_to_original(explanation.center_of_mass,
                                                                                        size)
        box = None if mapping.crop[2:] == mapping.resized else mapping.crop_in_original(size)
        if mask is not None and np.shape(mask) != size:
            mask = _resized_mask(mask, size, mapping if np.shape(mask) == explanation.saliency.shape else None)
        fig, ax = _new_axes(ax, width=6.0 * size[1] / max(size) + 0.8, height=6.0 * size[0] / max(size) + 0.5)
    draw_importance(ax, picture, heat, alpha=alpha, cmap=cmap)
    if box is not None:
        from matplotlib.patches import Rectangle

        top, left, height, width = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor="white",
                               linestyle="--", linewidth=1.2, path_effects=[_stroke()]))
    _outline(ax, mask)
    _mark_center(ax, com)
    _legend(ax, mask is not None)
    ax.set_title(f"{_scores_title(explanation)} ({explanation.model_name})")
    return fig


def _display_size(shape: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(height, width) of ``shape`` scaled down so that its longest side is at most ``max_side``."""
    if max_side is None or max(shape) <= max_side:
        return tuple(int(n) for n in shape)
    scale = max_side / max(shape)
    return tuple(max(1, round(n * scale)) for n in shape)


def _resized_mask(mask: np.ndarray, size: tuple[int, int], mapping: PhotoMapping | None) -> np.ndarray:
    """A boolean mask at ``size``: one at the input's size placed like the map (``mapping``), or any other
    one resized (nearest neighbour)."""
    mask = np.asarray(mask, dtype=float)
    if mapping is not None:
        return np.nan_to_num(mapping.to_original(mask, fill=0.0, size=size)) >= 0.5
    return transform.resize(mask, size, order=0, anti_aliasing=False) >= 0.5


def plot_history(explanation: Explanation | OptimizationResult, ax=None) -> plt.Figure:
    """Loss and L1 term per step, with the target probability on a log scale; returns the figure."""
    fig, ax = _new_axes(ax, width=6.0)
    ax.plot(explanation.losses, label="loss")
    ax.plot(explanation.l1s, label="mean |x − x_pert|")
    ax.set_xlabel("step")
    ax.set_ylabel("loss, L1")
    prob_ax = ax.twinx()
    prob_ax.semilogy(explanation.probabilities, color="tab:red", label="target probability")
    prob_ax.set_ylabel("target probability")
    lines = ax.get_lines() + prob_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("optimization")
    fig.tight_layout()
    return fig


def plot_tensors(tensors: Mapping[str, torch.Tensor], axes=None, *,
                 preprocessing: Preprocessing | None = None) -> plt.Figure:
    """Normalized 1×3×H×W tensors side by side, titled by their keys; returns the figure.

    Without ``preprocessing`` each shows its channel mean in false colour, with
    a colour bar in normalized units (as the seed plots tensors); with it, each
    is de-normalized (:meth:`Preprocessing.to_image`) and shown as the RGB image
    it stands for (values outside [0, 1] clipped).
    """
    fig, axes = _new_axes(axes, ncols=len(tensors), width=3.6, height=3.4)
    for ax, (title, tensor) in zip(np.atleast_1d(axes), tensors.items()):
        if preprocessing is None:
            fig.colorbar(ax.imshow(channel_mean(tensor)), ax=ax, fraction=0.046)
        else:
            ax.imshow(preprocessing.to_image(tensor))
            ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- widgets

def compact_figures(quality: int = 80, dpi: int = 80) -> None:
    """Show a notebook's matplotlib figures as JPEG of this ``quality`` at ``dpi`` (figure pixels per inch),
    so that a notebook committed with its outputs stays small; outside IPython it does nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is None:
        return
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    plt.rcParams["figure.dpi"] = dpi
    set_matplotlib_formats("jpeg", pil_kwargs={"quality": quality})


def figure_to_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes (for an ``ipywidgets.Image``) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def figure_to_jpeg(fig: plt.Figure, quality: int = 80) -> bytes:
    """Render a figure to JPEG bytes of this ``quality`` and close it: what the widget panels show (a panel's
    image is saved with a notebook, and JPEG keeps photos and RGB panels several times smaller than PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", dpi=72, bbox_inches="tight", pil_kwargs={"quality": quality})
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class Panel:
    """A widget panel: display it in a notebook like any widget.

    ``controls`` maps each hyperparameter to its widget; ``image`` shows the
    panel's figure; panels that optimize also have a ``run`` button, a
    ``progress`` bar and the last ``result``. Everything is driven from Python
    too (set a control's ``value``, call ``run.click()``), so a headless run
    never waits for a click.
    """

    widget: object
    controls: dict
    image: object
    run: object = None
    progress: object = None
    result: Explanation | None = None

    def __post_init__(self):
        # Stable CSS class names (the browser test's selectors, or a stylesheet's): deepexplain-panel, -figure,
        # -run, -progress, and deepexplain-<setting> on each control.
        named = {"panel": self.widget, "figure": self.image, "run": self.run, "progress": self.progress,
                 **self.controls}
        for name, widget in named.items():
            if widget is not None:
                widget.add_class(f"deepexplain-{name}")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _control(name: str, value: float | int | str):
    """The widget for setting ``name`` (:data:`SETTINGS`) at ``value``: a menu for a choice, else a
    slider over the declared widget range (widened to take ``value``)."""
    import ipywidgets as widgets

    spec = SETTINGS[name]
    if spec.choices:
        return widgets.Dropdown(options=spec.choices, value=value, description=name)
    low, high, step = spec.widget
    if step == "log":
        return widgets.FloatLogSlider(value=value, base=10, min=np.log10(min(low, value)),
                                      max=np.log10(max(high, value)), description=name, continuous_update=False)
    slider = widgets.IntSlider if spec.type is int else widgets.FloatSlider
    return slider(value=value, min=min(low, value), max=max(high, value), step=step, description=name,
                  continuous_update=False)


def _controls(settings: Settings, names: Sequence[str]) -> dict:
    """One control per setting name, each at its value in ``settings``."""
    values = settings.as_dict()
    return {name: _control(name, values[name]) for name in names}


#: The generator's shape, as the generator and optimization panels offer it.
_GENERATOR_CONTROLS = ("kernel_size", "nblocks", "nlayers")


def generator_panel(x: torch.Tensor, settings: GeneratorSettings | None = None, *, seed: int = 0,
                    preprocessing: Preprocessing | None = None, **values) -> Panel:
    """Sliders that rebuild an untrained generator and redraw, at once, what it does to ``x`` (1×3×H×W).

    The sliders start at ``settings`` (default: the seed preset's), with ``values`` changing some by name.
    Both images are drawn as RGB, de-normalized with ``preprocessing`` (default: :class:`Preprocessing`'s
    ImageNet statistics, which the embedded model shares).
    """
    import ipywidgets as widgets

    start = Settings(generator=_stage_settings(settings, GeneratorSettings, values))
    controls = _controls(start, _GENERATOR_CONTROLS)
    image = widgets.Image(format="jpeg")

    def redraw(_=None):
        generator = make_generator(start.generator, seed=seed, **{name: c.value for name, c in controls.items()})
        with torch.no_grad():
            out = generator.to(x.device)(x)
        image.value = figure_to_jpeg(plot_tensors({"input": x, "untrained generator output": out},
                                                 preprocessing=preprocessing or Preprocessing()))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return Panel(widgets.VBox([widgets.HBox(list(controls.values())), image]), controls, image)


def optimization_panel(images: Mapping[str, object], model: str | nn.Module | LoadedModel = "auto", *,
                       preset: str = "seed", seed: int = 0, **values) -> Panel:
    """Controls for the optimization's knobs and a Run button that reruns :func:`explain` with live progress.

    ``images`` maps names to anything :func:`explain` takes. The controls start
    at ``preset``'s values (default the seed's), with ``values`` changing some by
    name. Nothing runs until Run is clicked (or ``panel.run.click()`` is
    called); the result is drawn with :func:`plot_panels` and kept in ``panel.result``.
    """
    import ipywidgets as widgets

    loaded = load_model(model)
    start = Settings.from_preset(preset, **values)
    controls = {"image": widgets.Dropdown(options=list(images), description="image"),
                **_controls(start, ("steps", "lr", "l1_coeff", *_GENERATOR_CONTROLS))}
    run = widgets.Button(description="Run", button_style="primary", icon="play")
    progress = widgets.IntProgress(value=0, min=0, max=start.optimization.steps, description="steps")
    image = widgets.Image(format="jpeg")
    panel = Panel(widgets.VBox([widgets.HBox(list(controls.values())[:4]),
                                widgets.HBox([*list(controls.values())[4:], run]), progress, image]),
                  controls, image, run, progress)

    def on_run(_=None):
        chosen = start.updated(**{name: c.value for name, c in controls.items() if name != "image"})
        progress.max, progress.value, run.disabled = chosen.optimization.steps, 0, True
        try:
            panel.result = explain(images[controls["image"].value], loaded, settings=chosen, seed=seed,
                                   verbose=False, callback=lambda step, _: setattr(progress, "value", step))
            image.value = figure_to_jpeg(plot_panels(panel.result))
        finally:
            run.disabled = False

    run.on_click(on_run)
    return panel


def postprocessing_panel(explanation: Explanation, **values) -> Panel:
    """Controls for every post-processing setting that redraw the map at once from a stored result.

    They start at the explanation's own settings, with ``values`` changing some by name.
    """
    import ipywidgets as widgets

    start = explanation.settings.updated(**values)
    controls = _controls(start, [spec.name for spec in PostprocessingSettings.specs()])
    image = widgets.Image(format="jpeg")
    panel = Panel(widgets.VBox([widgets.HBox(list(controls.values())), image]), controls, image)

    def redraw(_=None):
        panel.result = with_postprocessing(explanation, **{name: c.value for name, c in controls.items()})
        image.value = figure_to_jpeg(plot_panels(panel.result))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return panel


# --------------------------------------------------------------------------- outputs

def save_outputs(explanation: Explanation, out_dir: str | os.PathLike, stem: str, *,
                 image: str | os.PathLike | np.ndarray | Image.Image | None = None,
                 max_side: int = OVERLAY_MAX_SIDE) -> list[Path]:
    """Write ``<stem>_explanation.png`` (:func:`plot_panels`, at the model's input size),
    ``<stem>_saliency.npy`` (the map, float32 at the input size) and ``<stem>_summary.json``, and, given the
    original ``image`` (anything :func:`read_image` takes), ``<stem>_overlay.png``: the map over the whole
    photo at its own aspect ratio, its longest side at most ``max_side`` px (:func:`plot_overlay`). Written
    whole, all or none (:func:`deepexplain_io.write_atomically`); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [plot_panels(explanation)]
    summary = json.dumps(explanation.summary(), indent=2, allow_nan=False).encode()  # strict JSON: never NaN
    writers = {
        out_dir / f"{stem}_explanation.png": lambda f: figures[0].savefig(f, format="png", dpi=100),
        out_dir / f"{stem}_saliency.npy": lambda f: np.save(f, explanation.saliency.astype(np.float32)),
        out_dir / f"{stem}_summary.json": lambda f: f.write(summary),
    }
    try:
        if image is not None:
            photo = read_image(image)
            figures.append(plot_overlay(explanation, image=photo, max_side=max_side))
            shown = _display_size(photo.shape[:2], max_side)  # one figure pixel per shown photo pixel
            width, height = figures[1].axes[0].get_position().size * figures[1].get_size_inches()
            dpi = max(100.0, 1 / min(width / shown[1], height / shown[0]))  # small photos: readable text
            writers[out_dir / f"{stem}_overlay.png"] = lambda f: figures[1].savefig(
                f, format="png", dpi=dpi, bbox_inches="tight")
        write_atomically(writers)
    finally:
        for fig in figures:
            plt.close(fig)
    return list(writers)
