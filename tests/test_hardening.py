"""Hostile inputs, broken models and interrupted runs: each is a clear error or a correct result, never a NaN
result, a traceback from deep inside or a half-written output folder."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deepexplain as de
import deepexplain_cli as cli
import deepexplain_io as dio

ROOT = Path(__file__).resolve().parents[1]


class Returns(nn.Module):
    """A model whose output is made by ``make(x)``: for models that return the wrong thing."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.make(x * self.weight)


def logits(k=3):
    return lambda x: x.mean(dim=(2, 3))[:, :1].repeat(1, k) * torch.arange(1.0, k + 1)


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("values, error, message", [
    ({"lr": float("inf")}, ValueError, "lr must be a number in (0, 1000]"),
    ({"lr": float("nan")}, ValueError, "lr must be a number in (0, 1000], got nan"),
    ({"lr": 1e308}, ValueError, "lr must be a number in (0, 1000]"),
    ({"l1_coeff": float("inf")}, ValueError, "l1_coeff must be a number in [0, inf)"),
    ({"area_coeff": float("nan")}, ValueError, "area_coeff must be"),
    ({"steps": 1_000_000_000_000}, ValueError, "steps must be an integer in [1, 1000000]"),
    ({"steps": 100_000_000}, ValueError, "steps must be an integer in [1, 1000000]"),
    ({"steps": 2.5}, ValueError, "steps must be an integer"),
    ({"steps": "100"}, TypeError, "steps must be an integer in [1, 1000000], got str '100'"),
    ({"lr": "0.1"}, TypeError, "lr must be a number"),
    ({"lr": True}, TypeError, "lr must be a number"),
    ({"lr": None, "power": [2]}, TypeError, "power must be a number"),
    ({"smoothing": float("inf")}, ValueError, "smoothing must be a number in [0, 1000]"),
    ({"mask_size": 100_000}, ValueError, "mask_size must be an integer in [2, 512]"),
    ({"kernel_size": 1_000_001}, ValueError, "kernel_size must be an integer in [1, 31]"),
    ({"nblocks": 1000}, ValueError, "nblocks must be an integer in [1, 20]"),
    ({"dilation": 10**6}, ValueError, "dilation must be an integer in [1, 1000]"),
    ({"power": 1e9}, ValueError, "power must be a number in (0, 100]"),
    ({"jitter": 10**9}, ValueError, "jitter must be an integer in [0, 1000]"),
    ({"runs": 1000}, ValueError, "runs must be an integer in [1, 100]"),
    ({"precision": 16}, TypeError, "precision must be a string"),
    ({"generator": "unet"}, ValueError, "generator must be one of plain, masked"),
    ({"difference": None, "momentum": 0.9}, ValueError, "unknown setting(s): momentum"),
    ({"preset": "slow"}, ValueError, "unknown preset 'slow'"),
    ({"preset": "seed", "settings": de.Settings()}, ValueError, "give a preset or a Settings object, not both"),
    ({"settings": {"lr": 0.1}}, TypeError, "settings must be a deepexplain.Settings"),
    ({"target": 2.0}, TypeError, "a target class must be an integer index, got float 2.0"),
    ({"target": "2"}, TypeError, "a target class must be an integer index"),
    ({"target": -1}, ValueError, "target class -1 is out of range"),
    ({"target": 6}, ValueError, "target class 6 is out of range: the model has 6 classes"),
])
def test_bad_api_input_is_a_named_error(shapes, values, error, message):
    with pytest.raises(error, match=re.escape(message)):
        de.explain("star", shapes, verbose=False, **{"steps": 2, **values})


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((0, 0, 3), dtype=np.uint8), ValueError, "image of 0×0 px is too small"),
    (np.zeros((5, 40, 3), dtype=np.uint8), ValueError, "image of 5×40 px is too small"),
    (np.full((32, 32, 3), 1.5), ValueError, "a float image must hold finite values in [0, 1]"),
    (np.full((32, 32, 3), np.nan), ValueError, "a float image must hold finite values"),
    (np.zeros((32, 32, 3), dtype=bool), ValueError, "unsupported image dtype bool"),
    (np.zeros((32, 32, 3), dtype=object), ValueError, "unsupported image dtype object"),
    (np.zeros((32, 32, 2), dtype=np.uint8), ValueError, "expected an H×W, H×W×3 or H×W×4 image"),
    (torch.zeros(2, 3, 32, 32), ValueError, "a tensor image must be C×H×W or 1×C×H×W"),
    ({"image": 1}, TypeError, "an image must be a path, a sample name, an array, a PIL image or a tensor"),
    (12, TypeError, "an image must be"),
])
def test_bad_images_are_named(shapes, image, error, message):
    with pytest.raises(error, match=re.escape(message)):
        de.explain(image, shapes, verbose=False, steps=2)


