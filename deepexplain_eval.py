"""How good is a saliency map? The evaluation harness of deepexplain.

Every method explains the same embedded scenes (:mod:`deepexplain_scenes`,
which come with the object's ground-truth mask) for the same model, and every
map goes through the same metrics:

* localization against the object mask: the pointing game (Zhang et al. 2016:
  the map's maximum within 15 px of the object), the center-of-mass hit (the
  seed's marker within 8 px of the object) and the energy inside the mask (share
  of the map's total inside it);
* faithfulness, without the mask: deletion and insertion AUC (Petsiuk et al.
  2018): pixels are removed from (inserted into) the image most salient first,
  2% at a time, removed pixels replaced by a blurred copy, and the area under the
  target-probability curve is taken over the fraction removed (in [0, 1]; lower
  is better for deletion, higher for insertion);
* the model-parameter randomization sanity check (Adebayo et al. 2018): the
  Spearman rank correlation between the map for the trained model and for
  copies whose layers are re-initialised from the top down (near 1 = the map
  ignores the model);
* a planted shortcut: a second model trained on scenes carrying a class-coloured
  tag in the corner; how much of each method's map falls on the tag vs on the object.

Methods: a random map, a centered Gaussian, Captum's Saliency,
IntegratedGradients, Occlusion and LayerGradCam, Fong & Vedaldi's (2017)
meaningful-perturbation mask (:func:`meaningful_perturbation`, written here),
Fong, Patrick & Vedaldi's (2019) extremal perturbation (:func:`extremal_perturbation`, written
here; photos only), RISE (Petsiuk et al. 2018, :func:`rise`, written here), and deepexplain: the
seed preset plus variants of its post-processing (one optimization, several
maps), the fast preset and the masked generator (with variants of its
post-processing, ``ours-masked-variants``, and its earlier forms, :data:`MASKED_EARLIER`).

Real photos (:func:`evaluate_photos`, ``evaluate --images DIR --model NAME
--weights FILE``): a folder of photos for a real classifier, the target being
the model's top class. Photos have no ground truth, so only faithfulness is
scored (:func:`faithfulness_scores`), under two explicit orders of tied pixels
(:data:`TIES`): a seeded random order, and a pessimistic one in which a group
of tied pixels moves only once all of it fits, so that a flat (or flat-topped)
map cannot win by luck. Photos are split by their row in the folder's list:
even rows to tune on, odd rows to report. The report holds numbers only.

:func:`evaluate` runs it all and :func:`write_report` writes the tables
(Markdown and CSV) and a figure grid; ``python deepexplain.py evaluate --help``
is the command line.
"""

from __future__ import annotations

import copy
import csv
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from scipy import integrate, ndimage, stats
from torch import nn
from tqdm.auto import tqdm

import deepexplain as de
import deepexplain_scenes as scenes
from deepexplain_io import csv_bytes, write_atomically

__all__ = [
    "FIRST_SCENE_ID", "POINTING_TOLERANCE", "COM_TOLERANCE", "METHODS", "METRICS",
    "pointing_hit", "com_hit", "energy_inside", "deletion_insertion_curves", "curve_auc",
    "center_gaussian", "meaningful_perturbation", "EXTREMAL_AREAS", "extremal_perturbation", "gradcam_layer",
    "randomized_copy", "rank_correlation", "mean_ci", "Case", "scene_cases", "run_methods", "score_map",
    "EvaluationResult", "evaluate", "main_table", "sanity_table", "shortcut_table", "paired_differences",
    "comparison_table", "read_scores", "report_markdown",
    "TIES", "faithfulness_scores", "RISE_MASKS", "rise", "SPLITS", "TUNING_SPLIT", "REPORT_SPLIT",
    "PHOTO_METRICS", "PHOTO_METHODS", "SCENE_METHODS", "MASKED_VARIANTS", "photo_files", "photo_cases", "photo_case",
    "evaluate_photos", "photo_table",
    "photo_report_markdown",
    "plot_map", "plot_examples", "plot_photo_maps", "write_report", "REPORT_DIR",
]

#: Where the project's own full evaluation run is kept (``python deepexplain.py evaluate --out data/evaluation``).
REPORT_DIR = Path(__file__).resolve().parent / "data" / "evaluation"
#: Scenes explained by the evaluation start at this scene id (training, accuracy and samples use others).
FIRST_SCENE_ID = 30_000_000
#: Pointing game: the maximum may lie this many pixels outside the object (Zhang et al. 2016).
POINTING_TOLERANCE = 15
#: Center-of-mass hit: the marker may lie this many pixels outside the object.
COM_TOLERANCE = 8
#: Mask metrics (higher is better) and faithfulness metrics, in table order.
METRICS = ("pointing", "com_hit", "energy", "deletion", "insertion")


# --------------------------------------------------------------------------- localization metrics

def _distance_to(mask: np.ndarray) -> np.ndarray:
    """H×W float: each pixel's Euclidean distance (px) to the nearest True pixel of ``mask``."""
    return ndimage.distance_transform_edt(~mask)


