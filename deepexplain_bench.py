"""Speed benchmark: the seed preset against the project's fast configuration.

One run, one machine, one model, the same embedded scenes (those of the
evaluation, :data:`deepexplain_eval.FIRST_SCENE_ID` on) explained three ways:

* ``seed``: the seed preset (:data:`deepexplain.SEED_PRESET`: 1000 steps, fp32), one image at a time;
* ``fast``: :data:`deepexplain.FAST_PRESET` (stopping rule, larger learning rate, bf16), one image at a time;
* ``fast-batch``: the same, ``batch`` images per optimization (:func:`deepexplain.explain_batch`).

For each: steps run, image-steps per second, seconds per explanation, peak
memory, and the quality of the maps — center-of-mass hit rate and deletion AUC
(:mod:`deepexplain_eval`) — then the ratios, and a last line ``key=value …``
for scripts. ``python deepexplain.py bench --help`` (:mod:`deepexplain_cli`) runs it.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import deepexplain as de
import deepexplain_eval as ev

#: ``--quick``: a smoke run of every code path, not a measurement.
QUICK = {"images": 2, "steps": 10}


def peak_memory(device: torch.device) -> int:
    """Peak memory of this process so far, in bytes: CUDA tensors on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


@dataclass
class Run:
    """One configuration's measurements over all images."""

    name: str
    batch: int
    images: int
    seconds: float
    steps: int
    peak_bytes: int
    com_hits: list[float]
    deletions: list[float]

    @property
    def seconds_per_explanation(self) -> float:
        return self.seconds / self.images

    @property
    def steps_per_second(self) -> float:
        """Image-steps per second: one optimization step of one image counts as one."""
        return self.steps / self.seconds

    @property
    def hit_rate(self) -> float:
        return float(np.mean(self.com_hits))

    @property
    def deletion(self) -> float:
        return float(np.mean(self.deletions))


def run_configuration(model: str, device: str | None, weights_path: str | Path | None, *, images: int,
                      name: str, preset: str, batch: int, steps: int | None = None) -> Run:
    """Explain the first ``images`` scenes with ``preset``, ``batch`` images per optimization.

    Meant to run in a fresh process (:func:`benchmark` does), so that its peak
    memory is its own; a short warm-up run comes first and is not timed.
    """
    loaded, _ = load_bench_model(model, device, weights_path)
    cases = _cases(loaded, images)
    overrides = {} if steps is None else {"steps": steps}
    de.explain_batch([cases[0].image], loaded, preset=preset, verbose=False, steps=2)
    explanations = []
    start = time.perf_counter()
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        explanations += de.explain_batch([c.image for c in chunk], loaded, preset=preset,
                                         targets=[c.target for c in chunk], verbose=False, **overrides)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    seconds = time.perf_counter() - start
    peak = peak_memory(loaded.device)
    scores = [ev.score_map(loaded.model, case, e.saliency) for case, e in zip(cases, explanations)]
    return Run(name, batch, len(cases), seconds, sum(e.steps_run for e in explanations), peak,
               [s["com_hit"] for s in scores], [s["deletion"] for s in scores])


def _cases(loaded: de.LoadedModel, images: int) -> list[ev.Case]:
    return ev.scene_cases(loaded, range(ev.FIRST_SCENE_ID, ev.FIRST_SCENE_ID + images))


def step_flops(loaded: de.LoadedModel, case: ev.Case) -> dict[str, int]:
    """Floating-point operations of one fp32 optimization step of one image: classifier and generator."""
    generator = de.PerturbationGenerator().to(loaded.device)
    with de.frozen(loaded.model):
        with FlopCounterMode(display=False) as gen_counter:
            x_pert = generator(case.x)
            x_pert.sum().backward()
        x_in = x_pert.detach().requires_grad_(True)
        with FlopCounterMode(display=False) as model_counter:
            loaded.model(x_in)[0, case.target].backward()
    return {"classifier": model_counter.get_total_flops(), "generator": gen_counter.get_total_flops()}


def matmul_flops_per_second(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a large matrix product on ``device``: the practical peak a step could reach."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs += 1
    return 2 * size ** 3 * runs / (time.perf_counter() - start)


def load_bench_model(name: str, device: str | None, weights_path: str | Path | None) -> tuple[de.LoadedModel, str]:
    """The model to time, and a note; a torchvision model without its pretrained weights gets random ones."""
    try:
        return de.load_model(name, device=device, weights_path=weights_path), ""
    except ValueError as err:
        if name in ("auto", "shapes") or weights_path is not None or \
                name not in torchvision.models.list_models(module=torchvision.models):
            raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None)
        loaded = de.load_model(model, device=de.resolve_device(device))
        loaded.model.eval().requires_grad_(False)
        loaded.name = name
        return loaded, (f"note: {err.args[0].split(';')[0]}; {name} runs with RANDOM weights: the speed is "
                        "representative, the quality columns and the steps the stopping rule takes are not")


