"""Toy models and hand-made inputs shared by the tests (import with ``from helpers import ...``)."""

import numpy as np
import torch
from torch import nn

SIZE = 224


def square_mask(top=100, left=100, size=30, shape=(SIZE, SIZE)) -> np.ndarray:
    """A bool H×W mask holding one ``size``×``size`` square at (``top``, ``left``)."""
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


class RegionClassifier(nn.Module):
    """Two classes that depend on one region only: class 0's logit is 4 − ``sharpness`` × the mean squared
    change of the pixels inside ``region`` (a bool H×W mask) from ``reference``'s (1×3×H×W); class 1's is 0.

    Pixels outside the region have no effect at all, by construction: only the region can explain class 0.
    """

    def __init__(self, region: np.ndarray, reference: torch.Tensor):
        super().__init__()
        self.register_buffer("inside", torch.from_numpy(region)[None, None].float())
        self.register_buffer("reference", reference.clone())
        self.sharpness = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = (((x - self.reference) * self.inside) ** 2).sum(dim=(1, 2, 3)) / (3 * self.inside.sum())
        class0 = 4.0 - self.sharpness * change
        return torch.stack([class0, torch.zeros_like(class0)], dim=1)


class AllRegionsClassifier(nn.Module):
    """Two classes; class 0 needs every one of ``regions`` (bool H×W masks) unchanged from ``reference``
    (1×3×H×W): its logit is 4 − ``sharpness`` × the largest mean squared change over the regions; class 1's is 0.

    Deleting any one region removes class 0, but only keeping all of them preserves it: the deletion
    game needs one region, the preservation game every one.
    """

    def __init__(self, regions: list[np.ndarray], reference: torch.Tensor, sharpness: float = 8.0):
        super().__init__()
        self.register_buffer("inside", torch.from_numpy(np.stack(regions))[:, None].float())  # R×1×H×W
        self.register_buffer("reference", reference.clone())
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squared = ((x - self.reference)[:, None] * self.inside) ** 2  # N×R×3×H×W
        change = squared.sum(dim=(2, 3, 4)) / (3 * self.inside.sum(dim=(1, 2, 3)))
        class0 = 4.0 - self.sharpness * change.amax(dim=1)
        return torch.stack([class0, torch.zeros_like(class0)], dim=1)
