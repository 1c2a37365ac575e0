"""Optimizers and learning-rate schedules on toy models; no Django."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers.optimization import Adafactor

from workers.ml.errors import TrainingDataError
from workers.ml.optimization import SCHEDULERS, build_optimizer, build_scheduler, learning_rate_at

CPU = torch.device("cpu")


def toy_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)
    )


def train_steps(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, model: torch.nn.Module, n: int
) -> list[float]:
    """The learning rate each of ``n`` real optimizer steps used."""
    used = []
    for _ in range(n):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        model(torch.tensor([[1, 2, 3]])).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return used


def schedule(name: str, *, total_steps: int, warmup_steps: int = 0, **kwargs: Any) -> list[float]:
    """Multipliers for steps ``0..total_steps`` (inclusive) read through a real optimizer with lr 1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, name=name, warmup_steps=warmup_steps, total_steps=total_steps, **kwargs)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(learning_rate_at(scheduler))
        assert optimizer.param_groups[0]["lr"] == lrs[-1]
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_warms_up_linearly_to_the_peak(name: str) -> None:
    lrs = schedule(name, warmup_steps=4, total_steps=12)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)


def test_constant_stays_at_the_peak() -> None:
    assert schedule("constant", warmup_steps=2, total_steps=10)[2:] == pytest.approx([1.0] * 9)


def test_linear_decays_to_the_minimum_ratio() -> None:
    assert schedule("linear", total_steps=10) == pytest.approx([1 - i / 10 for i in range(11)])
    lrs = schedule("linear", warmup_steps=2, total_steps=10, min_lr_ratio=0.2)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.2 + 0.8 * 0.5)
    assert lrs[10] == pytest.approx(0.2)


