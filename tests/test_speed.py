"""The fast paths: batched generators, the stopping rule, bf16 autocast and the benchmark."""

import numpy as np
import pytest
import torch

import deepexplain as de
import deepexplain_cli as cli

def test_stacked_generator_applies_copy_i_to_image_i():
    torch.manual_seed(0)
    singles = [de.PerturbationGenerator() for _ in range(3)]
    stacked = de.PerturbationGenerator.stack(singles)
    x = torch.randn(3, 3, 32, 32)
    assert stacked.copies == 3 and stacked.conv.weight.shape == (9, 3, 3, 3)
    expected = torch.cat([g(x[i:i + 1]) for i, g in enumerate(singles)])
    torch.testing.assert_close(stacked(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 3 copies"):
        stacked(x[:2])


def test_batched_explanations_equal_separate_runs(shapes, images):
    # patience 4 stops the images at different steps, so copies leave the batch one by one
    options = dict(preset="seed", steps=30, patience=4, verbose=False)
    separate = [de.explain(image, shapes, **options) for image in images]
    batched = de.explain_batch(images, shapes, **options)
    assert len({e.steps_run for e in separate}) > 1
    for one, many in zip(separate, batched):
        assert many.steps_run == one.steps_run and many.target == one.target
        # rounding differs between a grouped and a single conv, and 30 steps amplify it: on this project's
        # 2-core AVX-512 CPU up to 4e-3 on 0.4% of the pixels (of a range of about 4.6), up to 2e-3 on others
        torch.testing.assert_close(many.perturbed, one.perturbed, atol=1e-2, rtol=0)
        np.testing.assert_allclose(many.losses, one.losses, atol=1e-4)
        assert many.center_of_mass == pytest.approx(one.center_of_mass, abs=1.0)


def test_explain_batch_checks_its_input(shapes, images):
    with pytest.raises(ValueError, match="no images"):
        de.explain_batch([], shapes)
    with pytest.raises(ValueError, match="3 images need 3 targets, got 1"):
        de.explain_batch(images, shapes, targets=[0], verbose=False)


def test_converged_needs_low_probability_and_a_flat_loss():
    flat, falling = [1.0] * 10 + [0.5] * 10, list(np.linspace(1.0, 0.1, 20))
    low, high = [0.001] * 20, [0.5] * 20
    assert de.converged(flat, low, original=0.9, patience=5)
    assert not de.converged(falling, low, original=0.9, patience=5)  # loss still improving
    assert not de.converged(flat, high, original=0.9, patience=5)    # probability not low enough
    assert not de.converged(flat[:9], low[:9], original=0.9, patience=5)  # fewer than 2 × patience steps
    assert not de.converged(flat, low, original=0.9, patience=0)  # patience 0: the seed's fixed steps
    one_spike = low[:-1] + [0.5]
    assert not de.converged(flat, one_spike, original=0.9, patience=5)


def test_optimization_stops_at_the_first_step_where_the_rule_holds(shapes, images):
    x = shapes.preprocessing(images[0])
    target = int(de.class_probabilities(shapes.model, x).argmax())
    result = de.optimize_perturbation(shapes.model, x, de.PerturbationGenerator(), target, steps=300,
                                      lr=0.03, patience=5, progress=False)
    t = result.steps_run
    assert t < 300 and len(result.losses) == t
    holds = [de.converged(result.losses[:s], result.probabilities[:s], result.original_score, 5)
             for s in range(1, t + 1)]
    assert holds[-1] and not any(holds[:-1])


def test_bf16_autocast_agrees_with_fp32_within_the_stated_tolerance(shapes, images):
    """README, "Performance": one step's loss within 1%, the generator's gradient at cosine ≥ 0.99."""
    x = shapes.preprocessing(images[0])
    target = int(de.class_probabilities(shapes.model, x).argmax())

    def loss_and_gradient(precision):
        torch.manual_seed(0)
        generator = de.PerturbationGenerator()
        with de.frozen(shapes.model), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            x_pert = generator(x)
            p = torch.softmax(shapes.model(x_pert).float(), dim=1)[0, target]
        loss = p + (x - x_pert.float()).abs().mean()
        loss.backward()
        return float(loss.detach()), torch.cat([q.grad.flatten() for q in generator.parameters()])

    loss32, grad32 = loss_and_gradient("fp32")
    loss16, grad16 = loss_and_gradient("bf16")
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) >= 0.99


def test_bf16_optimization_runs_and_returns_fp32(shapes, images):
    result = de.explain(images[0], shapes, preset="fast", steps=5, verbose=False)
    assert result.perturbed.dtype == torch.float32 and torch.isfinite(result.perturbed).all()
    assert result.hyperparameters["precision"] == "bf16" and result.steps_run == 5


def test_bench_quick_prints_its_machine_readable_last_line(capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    values = dict(pair.split("=", 1) for pair in last.split())
    assert values["model"] == "shapes" and values["images"] == "2" and values["quick"] == "1"
    for key in ("speedup", "batch_throughput", "hit_rate_a", "hit_rate_b", "deletion_a", "deletion_b"):
        assert float(values[key]) >= 0


def test_bench_bad_input_is_one_line(capsys):
    assert cli.main(["bench", "--images", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "images and batch must be positive" in err and len(err.splitlines()) == 1


def test_bench_times_a_torchvision_model_with_random_weights_when_pretrained_are_missing(monkeypatch, tmp_path):
    import deepexplain_bench

    monkeypatch.setenv(de.OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loaded, note = deepexplain_bench.load_bench_model("resnet18", "cpu", None)
    assert loaded.name == "resnet18" and "RANDOM weights" in note and "not in the torch hub cache" in note
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    with pytest.raises(ValueError, match="unknown model"):
        deepexplain_bench.load_bench_model("nonsense", "cpu", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_quick_on_cuda(capsys):
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 0
    assert "device=cuda" in capsys.readouterr().out.strip().splitlines()[-1]