def _maximum_point(saliency: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the map's maximum, or None for a constant map.

    Dilated maps have flat-topped maxima: among all maximal pixels, the one
    nearest to their mean position is taken (the plateau's middle, not its corner).
    """
    if saliency.max() <= saliency.min():
        return None
    points = np.argwhere(saliency == saliency.max())
    nearest = np.argmin(((points - points.mean(0)) ** 2).sum(1))
    return int(points[nearest, 0]), int(points[nearest, 1])


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Pointing game: is the H×W map's maximum within ``tolerance`` px of the H×W bool ``mask``?

    A constant map points nowhere and misses.
    """
    point = _maximum_point(saliency)
    return point is not None and bool(_distance_to(mask)[point] <= tolerance)


def com_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = COM_TOLERANCE) -> bool:
    """Is the map's center of mass (the seed's marker) within ``tolerance`` px of the object?

    The distance is measured from the nearest pixel; an all-zero map misses.
    """
    com = de.center_of_mass(np.clip(saliency, 0, None))
    if com is None:
        return False
    row, col = (min(max(round(c), 0), n - 1) for c, n in zip(com, mask.shape))
    return bool(_distance_to(mask)[row, col] <= tolerance)


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share in [0, 1] of the map's positive part that lies inside ``mask`` (0 for an all-zero map)."""
    positive = np.clip(saliency, 0, None)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else 0.0


# --------------------------------------------------------------------------- faithfulness metrics

#: How :func:`deletion_insertion_curves` orders pixels of equal saliency (see its docstring).
TIES = ("random", "pessimistic")


def _pixel_ranks(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """H×W int: 0 for the most salient pixel, 1 for the next, …; ties broken by a seeded shuffle."""
    tie_break = np.random.default_rng(seed).permutation(saliency.size)
    order = np.lexsort((tie_break, -saliency.ravel()))
    ranks = np.empty(saliency.size, dtype=np.int64)
    ranks[order] = np.arange(saliency.size)
    return ranks.reshape(saliency.shape)


def _moved(saliency: np.ndarray, counts: Sequence[int], ties: str = "random") -> np.ndarray:
    """S×H×W bool: for each count c of ``counts``, the pixels moved (deleted or inserted) at that step.

    ``"random"``: the c most salient pixels, ties in a seeded random order.
    ``"pessimistic"``: only the pixels strictly more salient than the c-th
    largest value, so a group of tied pixels moves as one, at the step its
    last pixel would; a map gets no credit for pixels it did not rank (a flat
    map moves nothing before 100%).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
    counts = np.asarray(counts, dtype=np.int64)
    if ties == "random":
        return _pixel_ranks(saliency)[None] < counts[:, None, None]
    values = np.sort(saliency.ravel())[::-1]
    thresholds = values[np.minimum(counts, values.size - 1)]
    moved = saliency[None] > thresholds[:, None, None]
    moved[counts >= values.size] = True
    return moved


def _curves(model: nn.Module, x: torch.Tensor, target: int, moved: np.ndarray,
            batch_size: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """Target probabilities with the S×H×W ``moved`` pixels of ``x`` deleted (replaced by
    :func:`deepexplain.blurred` ``x``) and inserted (into the blurred image): two (S,) float arrays in [0, 1]."""
    background = de.blurred(x)
    deletion, insertion = [], []
    for chunk in torch.from_numpy(moved).to(x.device).split(batch_size):
        changed = chunk.unsqueeze(1).to(x.dtype)  # B×1×H×W, 1 = moved
        deleted = x * (1 - changed) + background * changed
        inserted = background * (1 - changed) + x * changed
        probs = de.class_probabilities(model, torch.cat([deleted, inserted]))[:, target]
        deletion.append(probs[: len(chunk)])
        insertion.append(probs[len(chunk):])
    return torch.cat(deletion).cpu().numpy(), torch.cat(insertion).cpu().numpy()


def _step_counts(n_pixels: int, n_steps: int) -> np.ndarray:
    """(n_steps + 1,) int: how many pixels are moved at each step, from 0 to ``n_pixels``."""
    return torch.linspace(0, n_pixels, n_steps + 1).round().long().numpy()  # as the scenes' reports were made


@torch.no_grad()
def deletion_insertion_curves(model: nn.Module, x: torch.Tensor, target: int, saliency: np.ndarray,
                              n_steps: int = 50, batch_size: int = 26, *,
                              ties: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Target probabilities as pixels are deleted from / inserted into ``x``, most salient first.

    ``x``: normalized 1×3×H×W; ``saliency``: H×W. Step k of ``n_steps`` has the
    top k/n_steps of the pixels replaced by :func:`deepexplain.blurred` ``x`` (deletion), or
    the blurred image with those pixels restored (insertion). Pixels of equal
    saliency (``ties``, :data:`TIES`) go in a seeded random order (``"random"``)
    or, ``"pessimistic"``, a group of tied pixels moves only once all of it
    fits (a flat map cannot win by luck; a map without ties gives the same
    curves either way). Returns two (n_steps + 1,) float arrays in [0, 1],
    from 0% to 100% of the pixels.
    """
    counts = _step_counts(saliency.size, n_steps)
    return _curves(model, x, target, _moved(saliency, counts, ties), batch_size)


@torch.no_grad()
def faithfulness_scores(model: nn.Module, x: torch.Tensor, target: int, saliency: np.ndarray,
                        n_steps: int = 50) -> dict[str, float]:
    """Deletion and insertion AUC of an H×W map under both tie orders (:data:`TIES`): keys
    ``deletion``, ``insertion`` (random ties), ``deletion_pessimistic``, ``insertion_pessimistic``.

    The pessimistic curves are evaluated only at the steps where they differ
    from the random ones (none, for a map without ties).
    """
    counts = _step_counts(saliency.size, n_steps)
    moved = {ties: _moved(saliency, counts, ties) for ties in TIES}
    deletion, insertion = _curves(model, x, target, moved["random"])
    differ = np.flatnonzero((moved["random"] != moved["pessimistic"]).any(axis=(1, 2)))
    worst_deletion, worst_insertion = deletion.copy(), insertion.copy()
    if differ.size:
        worst_deletion[differ], worst_insertion[differ] = _curves(model, x, target, moved["pessimistic"][differ])
    return {"deletion": curve_auc(deletion), "insertion": curve_auc(insertion),
            "deletion_pessimistic": curve_auc(worst_deletion), "insertion_pessimistic": curve_auc(worst_insertion)}


def curve_auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions from 0 to 1 (trapezoid rule), in [0, 1]."""
    return float(integrate.trapezoid(curve, dx=1 / (len(curve) - 1)))


# --------------------------------------------------------------------------- methods

class Case(NamedTuple):
    """One scene or photo to explain: uint8 H×W×3 ``image``, its normalized 1×3×h×w ``x``, the
    explained class ``target``, its bool h×w object ``mask`` (None for a photo: no ground truth) and
    its ``scene_id`` (a scene: the random seed :func:`deepexplain_scenes.make_scene` draws it from; a
    photo: its row in the folder's list; per-case random choices are seeded with it) and ``name``
    (a photo's file name)."""

    image: np.ndarray
    x: torch.Tensor
    target: int
    mask: np.ndarray | None
    scene_id: int
    name: str = ""


def center_gaussian(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """H×W map of a Gaussian centred on the image, σ = ``sigma`` × side: the trivial center-bias baseline."""
    rows, cols = (np.arange(n) - (n - 1) / 2 for n in shape)
    return np.exp(-0.5 * ((rows[:, None] / (sigma * shape[0])) ** 2 + (cols[None] / (sigma * shape[1])) ** 2))


def meaningful_perturbation(model: nn.Module, x: torch.Tensor, target: int, *, steps: int = 300,
                            lr: float = 0.1, area_coeff: float = 1.0, tv_coeff: float = 0.2,
                            tv_power: float = 3.0, mask_size: int = 28, init: float = 0.5,
                            jitter: int = 4, seed: int = 0) -> np.ndarray:
    """Fong & Vedaldi (2017)'s learned deletion mask, as an H×W map in [0, 1] (1 = deleted).

    A ``mask_size``² mask m ∈ [0, 1] (1 = keep), upsampled bilinearly, blends
    ``x`` with its :func:`deepexplain.blurred` copy: x·m + blur(x)·(1 − m). Adam (``lr``)
    minimizes p(target) + ``area_coeff``·mean(1 − m) + ``tv_coeff``·TV(m)^``tv_power``,
    m clamped to [0, 1] after each step, starting from m = ``init`` (from m = 1 a
    saturated softmax gives no gradient and the mask never moves). Against
    adversarial masks the blended image is shifted by up to ``jitter`` px each
    step (seeded by ``seed``), as in the paper. The model is frozen while it runs.
    """
    h, w = x.shape[-2:]
    background = de.blurred(x)
    mask = torch.full((1, 1, mask_size, mask_size), float(init), device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([mask], lr=lr)
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=torch.Generator().manual_seed(seed))
    with de.frozen(model):
        for dy, dx in shifts.tolist():
            m = nn.functional.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
            blended = torch.roll(x * m + background * (1 - m), (dy, dx), dims=(2, 3))
            probability = torch.softmax(model(blended), dim=1)[0, target]
            loss = probability + area_coeff * (1 - mask).mean() + tv_coeff * de.total_variation(mask, tv_power)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
        m = nn.functional.interpolate(mask.detach(), size=(h, w), mode="bilinear", align_corners=False)
    return (1 - m)[0, 0].cpu().numpy()


#: Extremal perturbation's default areas: the fractions of the image its masks keep, one mask each.
EXTREMAL_AREAS = (0.05, 0.1, 0.2)


def _smooth_max_pool(grid: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    """The smooth-max convolution of an N×1×h×w grid in [0, 1], N×1×h×w in [0, 1]: each cell becomes
    the smooth maximum (softmax-weighted mean, temperature ``temperature``) of its neighbours' values
    times a Gaussian g(d) = exp(−d²/2σ²) of their distance d in cells (g(0) = 1), within a
    (2⌈2σ⌉ + 1)² window (cut there; cells beyond the border count as 0)."""
    radius = max(1, int(np.ceil(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=grid.dtype, device=grid.device)
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * sigma ** 2)).reshape(1, -1, 1)
    n, _, h, w = grid.shape
    weighted = nn.functional.unfold(grid, 2 * radius + 1, padding=radius) * kernel  # N×k²×(h·w)
    pooled = (weighted * torch.softmax(weighted / temperature, dim=1)).sum(1)
    return pooled.reshape(n, 1, h, w)


def _area_targets(areas: Sequence[float], n_cells: int, device: torch.device) -> torch.Tensor:
    """len(areas)×n_cells: each row the paper's r_a, sorted ascending, a fraction a of ones at the end."""
    ones = [round(a * n_cells) for a in areas]
    return torch.tensor([[0.0] * (n_cells - k) + [1.0] * k for k in ones], device=device)


def extremal_perturbation(model: nn.Module, x: torch.Tensor, target: int, *,
                          areas: Sequence[float] = EXTREMAL_AREAS, steps: int = 150, lr: float = 0.1,
                          mask_size: int = 28, sigma: float = 2.5, temperature: float = 0.05,
                          area_coeff: float = 10.0, area_growth: float = 1000.0, init_noise: float = 0.01,
                          seed: int = 0) -> np.ndarray:
    """Extremal perturbation (Fong, Patrick & Vedaldi 2019, "Understanding Deep Networks via Extremal
    Perturbations and Smooth Masks", ICCV), the preservation game, as an H×W map in [0, 1] (1 = kept by
    every mask): the mean over ``areas`` of the masks that keep a fraction a of the image each.

    For each area a, a ``mask_size``² parameter grid m̄ ∈ [0, 1] becomes a smooth mask m by the
    paper's smooth-max convolution (:func:`_smooth_max_pool`: Gaussian σ = ``sigma`` cells,
    ``temperature``). The paper pools the parameter lattice straight onto the full-resolution mask;
    here it is pooled on the grid, then upsampled bilinearly to H×W (a simplification, as smooth).
    m blends the normalized ``x`` (1×3×H×W) with its :func:`deepexplain.blurred` copy, m·x + (1 − m)·blur(x)
    (the paper blurs by a σ that varies with m). Adam (``lr``) maximizes the target's logit (the
    pre-softmax score; the softmax saturates) minus λ·mean((vecsort(m) − r_a)²), the paper's ranking
    regulariser on the grid's cells, r_a holding a fraction a of ones; λ grows geometrically from
    ``area_coeff`` to ``area_coeff``·``area_growth`` over the ``steps``; m̄ is clamped to [0, 1]
    after each step. All areas are one batch: each step is one forward pass of len(areas) images,
    which costs about two single-image steps on a CPU, so the default 150 steps (the paper: 800)
    cost about :func:`meaningful_perturbation`'s 300. The mean of the masks ranks the pixels of
    the smallest area's mask first.

    m̄ starts at 0.5 plus uniform noise of ±``init_noise`` seeded by ``seed``, so that the first
    sort's ties (cells the target does not read) fall in a random order, not by position; the
    global RNG is left alone. The model is frozen while it runs. Areas outside (0, 1) or fewer than
    one step are a ValueError.
    """
    if not len(areas) or not all(0 < a < 1 for a in areas):
        raise ValueError(f"extremal perturbation needs areas in (0, 1), got {tuple(areas)}")
    for name, value in (("steps", steps), ("mask_size", mask_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"extremal perturbation needs a whole number {name} ≥ 1, got {value}")
    h, w = x.shape[-2:]
    background = de.blurred(x)
    noise = torch.rand(len(areas), 1, mask_size, mask_size, generator=torch.Generator().manual_seed(seed))
    grid = (0.5 + init_noise * (2 * noise - 1)).to(x.device).requires_grad_()
    reference = _area_targets(areas, mask_size * mask_size, x.device)
    optimizer = torch.optim.Adam([grid], lr=lr)
    with de.frozen(model):
        for step in range(steps):
            smooth = _smooth_max_pool(grid, sigma, temperature)
            m = nn.functional.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)
            energy = model(x * m + background * (1 - m))[:, target].float().sum()
            ranking = ((smooth.flatten(1).sort(dim=1).values - reference) ** 2).mean(1).sum()
            weight = area_coeff * area_growth ** (step / max(steps - 1, 1))
            optimizer.zero_grad(set_to_none=True)
            (weight * ranking - energy).backward()
            optimizer.step()
            with torch.no_grad():
                grid.clamp_(0, 1)
        with torch.no_grad():
            m = nn.functional.interpolate(_smooth_max_pool(grid, sigma, temperature), size=(h, w),
                                          mode="bilinear", align_corners=False)
    return m.mean(0)[0].clamp(0, 1).cpu().numpy()


#: RISE's default number of random masks (the paper used 4000 for ResNet50; fewer is noisier, faster).
RISE_MASKS = 1000


@torch.no_grad()
def rise(model: nn.Module, x: torch.Tensor, target: int, *, n_masks: int = RISE_MASKS, grid: int = 7,
         keep: float = 0.5, batch_size: int = 50, seed: int = 0) -> np.ndarray:
    """RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models", BMVC): an H×W map ≥ 0, the mask-weighted mean of the target probability.

    Each of ``n_masks`` masks keeps each cell of a ``grid``×``grid`` binary grid
    with probability ``keep``, is upsampled bilinearly to (grid + 1) cells of
    ⌈H/grid⌉×⌈W/grid⌉ px and cropped at a random shift (smooth masks, not aligned
    to the grid); masked pixels of the normalized ``x`` (1×3×H×W) are set to 0,
    the mean colour. Map = Σ p(target | x⊙M)·M / (``n_masks``·``keep``).
    Seeded by ``seed``; the global RNG is left alone.
    """
    if int(n_masks) != n_masks or n_masks < 1 or not 0 < keep < 1:
        raise ValueError(f"RISE needs n_masks ≥ 1 and 0 < keep < 1, got {n_masks} and {keep}")
    h, w = x.shape[-2:]
    cell_h, cell_w = -(-h // grid), -(-w // grid)
    rng = torch.Generator().manual_seed(seed)
    total = torch.zeros(h, w, dtype=torch.float64)
    with de.frozen(model):
        for start in range(0, n_masks, batch_size):
            b = min(batch_size, n_masks - start)
            cells = (torch.rand(b, 1, grid, grid, generator=rng) < keep).float()
            up = nn.functional.interpolate(cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w),
                                           mode="bilinear", align_corners=False)
            dy, dx = torch.randint(cell_h, (b,), generator=rng), torch.randint(cell_w, (b,), generator=rng)
            masks = torch.stack([up[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)]).to(x.device)
            probs = de.class_probabilities(model, x * masks)[:, target]
            total += (probs[:, None, None] * masks[:, 0]).sum(0).double().cpu()
    return (total / (n_masks * keep)).numpy()


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the last module of ``model.features`` (torchvision style),
    else the model's last Conv2d."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return features[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def _pixel_map(attribution: torch.Tensor) -> np.ndarray:
    """1×3×H×W attribution → H×W map: Σ over channels of the absolute values."""
    return attribution[0].abs().sum(0).detach().cpu().numpy()


def _random(loaded, case: Case, steps) -> dict[str, np.ndarray]:
    return {"random": np.random.default_rng(case.scene_id).random(tuple(case.x.shape[-2:]))}


def _center(loaded, case: Case, steps) -> dict[str, np.ndarray]:
    return {"center": center_gaussian(tuple(case.x.shape[-2:]))}


def _saliency(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    x = case.x.detach().clone().requires_grad_()  # Captum would warn and set it itself
    return {"saliency": _pixel_map(Saliency(loaded.model).attribute(x, target=case.target))}


def _integrated_gradients(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    attribution = IntegratedGradients(loaded.model).attribute(case.x, baselines=0.0, target=case.target,
                                                       n_steps=32, internal_batch_size=32)
    return {"integrated-gradients": _pixel_map(attribution)}


def _occlusion(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """Drop of the target logit when a 24×24 patch (stride 8) is set to the mean colour; positive part."""
    attribution = Occlusion(loaded.model).attribute(case.x, sliding_window_shapes=(3, 24, 24), strides=(3, 8, 8),
                                             baselines=0.0, target=case.target, perturbations_per_eval=64)
    return {"occlusion": np.clip(attribution[0].mean(0).cpu().numpy(), 0, None)}


def _gradcam(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    cam = LayerGradCam(loaded.model, gradcam_layer(loaded.model)).attribute(case.x, target=case.target,
                                                                relu_attributions=True)
    upsampled = LayerAttribution.interpolate(cam, tuple(case.x.shape[-2:]), interpolate_mode="bilinear")
    return {"grad-cam": upsampled[0, 0].detach().cpu().numpy()}


def _fong_vedaldi(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    return {"fong-vedaldi": meaningful_perturbation(loaded.model, case.x, case.target, seed=case.scene_id,
                                                    **({} if steps is None else {"steps": steps}))}


def _extremal_perturbation(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """Extremal perturbation, default areas (``steps``, when given, replaces the default 150), seeded by the case."""
    return {"extremal-perturbation": extremal_perturbation(loaded.model, case.x, case.target, seed=case.scene_id,
                                                           **({} if steps is None else {"steps": steps}))}


def _rise(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """RISE with :data:`RISE_MASKS` masks (``steps``, when given, is the number of masks), seeded by the case."""
    return {"rise": rise(loaded.model, case.x, case.target, seed=case.scene_id,
                         **({} if steps is None else {"n_masks": steps}))}


#: deepexplain's post-processing variants of the seed preset: name → the settings they change.
OURS_VARIANTS: Mapping[str, dict] = {
    "ours-seed": {},
    "ours-no-crop": dict(border=0.0),
    "ours-abs-p6": dict(difference="abs-sum"),
    "ours-abs-p2": dict(difference="abs-sum", power=2),
    "ours-abs-p1": dict(difference="abs-sum", power=1),
}


def _ours(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """deepexplain with the seed preset (generator seed 0); one optimization, every post-processing variant."""
    result = _explain_case(loaded, case, "seed", steps)
    return {name: de.saliency_map(result.input, result.perturbed, result.settings.postprocessing, **options)
            for name, options in OURS_VARIANTS.items()}


def _ours_fast(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """deepexplain with the fast preset (:data:`deepexplain.FAST_PRESET`, generator seed 0)."""
    return {"ours-fast": _explain_case(loaded, case, "fast", steps).saliency}


def _ours_masked(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """deepexplain with the masked generator (:data:`deepexplain.MASKED_PRESET`, generator seed 0)."""
    return {"ours-masked": _explain_case(loaded, case, "masked", steps).saliency}


#: Earlier forms of the masked preset (the default), for comparison: method name → the settings they change.
#: ``ours-masked-deletion``: the deletion game alone, two runs, the learned removal (the default until 2026-11);
#: ``ours-masked-learned``: both games with the learned removal G(x) (the default for a day in 2026-11).
MASKED_EARLIER: Mapping[str, Mapping[str, float | int | str]] = {
    "ours-masked-deletion": {"removal": "learned", "preserve_coeff": 0.0, "runs": 2, "smoothing": 16.0},
    "ours-masked-learned": {"removal": "learned", "smoothing": 16.0},
}


def _ours_masked_earlier(name: str) -> Callable[[de.LoadedModel, Case, int | None], dict[str, np.ndarray]]:
    """The explainer of the earlier form ``name`` of the masked preset (:data:`MASKED_EARLIER`)."""
    def explainer(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
        return {name: _explain_case(loaded, case, "masked", steps, **MASKED_EARLIER[name]).saliency}
    explainer.__doc__ = f"The masked preset with {MASKED_EARLIER[name]} (:data:`MASKED_EARLIER`), for comparison."
    return explainer


#: Post-processing variants of the masked preset (one optimization, several maps): name → settings changed.
#: (Deletion and insertion depend only on the pixels' order, which a power keeps, up to ties from underflow.)
MASKED_VARIANTS: Mapping[str, dict] = {
    "ours-masked": {},
    "ours-masked-s16-p4": dict(smoothing=16.0),
    "ours-masked-s8-p4": dict(smoothing=8.0),
    "ours-masked-s2-p4": dict(smoothing=2.0),
    "ours-masked-s0-p1": dict(smoothing=0.0, power=1),
}


def _ours_masked_variants(loaded: de.LoadedModel, case: Case, steps) -> dict[str, np.ndarray]:
    """The masked preset's map and its post-processing variants (:data:`MASKED_VARIANTS`) from one optimization."""
    result = _explain_case(loaded, case, "masked", steps)
    return {name: de.with_postprocessing(result, **options).saliency for name, options in MASKED_VARIANTS.items()}


def _explain_case(loaded: de.LoadedModel, case: Case, preset: str, steps: int | None,
                  **values) -> de.Explanation:
    """``case`` explained by deepexplain with ``preset`` and settings ``values`` (generator seed 0); ``steps`` None
    keeps the preset's."""
    return de.explain(case.image, loaded, preset=preset, target=case.target, verbose=False,
                      **values, **({} if steps is None else {"steps": steps}))


#: Explainers by name: f(loaded model, case, steps) → {map name: H×W map}. ``steps`` (None = each
#: method's default) shortens the optimizing methods, for tests.
METHODS: Mapping[str, Callable[[de.LoadedModel, Case, int | None], dict[str, np.ndarray]]] = {
    "random": _random, "center": _center, "saliency": _saliency,
    "integrated-gradients": _integrated_gradients, "occlusion": _occlusion, "grad-cam": _gradcam,
    "fong-vedaldi": _fong_vedaldi, "extremal-perturbation": _extremal_perturbation, "rise": _rise,
    "ours": _ours, "ours-fast": _ours_fast, "ours-masked": _ours_masked,
    **{name: _ours_masked_earlier(name) for name in MASKED_EARLIER}, "ours-masked-variants": _ours_masked_variants,
}


#: The methods :func:`evaluate` runs by default: all but the masked preset's variants (its post-processing,
#: its earlier forms) and extremal perturbation (added after the scene report was made; it runs on photos).
SCENE_METHODS = tuple(m for m in METHODS
                      if m not in ("ours-masked-variants", *MASKED_EARLIER, "extremal-perturbation"))


def run_methods(loaded: de.LoadedModel, case: Case, methods: Sequence[str],
                 steps: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every map of every method (names of :data:`METHODS`) for one case, and the seconds each
    map's method took (the ``ours-*`` maps share one optimization and its time)."""
    maps, seconds = {}, {}
    with de.frozen(loaded.model):
        for method in methods:
            start = time.perf_counter()
            produced = METHODS[method](loaded, case, steps)
            elapsed = time.perf_counter() - start
            maps.update(produced)
            seconds.update(dict.fromkeys(produced, elapsed))
    return maps, seconds


# --------------------------------------------------------------------------- sanity check

def _weight_layers(model: nn.Module) -> list[nn.Module]:
    """The model's Conv2d and Linear layers, output side first."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][::-1]


def randomized_copy(model: nn.Module, n_layers: int, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with its top ``n_layers`` Conv2d/Linear layers re-initialised
    (cascading randomization, Adebayo et al. 2018); ``model`` itself is untouched."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in _weight_layers(clone)[:n_layers]:
            layer.reset_parameters()
    return clone


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels; NaN when either map is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a.ravel(), b.ravel()).statistic)


def _sanity_levels(model: nn.Module) -> dict[str, int]:
    """Cascading levels: label → number of top layers randomized (top layer, top half, all)."""
    n = len(_weight_layers(model))
    return {"top layer": 1, f"top {n // 2} layers": n // 2, f"all {n} layers": n}


# --------------------------------------------------------------------------- statistics

def mean_ci(values: Sequence[float], confidence: float = 0.95,
            bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float, float]:
    """(mean, low, high): a Wilson interval for 0/1 values, a Student-t interval otherwise,
    clipped to ``bounds`` (the values' possible range).

    NaN values are left out; (nan, nan, nan) when none is left.
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    mean = float(v.mean())
    if np.isin(v, (0.0, 1.0)).all():
        ci = stats.binomtest(int(v.sum()), v.size).proportion_ci(confidence, method="wilson")
        return mean, float(ci.low), float(ci.high)
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.sem(v) * stats.t.ppf((1 + confidence) / 2, v.size - 1)
    return mean, float(max(mean - half, bounds[0])), float(min(mean + half, bounds[1]))


# --------------------------------------------------------------------------- the run

@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    ``scores``: one dict per (scene, map) with the METRICS and seconds;
    ``sanity``: one dict per (scene, level, map) with the rank correlation;
    ``shortcut``: one dict per (scene, map) with the map's share on the tag and
    on the object and whether its maximum points at either; ``shortcut_accuracy``:
    the shortcut model's accuracy with matching and with swapped tags;
    ``examples``: the first scenes' images, masks and maps, for the figure.
    """

    scores: list[dict]
    sanity: list[dict] = field(default_factory=list)
    shortcut: list[dict] = field(default_factory=list)
    shortcut_accuracy: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def machine_name(device: torch.device) -> str:
    """The hardware the run used, in words: the GPU's name, or the CPU core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores, {platform.machine()}"


def scene_cases(loaded: de.LoadedModel, scene_ids: Sequence[int], marks: str | None = None) -> list[Case]:
    """Scenes ``scene_ids`` prepared for ``loaded``; ``marks`` as in
    :func:`deepexplain_scenes.make_scene_with_marks`.

    The target of each Case is the model's top class, the class the method explains.
    """
    cases = []
    for scene_id in scene_ids:
        scene = scenes.make_scene_with_marks(scene_id, marks)
        x = loaded.preprocessing(scene.image, device=loaded.device)
        target = int(de.checked_probabilities(loaded, x).argmax())
        cases.append(Case(scene.image, x, target, scene.mask, scene_id))
    return cases


#: Photos: how a folder is split (by row of its list): tuning uses the even rows, the report the odd ones.
SPLITS = ("all", "even", "odd")
TUNING_SPLIT, REPORT_SPLIT = "even", "odd"
#: Image files a folder of photos may hold (when it has no labels.csv).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
#: Metrics of a photo (no ground truth): faithfulness under both tie orders (:func:`faithfulness_scores`).
PHOTO_METRICS = ("deletion", "insertion", "deletion_pessimistic", "insertion_pessimistic")
#: The methods a photo evaluation runs by default (``ours``, the seed preset's 1000 steps, is left out).
PHOTO_METHODS = ("random", "center", "saliency", "integrated-gradients", "occlusion", "grad-cam", "rise",
                 "fong-vedaldi", "extremal-perturbation", "ours-fast", "ours-masked")


def photo_files(folder: str | os.PathLike) -> list[str]:
    """The photos of ``folder``, in order: the ``file`` column of its labels.csv when it has one, else
    its image files sorted by name. A photo's row in this list is its id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a folder of photos: {folder}")
    listing = folder / "labels.csv"
    if listing.is_file():
        with open(listing, newline="") as f:
            reader = csv.DictReader(f)
            if "file" not in (reader.fieldnames or ()):
                raise ValueError(f"{listing} has no 'file' column")
            files = [row["file"] for row in reader]
    else:
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise ValueError(f"no photos in {folder} (looked for {', '.join(PHOTO_SUFFIXES)})")
    return files


def photo_cases(loaded: de.LoadedModel, folder: str | os.PathLike, *, split: str = "all", first: int = 0,
                every: int = 1, limit: int | None = None) -> list[Case]:
    """Photos of ``folder`` (:func:`photo_files`) prepared for ``loaded``: those of ``split``
    (:data:`SPLITS`: all rows, the even rows or the odd ones), skipping the ``first`` of them, then every
    ``every``-th one (a sample across a folder sorted by class), at most ``limit``. Each Case's
    ``scene_id`` is the photo's row, its target the model's top class, its mask None.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, value, least in (("first", first, 0), ("every", every, 1), ("limit", 1 if limit is None else limit, 1)):
        if isinstance(value, bool) or int(value) != value or value < least:
            raise ValueError(f"{name} must be a whole number ≥ {least}, got {value}")
    rows = [(i, f) for i, f in enumerate(photo_files(folder))
            if split == "all" or i % 2 == (0 if split == "even" else 1)]
    rows = rows[first::every][:limit]
    if not rows:
        raise ValueError(f"no photo left in {folder} for split {split!r} after skipping {first}")
    return [photo_case(loaded, de.load_image(Path(folder) / name), row, name) for row, name in rows]


def photo_case(loaded: de.LoadedModel, image: np.ndarray, row: int = 0, name: str = "") -> Case:
    """One uint8 H×W×3 photo prepared for ``loaded``: its normalized input, the model's top class as the
    target, no mask; ``row`` becomes its ``scene_id``."""
    x = loaded.preprocessing(image, device=loaded.device)
    return Case(image, x, int(de.checked_probabilities(loaded, x).argmax()), None, row, name)


def score_map(model: nn.Module, case: Case, saliency: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one H×W map of ``case`` (hits as 0.0 / 1.0)."""
    deletion, insertion = deletion_insertion_curves(model, case.x, case.target, saliency)
    return {"pointing": float(pointing_hit(saliency, case.mask)), "com_hit": float(com_hit(saliency, case.mask)),
            "energy": energy_inside(saliency, case.mask), "deletion": curve_auc(deletion),
            "insertion": curve_auc(insertion)}


def _main_scores(loaded, cases, methods, steps, n_kept,
                 progress) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """Scores of every map of every case, and the maps of the first ``n_kept`` cases."""
    scores, kept = [], []
    for case in tqdm(cases, desc="scenes", disable=not progress):
        maps, seconds = run_methods(loaded, case, methods, steps)
        for name, saliency in maps.items():
            scores.append({"scene_id": case.scene_id, "method": name, "target": case.target,
                           **score_map(loaded.model, case, saliency), "seconds": seconds[name]})
        if len(kept) < n_kept:
            kept.append(maps)
    return scores, kept


def _sanity_scores(loaded, cases, trained_maps, methods, steps, progress) -> list[dict]:
    """Rank correlations between each case's trained-model maps and those of every randomization level."""
    levels = {level: de.LoadedModel(randomized_copy(loaded.model, n_layers), loaded.preprocessing,
                                    loaded.labels, loaded.name)
              for level, n_layers in _sanity_levels(loaded.model).items()}
    rows = []
    for case, trained in zip(tqdm(cases, desc="sanity check", disable=not progress), trained_maps):
        for level, randomized in levels.items():
            maps, _ = run_methods(randomized, case, methods, steps)
            rows += [{"scene_id": case.scene_id, "level": level, "method": name,
                      "spearman": rank_correlation(trained[name], maps[name])} for name in maps]
    return rows


def _shortcut_scores(loaded, cases, methods, steps, progress) -> list[dict]:
    tag = scenes.mark_mask()
    rows = []
    for case in tqdm(cases, desc="shortcut", disable=not progress):
        maps, _ = run_methods(loaded, case, methods, steps)
        rows += [{"scene_id": case.scene_id, "method": name, "target": case.target,
                  "on_tag": energy_inside(saliency, tag), "on_object": energy_inside(saliency, case.mask),
                  "points_at_tag": float(pointing_hit(saliency, tag)),
                  "points_at_object": float(pointing_hit(saliency, case.mask))}
                 for name, saliency in maps.items()]
    return rows


def evaluate(n_scenes: int = 100, model: str | nn.Module | de.LoadedModel = "shapes",
             methods: Sequence[str] | None = None, *, first_scene_id: int = FIRST_SCENE_ID,
             steps: int | None = None, sanity_scenes: int = 5, shortcut_scenes: int = 20,
             accuracy_scenes: int = 500, n_examples: int = 4, device: str | None = None,
             progress: bool = True) -> EvaluationResult:
    """Explain scenes ``first_scene_id`` … ``first_scene_id + n_scenes − 1`` with every method and score every map.

    ``methods``: names from :data:`METHODS` (default :data:`SCENE_METHODS`). The first
    ``sanity_scenes`` scenes also go through the randomization sanity check,
    and ``shortcut_scenes`` scenes with their class's tag are explained for the
    planted-shortcut model (0 skips either part). ``steps`` overrides the
    optimizing methods' step counts (for quick runs; None = their defaults).
    """
    methods = list(SCENE_METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s): {', '.join(unknown)} (known: {', '.join(METHODS)})")
    for name, value, least in (("n_scenes", n_scenes, 1), ("sanity_scenes", sanity_scenes, 0),
                               ("shortcut_scenes", shortcut_scenes, 0)):
        if int(value) != value or value < least:
            raise ValueError(f"{name} must be a whole number ≥ {least}, got {value}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a whole number ≥ 1 (or None for each method's own), got {steps}")
    loaded = de.load_model(model, device=device)
    cases = scene_cases(loaded, range(first_scene_id, first_scene_id + n_scenes))
    scores, kept = _main_scores(loaded, cases, methods, steps, max(n_examples, sanity_scenes), progress)
    examples = [{"image": case.image, "mask": case.mask, "maps": maps}
                for case, maps in zip(cases, kept[:n_examples])]
    result = EvaluationResult(scores, examples=examples, settings={
        "n_scenes": n_scenes, "first_scene_id": first_scene_id, "model": loaded.name, "methods": methods,
        "steps": steps, "device": str(loaded.device), "threads": torch.get_num_threads(),
        "machine": machine_name(loaded.device)})
    if sanity_scenes:
        result.sanity = _sanity_scores(loaded, cases[:sanity_scenes], kept, methods, steps, progress)
    if shortcut_scenes:
        shortcut = de.load_model("shapes", device=device, weights_path=scenes.SHORTCUT_WEIGHTS_PATH)
        result.shortcut_accuracy = {marks: scenes.accuracy(shortcut.model, accuracy_scenes, marks=marks)
                                    for marks in ("match", "swap")}
        shortcut_cases = scene_cases(shortcut, range(first_scene_id, first_scene_id + shortcut_scenes), marks="match")
        result.shortcut = _shortcut_scores(shortcut, shortcut_cases, methods, steps, progress)
    return result


def evaluate_photos(folder: str | os.PathLike, model: str | nn.Module | de.LoadedModel = "mobilenet_v2",
                    methods: Sequence[str] | None = None, *, weights_path: str | os.PathLike | None = None,
                    split: str = "all", first: int = 0, every: int = 1, limit: int | None = None,
                    steps: int | None = None,
                    sanity_images: int = 2, curve_steps: int = 50, device: str | None = None,
                    progress: bool = True) -> EvaluationResult:
    """Explain real photos of ``folder`` (:func:`photo_cases`) for a real classifier and score each map's
    faithfulness (:func:`faithfulness_scores`: deletion and insertion AUC, random and pessimistic ties).

    ``model``/``weights_path`` as for :func:`deepexplain.load_model` (a named
    torchvision model gets its weights' resize + center crop). ``methods``:
    names from :data:`METHODS` (default :data:`PHOTO_METHODS`). The first
    ``sanity_images`` photos also go through the randomization sanity check.
    No map or photo is kept: the result holds numbers only.
    """
    methods = list(PHOTO_METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s): {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if int(sanity_images) != sanity_images or sanity_images < 0:
        raise ValueError(f"sanity_images must be a whole number ≥ 0, got {sanity_images}")
    loaded = de.load_model(model, device=device, weights_path=weights_path)
    cases = photo_cases(loaded, folder, split=split, first=first, every=every, limit=limit)
    scores, kept = [], []
    for case in tqdm(cases, desc="photos", disable=not progress):
        maps, seconds = run_methods(loaded, case, methods, steps)
        scores += [{"scene_id": case.scene_id, "file": case.name, "method": name, "target": case.target,
                    **faithfulness_scores(loaded.model, case.x, case.target, saliency, curve_steps),
                    "seconds": seconds[name]} for name, saliency in maps.items()]
        if len(kept) < sanity_images:
            kept.append(maps)
    result = EvaluationResult(scores, settings={
        "kind": "photos", "folder": Path(folder).name, "split": split, "first": first, "every": every, "limit": limit,
        "n_photos": len(cases), "model": loaded.name, "preprocessing": loaded.preprocessing.describe(),
        "methods": methods, "steps": steps, "curve_steps": curve_steps, "device": str(loaded.device),
        "threads": torch.get_num_threads(), "machine": machine_name(loaded.device)})
    if sanity_images:
        result.sanity = _sanity_scores(loaded, cases[:sanity_images], kept, methods, steps, progress)
    return result


# --------------------------------------------------------------------------- report

#: Possible range of each scored value (default [0, 1]), to clip confidence intervals to.
_RANGES = {"spearman": (-1.0, 1.0), "seconds": (0.0, np.inf)}


#: The columns of sanity.csv and shortcut.csv (a table without rows is written with its header alone).
SANITY_COLUMNS = ("scene_id", "level", "method", "spearman")
SHORTCUT_COLUMNS = ("scene_id", "method", "target", "on_tag", "on_object", "points_at_tag", "points_at_object")


def _score_columns(photos: bool) -> tuple[str, ...]:
    """The columns of scores.csv, for scenes or photos."""
    return ("scene_id", *(("file",) if photos else ()), "method", "target",
            *(PHOTO_METRICS if photos else METRICS), "seconds")


def _summary_columns(keys: Sequence[str], group: str = "method") -> tuple[str, ...]:
    """The columns of :func:`_summary_rows`' rows: group, n, and each key's mean, low and high."""
    return (group, "n", *(f"{key}{end}" for key in keys for end in ("", "_low", "_high")))


def _summary_rows(rows: list[dict], keys: Sequence[str], group: str = "method") -> list[dict]:
    """One row per value of ``group`` (first-seen order) with mean, low and high of each key."""
    out = []
    for name in dict.fromkeys(r[group] for r in rows):
        mine = [r for r in rows if r[group] == name]
        row = {group: name, "n": len(mine)}
        for key in keys:
            bounds = _RANGES.get(key, (0.0, 1.0))
            row[key], row[f"{key}_low"], row[f"{key}_high"] = mean_ci([r[key] for r in mine], bounds=bounds)
        out.append(row)
    return out


def _fmt(row: dict, key: str, digits: int = 2) -> str:
    mean, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(low) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def main_table(result: EvaluationResult) -> str:
    """Markdown: methods × metrics, mean [95% CI], plus mean seconds per explanation."""
    summary = _summary_rows(result.scores, (*METRICS, "seconds"))
    header = ["method", "pointing ↑", "center-of-mass hit ↑", "energy in mask ↑", "deletion AUC ↓",
              "insertion AUC ↑", "s / explanation"]
    return _markdown_table(header, [[r["method"], *(_fmt(r, k) for k in METRICS), f"{r['seconds']:.2f}"]
                                    for r in summary])


#: Column headers of the photo metrics.
_PHOTO_HEADERS = {"deletion": "deletion AUC ↓", "insertion": "insertion AUC ↑",
                  "deletion_pessimistic": "deletion AUC ↓ (pessimistic ties)",
                  "insertion_pessimistic": "insertion AUC ↑ (pessimistic ties)", "seconds": "s / photo"}


def photo_table(result: EvaluationResult) -> str:
    """Markdown for a photo evaluation: methods × :data:`PHOTO_METRICS`, mean [95% CI], and seconds."""
    summary = _summary_rows(result.scores, (*PHOTO_METRICS, "seconds"))
    return _markdown_table(["method", "n", *(_PHOTO_HEADERS[k] for k in (*PHOTO_METRICS, "seconds"))],
                           [[r["method"], r["n"], *(_fmt(r, k, 3) for k in PHOTO_METRICS), f"{r['seconds']:.2f}"]
                            for r in summary])


def sanity_table(result: EvaluationResult) -> str:
    """Markdown: methods × randomization levels, mean Spearman correlation with the trained model's map."""
    levels = list(dict.fromkeys(r["level"] for r in result.sanity))
    methods = list(dict.fromkeys(r["method"] for r in result.sanity))
    cells = {}
    for level in levels:
        for row in _summary_rows([r for r in result.sanity if r["level"] == level], ["spearman"]):
            cells[row["method"], level] = row
    return _markdown_table(["method", *(f"{lvl} randomized" for lvl in levels)],
                           [[m, *(_fmt(cells[m, lvl], "spearman") for lvl in levels)] for m in methods])


def shortcut_table(result: EvaluationResult) -> str:
    """Markdown: per method, share of the map on the tag and on the object, and where its maximum points."""
    keys = ("on_tag", "on_object", "points_at_tag", "points_at_object")
    summary = _summary_rows(result.shortcut, keys)
    return _markdown_table(["method", "energy on tag", "energy on object", "max on tag", "max on object"],
                           [[r["method"], *(_fmt(r, k) for k in keys)] for r in summary])


def paired_differences(scores: Sequence[dict], method: str, baseline: str,
                       keys: Sequence[str] = (*METRICS, "seconds")) -> dict[str, tuple[float, float, float]]:
    """``method`` − ``baseline`` on the scenes both scored: per key, the mean per-scene difference
    with its 95% Student-t interval (paired: both maps explain the same scene). ``scores``: rows as
    in :attr:`EvaluationResult.scores` (or :func:`read_scores`), from one or several runs."""
    by_scene = {name: {r["scene_id"]: r for r in scores if r["method"] == name} for name in (method, baseline)}
    scene_ids = sorted(set(by_scene[method]) & set(by_scene[baseline]))
    if not scene_ids:
        raise ValueError(f"no scene was scored for both {method!r} and {baseline!r}")
    out = {}
    for key in keys:
        d = np.array([by_scene[method][s][key] - by_scene[baseline][s][key] for s in scene_ids], dtype=float)
        if len(d) < 2 or d.std() == 0:
            out[key] = (float(d.mean()),) * 3
        else:
            ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
            out[key] = (float(d.mean()), float(ci.low), float(ci.high))
    return out


def comparison_table(scores: Sequence[dict], method: str, baselines: Sequence[str], *,
                     photos: bool = False) -> str:
    """Markdown: ``method`` − each baseline, paired per scene (or photo), mean [95% CI] of every metric
    (positive is better for pointing, center of mass, energy, insertion; negative for deletion, seconds).
    ``photos``: the photo metrics (:data:`PHOTO_METRICS`), with 3 decimals and the number of pairs."""
    keys = (*(PHOTO_METRICS if photos else METRICS), "seconds")
    header = ["difference", *(["pairs"] if photos else []),
              *([_PHOTO_HEADERS[k].replace(" ↓", "").replace(" ↑", "") for k in keys] if photos else
                ["pointing", "center-of-mass hit", "energy in mask", "deletion AUC", "insertion AUC",
                 "s / explanation"])]
    digits = 3 if photos else 2
    lines = []
    for baseline in baselines:
        diffs = paired_differences(scores, method, baseline, keys)
        pairs = len({r["scene_id"] for r in scores if r["method"] == method}
                    & {r["scene_id"] for r in scores if r["method"] == baseline})
        lines.append([f"{method} − {baseline}", *([pairs] if photos else []),
                      *(f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" for m, lo, hi in diffs.values())])
    return _markdown_table(header, lines)


def read_scores(folder: str | Path) -> list[dict]:
    """The per-scene scores a report folder's scores.csv holds (:func:`write_report`), numbers as numbers."""
    with open(Path(folder) / "scores.csv", newline="") as f:
        return [{k: v if k in ("method", "file") else (int(v) if k in ("scene_id", "target") else float(v))
                 for k, v in r.items()} for r in csv.DictReader(f)]


def photo_report_markdown(result: EvaluationResult, command: str = "") -> str:
    """The report of :func:`evaluate_photos`: settings, the faithfulness table, the sanity check."""
    s = result.settings
    steps = "their default step counts" if s["steps"] is None else f"{s['steps']} steps"
    split = {"all": "every photo", "even": "the even rows (tuning split)", "odd": "the odd rows (report split)"}
    parts = [f"## deepexplain evaluation on photos\n\n{s['n_photos']} photos of `{s['folder']}` "
             f"({split[s['split']]}, skipping the first {s['first']}"
             + (f", then every {s['every']}th" if s.get("every", 1) > 1 else "") + f"), model `{s['model']}`, input: "
             f"{s['preprocessing']}; target = the model's top class; {s['device']} ({s['threads']} threads, "
             f"{s['machine']}); optimizing methods at {steps}."
             + (f"\n\nReproduce: `{command}`" if command else ""),
             f"### Faithfulness\n\nDeletion and insertion AUC (Petsiuk et al. 2018; {s['curve_steps']} steps, "
             "removed pixels replaced by a blurred copy), mean [95% Student-t CI]. Random ties: pixels of "
             "equal saliency in a seeded random order; pessimistic ties: a group of tied pixels moves only "
             "once all of it fits (a flat map cannot win by luck; equal to random for a map without ties).\n\n"
             + photo_table(result)]
    if result.sanity:
        parts.append(_sanity_section(result, "photos"))
    return "\n\n".join(parts) + "\n"


def _sanity_section(result: EvaluationResult, unit: str, note: str = "") -> str:
    """The report's sanity-check section: what it measures, then the table; ``unit``: scenes or photos."""
    n = len({r["scene_id"] for r in result.sanity})
    return (f"### Sanity check: model-parameter randomization ({n} {unit})\n\nSpearman rank correlation between "
            "the map for the trained model and for a copy with its top layers re-initialised; near 1 means the map "
            f"does not depend on the model.{note}\n\n" + sanity_table(result))


def report_markdown(result: EvaluationResult, command: str = "") -> str:
    """The whole report: settings, main table, sanity check and shortcut tables, as Markdown."""
    s = result.settings
    if s.get("kind") == "photos":
        return photo_report_markdown(result, command)
    steps = "their default step counts" if s["steps"] is None else f"{s['steps']} steps"
    parts = [f"## deepexplain evaluation\n\n{s['n_scenes']} scenes (scene ids {s['first_scene_id']}…), model "
             f"`{s['model']}`, {s['device']} ({s['threads']} threads, {s['machine']}); "
             f"optimizing methods at {steps}."
             + (f"\n\nReproduce: `{command}`" if command else ""),
             "### Localization and faithfulness\n\nMean [95% CI]: Wilson for hit rates, Student t otherwise.\n\n"
             + main_table(result)]
    if result.sanity:
        parts.append(_sanity_section(result, "scenes", " n/a: the map was constant for every randomized copy "
                                     "(nothing to rank), i.e. it did change."))
    if result.shortcut:
        acc = result.shortcut_accuracy
        n = len({r["scene_id"] for r in result.shortcut})
        parts.append(f"### Planted shortcut ({n} scenes with their class's tag)\n\nThe shortcut model's "
                     f"accuracy: {acc['match']:.1%} with matching tags, {acc['swap']:.1%} with another "
                     f"class's tag. The tag covers {scenes.mark_mask().mean():.2%} of the image, inside the "
                     "seed's 10% border crop.\n\n" + shortcut_table(result))
    return "\n\n".join(parts) + "\n"


def plot_map(saliency: np.ndarray, mask: np.ndarray, ax=None, title: str = "",
             marker_size: float = 8) -> plt.Figure:
    """Draw an H×W map with the object's outline (cyan), its maximum (×, pointing game) and its
    center of mass (+, the seed's marker); ``ax`` defaults to a new figure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(saliency, cmap="inferno")
    ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.6)
    point, com = _maximum_point(saliency), de.center_of_mass(np.clip(saliency, 0, None))
    if point is not None:
        ax.plot(point[1], point[0], "x", color="lime", markersize=marker_size)
    if com is not None:
        ax.plot(com[1], com[0], "+", color="white", markersize=marker_size)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    return ax.figure


def _marker_legend(fig: plt.Figure) -> float:
    """A legend under the figure for :func:`plot_map`'s marks: the object's outline, the maximum and the
    center of mass (on a dark ground, as on the maps); in one row on a figure at least 6 in wide, else one
    mark per row. Returns the height it needs, in inches."""
    ncol = 3 if fig.get_figwidth() >= 6 else 1
    handles = [Line2D([], [], color="cyan", linewidth=0.8, label="object (ground truth)"),
               Line2D([], [], linestyle="", marker="x", color="lime", label="map's maximum (pointing game)"),
               Line2D([], [], linestyle="", marker="+", color="white",
                      label="map's center of mass (the seed's marker)")]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=6, frameon=True, facecolor="0.15",
               edgecolor="0.15", labelcolor="white", borderaxespad=0.2)
    return 0.15 + 0.2 * (len(handles) // ncol)


def plot_photo_maps(loaded: de.LoadedModel, photos: Mapping[str, np.ndarray],
                    methods: Sequence[str] = ("ours-masked", "grad-cam")) -> plt.Figure:
    """Figure grid: one row per photo (name → uint8 H×W×3), the model's input (its crop, de-normalized) and
    each method's map over it as relative importance (:func:`deepexplain.draw_importance`), for the model's
    top class, named with its probability in the row's first title."""
    fig, axes = plt.subplots(len(photos), len(methods) + 1, squeeze=False,
                             figsize=(3.0 * (len(methods) + 1), 2.7 * len(photos)))
    for row, (name, image) in zip(axes, photos.items()):
        case = photo_case(loaded, image, name=name)
        maps, _ = run_methods(loaded, case, methods)
        probability = float(de.checked_probabilities(loaded, case.x)[0, case.target])
        shown = loaded.preprocessing.to_image(case.x)
        row[0].imshow(shown)
        row[0].set_title(f"{name}: {loaded.label(case.target)} {probability:.2f}", fontsize=8)
        row[0].set_xticks([]), row[0].set_yticks([])
        for ax, method in zip(row[1:], methods):
            de.draw_importance(ax, shown, de.relative_importance(maps[method]))
            ax.set_title(method, fontsize=8)
    fig.tight_layout()
    return fig


def plot_examples(result: EvaluationResult) -> plt.Figure:
    """Figure grid: one row per example scene, the scene then each method's map (see :func:`plot_map`),
    with a legend of the marks under it."""
    names = list(result.examples[0]["maps"])
    fig, axes = plt.subplots(len(result.examples), len(names) + 1, squeeze=False,
                             figsize=(1.3 * (len(names) + 1), 1.4 * len(result.examples)))
    for row, example in zip(axes, result.examples):
        row[0].imshow(example["image"])
        row[0].contour(example["mask"], levels=[0.5], colors="cyan", linewidths=0.6)
        row[0].set_xticks([]), row[0].set_yticks([])
        for ax, name in zip(row[1:], names):
            plot_map(example["maps"][name], example["mask"], ax, marker_size=5)
    for ax, title in zip(axes[0], ["scene", *names]):
        ax.set_title(title, fontsize=7)
    legend_height = _marker_legend(fig)
    fig.tight_layout(pad=0.3, rect=(0, legend_height / fig.get_figheight(), 1, 1))  # room for the legend
    return fig


def write_report(result: EvaluationResult, out_dir: str | Path, command: str = "") -> list[Path]:
    """Write evaluation.md, evaluation.csv (summary), scores.csv (per scene and map), sanity.csv,
    shortcut.csv and evaluation_grid.jpg into ``out_dir``, each whole or not at all. A photo
    evaluation writes numbers only: no grid (it would show the photos) and no shortcut.csv. A part
    that was skipped (``sanity_scenes=0``, ``shortcut_scenes=0``) leaves its table with the header
    row alone, so the folder always has the same files and none of an earlier run's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = result.settings.get("kind") == "photos"
    keys = (*(PHOTO_METRICS if photos else METRICS), "seconds")
    files = {
        "evaluation.md": report_markdown(result, command).encode(),
        "evaluation.csv": csv_bytes(_summary_rows(result.scores, keys), _summary_columns(keys)),
        "scores.csv": csv_bytes(result.scores, _score_columns(photos)),
        "sanity.csv": csv_bytes(result.sanity, SANITY_COLUMNS),
        **({} if photos else {"shortcut.csv": csv_bytes(result.shortcut, SHORTCUT_COLUMNS)}),
    }
    fig = None if photos or not result.examples else plot_examples(result)
    writers = {out_dir / name: (lambda f, data=data: f.write(data)) for name, data in files.items()}
    if fig is not None:
        writers[out_dir / "evaluation_grid.jpg"] = lambda f: fig.savefig(f, format="jpeg", dpi=110,
                                                                        pil_kwargs={"quality": 85})
    try:
        write_atomically(writers)
    finally:
        if fig is not None:
            plt.close(fig)
    return list(writers)