@pytest.mark.parametrize("make, labels, message", [
    (lambda x: (logits()(x),), None, "returned a tuple of 1 items"),
    (lambda x: logits()(x)[..., None], None, "returned a tensor of shape (1, 3, 1) for 1 image(s)"),
    (lambda x: logits()(x)[0], None, "returned a tensor of shape (3,)"),
    (lambda x: logits(1)(x), None, "K ≥ 2 classes"),
    (lambda x: logits()(x).long(), None, "torch.int64 values; it must return floating-point logits"),
    (lambda x: logits()(x) * float("nan"), None, "returned NaN or infinite logits"),
    (lambda x: logits()(x) + float("inf"), None, "returned NaN or infinite logits"),
    (lambda x: {"logits": logits()(x)}, None, "returned a dict"),
    (logits(), ["a", "b"], "returned 3 classes but has 2 labels"),
    (logits(), ["a", "b", "c", "d"], "returned 3 classes but has 4 labels"),
])
def test_a_model_that_returns_the_wrong_thing_is_named(make, labels, message):
    loaded = de.load_model(Returns(make), labels=labels)
    with pytest.raises(ValueError, match=re.escape(message)):
        de.explain("star", loaded, verbose=False, steps=2, runs=1)


def test_a_model_that_turns_nan_on_perturbed_images_stops_the_run_with_an_error():
    calls = []

    def make(x):
        calls.append(1)
        return logits()(x) * (float("nan") if len(calls) > 1 else 1.0)  # finite only on the first forward

    with pytest.raises(ValueError, match="the optimization diverged: the loss at step 1 is nan"):
        de.explain("star", de.load_model(Returns(make)), verbose=False, steps=3, runs=1)


def test_a_diverging_optimization_is_an_error_not_a_nan_result(shapes):
    with pytest.raises(ValueError, match="the optimization diverged: the loss at step 1 is inf"):
        de.explain("star", shapes, preset="seed", verbose=False, steps=3, l1_coeff=1e308, lr=1000)


def test_a_tensor_image_that_requires_grad_is_read_and_left_alone(shapes):
    image = torch.rand(3, 48, 64, requires_grad=True)
    before = image.detach().clone()
    result = de.explain(image, shapes, verbose=False, steps=2, runs=1)
    assert np.isfinite(result.saliency).all() and result.saliency.shape == (224, 224)
    assert torch.equal(image.detach(), before) and image.grad is None
    np.testing.assert_array_equal(de.read_image(image), de.read_image((before.permute(1, 2, 0).numpy())))


# --------------------------------------------------------------------------- images