def test_cosine_follows_half_a_cosine_to_the_minimum_ratio() -> None:
    lrs = schedule("cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    after_warmup = lrs[2:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[12] == pytest.approx(0.1)
    assert schedule("cosine", total_steps=8)[8] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_restarts_jumps_back_to_the_peak() -> None:
    lrs = schedule("cosine_with_restarts", total_steps=10, num_cycles=2)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[4] < 0.1
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[9] < 0.1
    assert lrs[10] == pytest.approx(0.0)
    assert schedule("cosine_with_restarts", total_steps=10, num_cycles=1) == pytest.approx(
        schedule("cosine", total_steps=10)
    )


def test_step_decay_multiplies_by_gamma_at_each_boundary() -> None:
    lrs = schedule("step", warmup_steps=2, total_steps=11, step_size=3, gamma=0.5)
    assert lrs[2:] == pytest.approx([1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.125])
    # Default step size: a third of the 9 steps after warmup.
    assert schedule("step", warmup_steps=1, total_steps=10)[1:] == pytest.approx(
        [1.0] * 3 + [0.1] * 3 + [0.01] * 3 + [1e-3]
    )
    assert min(schedule("step", total_steps=10, step_size=1, gamma=0.5, min_lr_ratio=0.1)) == pytest.approx(0.1)


def test_polynomial_with_power_one_is_linear_and_higher_powers_fall_faster() -> None:
    kwargs = {"warmup_steps": 3, "total_steps": 13, "min_lr_ratio": 0.2}
    assert schedule("polynomial", power=1.0, **kwargs) == pytest.approx(schedule("linear", **kwargs))
    squared = schedule("polynomial", power=2.0, **kwargs)
    assert squared[8] == pytest.approx(0.2 + 0.8 * 0.25)
    assert squared[13] == pytest.approx(0.2)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_resumed_run_continues_with_identical_learning_rates(name: str) -> None:
    kwargs: dict[str, Any] = {"name": name, "warmup_steps": 3, "total_steps": 14, "num_cycles": 2, "step_size": 2}

    model = toy_model()
    optimizer = build_optimizer(model, name="adamw", learning_rate=0.01, weight_decay=0.1, device=CPU)
    scheduler = build_scheduler(optimizer, **kwargs)
    train_steps(optimizer, scheduler, model, 7)
    saved = scheduler.state_dict()
    uninterrupted = train_steps(optimizer, scheduler, model, 7)

    # A fresh optimizer whose state is not loaded: the scheduler alone must restore the learning rate.
    model = toy_model()
    optimizer = build_optimizer(model, name="adamw", learning_rate=0.01, weight_decay=0.1, device=CPU)
    scheduler = build_scheduler(optimizer, **kwargs)
    scheduler.load_state_dict(saved)
    assert train_steps(optimizer, scheduler, model, 7) == uninterrupted

    model = toy_model()
    optimizer = build_optimizer(model, name="adamw", learning_rate=0.01, weight_decay=0.1, device=CPU)
    scheduler = build_scheduler(optimizer, completed_steps=7, **kwargs)
    assert scheduler.last_epoch == 7
    assert train_steps(optimizer, scheduler, model, 7) == uninterrupted


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": "exponential"}, "scheduler"),
        ({"total_steps": 0, "warmup_steps": 0}, "max_steps"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"name": "step", "step_size": 0}, "lr_step_size"),
        ({"name": "step", "gamma": 0.0}, "lr_gamma"),
        ({"name": "step", "gamma": 1.5}, "lr_gamma"),
        ({"name": "polynomial", "power": 0.0}, "lr_power"),
        ({"name": "cosine_with_restarts", "num_cycles": 0}, "lr_num_cycles"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_bad_scheduler_values_name_the_hyperparameter(kwargs: dict[str, Any], param: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    arguments = {"name": "linear", "warmup_steps": 2, "total_steps": 10} | kwargs
    with pytest.raises(TrainingDataError) as raised:
        build_scheduler(optimizer, **arguments)
    assert raised.value.code == "invalid_hyperparameter"
    assert raised.value.param == param


def test_adamw_decays_only_matrices_and_skips_frozen_parameters() -> None:
    model = toy_model()
    embedding, first, norm, last = model
    embedding.weight.requires_grad_(False)

    optimizer = build_optimizer(model, name="adamw", learning_rate=3e-4, weight_decay=0.1, device=CPU, betas=(0.8, 0.9))

    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(first.weight), id(last.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(first.bias), id(norm.weight), id(norm.bias), id(last.bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["lr"] == no_decay["lr"] == 3e-4
    assert decay["betas"] == (0.8, 0.9)
    assert decay["fused"] is True  # the fused CPU kernel: one pass per tensor instead of several elementwise ops


def test_fused_adamw_on_the_cpu_updates_like_the_reference_implementation() -> None:
    models = [toy_model(), toy_model()]  # the same initial weights
    fused = build_optimizer(models[0], name="adamw", learning_rate=1e-2, weight_decay=0.1, device=CPU)
    twin = dict(zip(models[0].parameters(), models[1].parameters(), strict=True))
    reference = torch.optim.AdamW(
        [
            {"params": [twin[parameter] for parameter in group["params"]], "weight_decay": group["weight_decay"]}
            for group in fused.param_groups
        ],
        lr=1e-2,
        foreach=False,
    )
    inputs = torch.randint(0, 10, (4, 6))
    for _ in range(5):
        for model, optimizer in zip(models, (fused, reference), strict=True):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for trained, expected in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw_is_fused_on_cuda() -> None:
    model = toy_model().cuda()
    optimizer = build_optimizer(model, name="adamw", learning_rate=1e-3, weight_decay=0.0, device=torch.device("cuda"))
    assert optimizer.param_groups[0]["fused"] is True


def test_sgd_uses_momentum() -> None:
    model = toy_model()
    optimizer = build_optimizer(model, name="sgd", learning_rate=0.1, weight_decay=0.0, device=CPU, momentum=0.8)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["momentum"] == 0.8 and group["nesterov"] is False for group in optimizer.param_groups)
    scheduler = build_scheduler(optimizer, name="constant", warmup_steps=0, total_steps=2)
    train_steps(optimizer, scheduler, model, 2)
    assert optimizer.state[model[1].weight]["momentum_buffer"] is not None


def test_adafactor_follows_the_schedule_and_reduces_a_quadratic_loss() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    target = torch.randn(8, 8)
    optimizer = build_optimizer(model, name="adafactor", learning_rate=0.05, weight_decay=0.0, device=CPU)
    assert isinstance(optimizer, Adafactor)
    scheduler = build_scheduler(optimizer, name="cosine", warmup_steps=5, total_steps=60)
    assert learning_rate_at(scheduler) == pytest.approx(0.05 / 5)

    def loss() -> torch.Tensor:
        return (model.weight - target).pow(2).sum() + model.bias.pow(2).sum()

    initial = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        scheduler.step()
    assert loss().item() < 0.25 * initial
    assert math.isfinite(loss().item())


def test_unknown_or_invalid_optimizer_settings_name_the_hyperparameter() -> None:
    model = toy_model()
    with pytest.raises(TrainingDataError) as raised:
        build_optimizer(model, name="lion", learning_rate=1e-3, weight_decay=0.0, device=CPU)
    assert (raised.value.code, raised.value.param) == ("invalid_hyperparameter", "optimizer")
    with pytest.raises(TrainingDataError) as raised:
        build_optimizer(model, name="adamw", learning_rate=0.0, weight_decay=0.0, device=CPU)
    assert raised.value.param == "learning_rate"
    with pytest.raises(TrainingDataError) as raised:
        build_optimizer(model, name="adamw", learning_rate=1e-3, weight_decay=-1.0, device=CPU)
    assert raised.value.param == "weight_decay"