def benchmark(model: str = "shapes", images: int = 20, batch: int = 16, quick: bool = False,
              device: str | None = None, weights_path: str | Path | None = None) -> tuple[list[Run], dict, str]:
    """Run the three configurations; returns the runs, the last line's values and the printed report."""
    if int(images) != images or images < 1 or int(batch) != batch or batch < 1:
        raise ValueError(f"images and batch must be positive whole numbers, got {images} and {batch}")
    steps = QUICK["steps"] if quick else None
    images = min(images, QUICK["images"]) if quick else images
    loaded, note = load_bench_model(model, device, weights_path)  # fails here, once, on bad input
    configurations = [("seed", "seed", 1), ("fast", "fast", 1), ("fast-batch", "fast", min(batch, images))]
    runs = []
    for name, preset, size in configurations:  # a fresh process each, so that each peak memory is its own
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(run_configuration, model, device, weights_path, images=images, name=name,
                                    preset=preset, batch=size, steps=steps).result())
    cases = _cases(loaded, 1)
    seed, fast, fast_batch = runs
    flops = step_flops(loaded, cases[0])
    peak = matmul_flops_per_second(loaded.device)
    achieved = sum(flops.values()) * seed.steps_per_second
    summary = {
        "model": loaded.name, "device": str(loaded.device), "machine": ev.machine_name(loaded.device),
        "threads": torch.get_num_threads(), "images": images, "batch": fast_batch.batch, "quick": int(quick),
        "speedup": seed.seconds_per_explanation / fast.seconds_per_explanation,
        "speedup_batch": seed.seconds_per_explanation / fast_batch.seconds_per_explanation,
        "batch_throughput": fast.seconds / fast_batch.seconds,
        "hit_rate_a": seed.hit_rate, "hit_rate_b": fast.hit_rate, "hit_rate_batch": fast_batch.hit_rate,
        "deletion_a": seed.deletion, "deletion_b": fast.deletion, "deletion_batch": fast_batch.deletion,
        "s_per_explanation_a": seed.seconds_per_explanation, "s_per_explanation_b": fast.seconds_per_explanation,
        "s_per_explanation_batch": fast_batch.seconds_per_explanation,
        "peak_fraction": achieved / peak,
    }
    return runs, summary, report(runs, summary, flops, achieved, peak, note)


def report(runs: Sequence[Run], summary: dict, flops: dict[str, int], achieved: float, peak: float,
           note: str) -> str:
    """The human-readable table, ratios and roofline line; the machine-readable line comes last."""
    lines = [f"deepexplain bench: model {summary['model']} on {summary['device']} ({summary['machine']}, "
             f"{summary['threads']} threads), {summary['images']} embedded scenes"
             + (" — QUICK smoke run (10 steps), not a measurement" if summary["quick"] else "")]
    if note:
        lines.append(note)
    lines.append(f"{'configuration':<14}{'batch':>6}{'steps':>8}{'steps/s':>9}{'s/expl.':>9}"
                 f"{'peak MiB':>10}{'CoM hit':>9}{'deletion':>10}")
    for run in runs:
        lines.append(f"{run.name:<14}{run.batch:>6}{run.steps / run.images:>8.0f}{run.steps_per_second:>9.1f}"
                     f"{run.seconds_per_explanation:>9.2f}{run.peak_bytes / 2**20:>10.0f}{run.hit_rate:>9.2f}"
                     f"{run.deletion:>10.3f}")
    lines.append(f"fast vs seed: {summary['speedup']:.1f}x less time per explanation "
                 f"({summary['speedup_batch']:.1f}x batched); batch of {summary['batch']} vs one at a time: "
                 f"{summary['batch_throughput']:.2f}x the throughput; CoM hit rate "
                 f"{summary['hit_rate_b'] - summary['hit_rate_a']:+.2f}, deletion AUC "
                 f"{summary['deletion_b'] - summary['deletion_a']:+.3f} (fast minus seed)")
    lines.append(f"one fp32 step of one image: classifier {flops['classifier'] / 1e9:.2f} GFLOP, generator "
                 f"{flops['generator'] / 1e9:.2f} GFLOP; the seed preset runs at {achieved / 1e9:.1f} GFLOP/s, "
                 f"{100 * summary['peak_fraction']:.0f}% of a 2048² fp32 matmul on this device "
                 f"({peak / 1e9:.0f} GFLOP/s)")
    lines.append(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                          for key, value in summary.items() if key != "machine"))
    return "\n".join(lines)