def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((40, 64, 3), dtype=np.uint8)
    image[:10, :10] = (255, 0, 0)  # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(image).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = de.load_image(tmp_path / "phone.jpg")
    assert upright.shape == (64, 40, 3)  # portrait, as a phone shows it
    assert upright[:10, -10:, 0].mean() > 200 and upright[:10, :10, 0].mean() < 50  # the corner went top right


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setenv(de.MAX_PIXELS_ENV, "10000")
    with pytest.raises(ValueError, match=re.escape("image of 120×100 px has 12,000 pixels, over the limit of 10,000; "
                                                   f"set {de.MAX_PIXELS_ENV}")):
        de.load_image(tmp_path / "big.png")
    monkeypatch.setenv(de.MAX_PIXELS_ENV, "12000")
    assert de.load_image(tmp_path / "big.png").shape == (100, 120, 3)
    monkeypatch.setenv(de.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{de.MAX_PIXELS_ENV} must be a positive whole number"):
        de.load_image(tmp_path / "big.png")


def test_pillows_decompression_bomb_limit_is_replaced_by_ours(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would warn, then raise, for this file
    assert de.load_image(tmp_path / "big.png").shape == (100, 120, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # and its setting is left as it was


# --------------------------------------------------------------------------- outputs

def test_strict_json_never_writes_nan(tmp_path, shapes):
    result = de.explain("star", shapes, preset="seed", verbose=False, steps=2)
    result.perturbed_score = float("nan")
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        de.save_outputs(result, tmp_path, "star")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_the_way_of_one_output_stops_before_anything_is_written(tmp_path, shapes):
    result = de.explain("star", shapes, preset="seed", verbose=False, steps=2)
    (tmp_path / "star_summary.json").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder of that name is in the way"):
        de.save_outputs(result, tmp_path, "star")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star_summary.json"]


def test_a_failed_rename_puts_the_previous_outputs_back(tmp_path, monkeypatch):
    paths = [tmp_path / name for name in ("a.txt", "b.txt", "c.txt")]
    dio.write_atomically({p: (lambda f: f.write(b"old")) for p in paths})
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == paths[2] and str(src).endswith(".tmp"):  # the third new output cannot be put in place
            raise OSError("device went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="device went away"):
        dio.write_atomically({p: (lambda f: f.write(b"new")) for p in paths})
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]  # no temporary or backup left
    assert [p.read_bytes() for p in paths] == [b"old"] * 3


def test_signals_are_held_back_inside_the_deferred_block():
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with dio.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            seen.append("still inside")
    assert seen == ["still inside"]


# --------------------------------------------------------------------------- interrupted command lines

SLOW_WRITER = """
import sys, time
import matplotlib.figure
import deepexplain_cli
flag, argv = sys.argv[1], sys.argv[2:]
real_savefig = matplotlib.figure.Figure.savefig
def slow_savefig(self, *args, **kwargs):
    real_savefig(self, *args, **kwargs)
    open(flag, "w").close()  # tell the test: a temporary file is being written
    time.sleep(60)
matplotlib.figure.Figure.savefig = slow_savefig
sys.exit(deepexplain_cli.main(argv))
"""


def run_until_write_phase(tmp_path, argv, timeout=240):
    """Start ``deepexplain_cli.main(argv)`` in a process whose figure writes hang; return it once one started."""
    flag = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(flag), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not flag.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached its write phase"
        time.sleep(0.1)
    return process


@pytest.mark.parametrize("command", [
    ["explain", "star", "--model", "shapes", "--preset", "seed", "--steps", "2", "--device", "cpu"],
    ["evaluate", "--scenes", "1", "--methods", "center", "--sanity-scenes", "0", "--shortcut-scenes", "0"],
])
@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_run_stopped_while_writing_leaves_no_output_and_no_temporary_file(tmp_path, command, signum, code, word):
    out = tmp_path / "out"
    process = run_until_write_phase(tmp_path, [*command, "--out", str(out)])
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # caught in the middle of writing
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and err.strip().splitlines()[-1] == f"deepexplain: {word}"
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "deepexplain.py"), "explain", "star", "--model", "shapes"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # torch is still being imported
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip() == "deepexplain: interrupted"


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "lr must be a number in (0, 1000], got inf"),
    (["--l1-coeff", "inf"], "l1_coeff must be a number in [0, inf), got inf"),
    (["--lr", "nan"], "lr must be"),
    (["--lr", "1e308"], "lr must be"),
    (["--steps", "1000000000000"], "steps must be an integer in [1, 1000000]"),
    (["--smoothing", "inf"], "smoothing must be"),
    (["--mask-size", "100000"], "mask_size must be an integer in [2, 512]"),
    (["--power", "-2"], "power must be"),
    (["--target", "-1"], "out of range"),
    (["--generator", "unet"], "generator must be one of plain, masked"),
    (["--runs", "2", "--generator", "plain"], "runs must be 1 with the 'plain' generator"),
    (["--seed", "100000000000000000000000"], "seed must be an integer in [-2**62, 2**62]"),
    (["--target", "2.5"], "argument --target: invalid int value: '2.5'"),
    (["--preset", "turbo"], "argument --preset: invalid choice: 'turbo'"),
    (["--out", "{file}"], "is a file, not a folder"),
])
def test_cli_rejects_hostile_input_in_one_line(tmp_path, capsys, args, message):
    out, file = tmp_path / "out", tmp_path / "a_file"
    file.write_text("not a folder")
    code = cli.main(["explain", "star", "--model", "shapes", "--steps", "2", "--device", "cpu", "--out", str(out),
                     *(a.format(file=file) for a in args)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"deepexplain: error: {err.split('error: ', 1)[1]}" and message in err
    assert "\n" not in err and not out.exists()
