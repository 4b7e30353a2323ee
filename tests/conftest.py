"""Fixtures shared by every test module: the embedded model, its sample scenes and a finished explanation."""

import pytest

import deepexplain as de
import deepexplain_scenes as scenes


@pytest.fixture(scope="session")
def shapes() -> de.LoadedModel:
    """The embedded shapes model on the CPU."""
    return de.load_model("shapes", device="cpu")


@pytest.fixture(scope="session")
def sample() -> scenes.Scene:
    """The embedded disk sample (image and object mask)."""
    return scenes.load_sample(scenes.CLASS_NAMES[0])


@pytest.fixture(scope="session")
def images() -> list:
    """Three sample images (star, disk, ring) that stop at different steps under the stopping rule."""
    return [scenes.load_sample(name).image for name in ("star", "disk", "ring")]
