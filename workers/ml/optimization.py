"""Optimizers and learning-rate schedules for training runs, chosen by name from the job's hyperparameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.optimization import Adafactor

from workers.ml.errors import TrainingDataError

INVALID_HYPERPARAMETER = "invalid_hyperparameter"

OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "step", "polynomial")


def _invalid(param: str, message: str) -> TrainingDataError:
    return TrainingDataError(INVALID_HYPERPARAMETER, message, param)


def build_optimizer(
    model: torch.nn.Module,
    *,
    name: str,
    learning_rate: float,
    weight_decay: float,
    device: torch.device | str,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) over the model's trainable parameters.

    Frozen parameters (most of the model under LoRA) are left out. Weight decay applies only to parameters with
    two or more dimensions (matrices, embeddings); biases, norm weights and other 1-D parameters are not decayed,
    as in GPT-2/3 training, because shrinking them towards zero only hurts. ``momentum`` is used by SGD and
    ``betas`` by AdamW; Adafactor keeps its default of no first moment, which is its memory saving.

    Raises ``TrainingDataError`` for an unknown name or a non-positive learning rate / negative weight decay.
    """
    if name not in OPTIMIZERS:
        raise _invalid("optimizer", f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise _invalid("learning_rate", f"learning_rate must be a positive number, got {learning_rate}.")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise _invalid("weight_decay", f"weight_decay must be zero or more, got {weight_decay}.")

    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": params, "weight_decay": group_decay}
        for params, group_decay in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    if not groups:
        raise ValueError("The model has no trainable parameters to optimize.")

    if name == "adamw":
        # The fused kernels update every parameter in one pass instead of several elementwise ops per tensor: on
        # CUDA one launch instead of many (noticeably faster for the many small LoRA tensors); on a CPU a step of
        # GPT-2 mini's 5.3M parameters takes 4 ms instead of 21 (a few percent of a training step). Elsewhere
        # PyTorch's default is kept.
        fused = True if torch.device(device).type in ("cuda", "cpu") else None
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=False)
    # Adafactor's own relative step size and parameter scaling are switched off so that, like the other
    # optimizers, its learning rate is exactly what build_scheduler sets.
    return Adafactor(groups, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    step_size: int | None = None,
    gamma: float = 0.1,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
    completed_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``name`` (one of ``SCHEDULERS``) as a ``LambdaLR`` multiplying the optimizer's peak lr.

    Every schedule warms up linearly over ``warmup_steps`` (multiplier ``(step + 1) / warmup_steps``) and then:

    * ``constant``: stays at the peak;
    * ``linear``: falls linearly to ``min_lr_ratio`` at ``total_steps``;
    * ``cosine``: follows half a cosine down to ``min_lr_ratio``;
    * ``cosine_with_restarts``: ``num_cycles`` such cosines, jumping back to the peak at each restart;
    * ``step``: multiplies by ``gamma`` every ``step_size`` steps (default a third of the steps after warmup),
      never going below ``min_lr_ratio``;
    * ``polynomial``: ``(1 - progress) ** power`` down to ``min_lr_ratio`` (``power=1`` is ``linear``).

    The multiplier is a pure function of the step, so the scheduler's state is just ``last_epoch``. To resume,
    build the same scheduler and ``load_state_dict`` the saved one, or pass ``completed_steps`` (the number of
    optimizer steps already taken): either way the learning rates continue exactly.

    Raises ``TrainingDataError`` naming the hyperparameter for an unknown name or an out-of-range value.
    """
    if name not in SCHEDULERS:
        raise _invalid("scheduler", f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    if total_steps < 1:
        raise _invalid("max_steps", f"The run needs at least one training step, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise _invalid("warmup_steps", f"warmup_steps must be between 0 and {total_steps}, got {warmup_steps}.")
    if num_cycles < 1:
        raise _invalid("lr_num_cycles", f"lr_num_cycles must be at least 1, got {num_cycles}.")
    if not 0 < gamma <= 1:
        raise _invalid("lr_gamma", f"lr_gamma must be in (0, 1], got {gamma}.")
    if not (power > 0 and math.isfinite(power)):
        raise _invalid("lr_power", f"lr_power must be a positive number, got {power}.")
    if not 0 <= min_lr_ratio <= 1:
        raise _invalid("min_lr_ratio", f"min_lr_ratio must be between 0 and 1, got {min_lr_ratio}.")
    decay_steps = max(1, total_steps - warmup_steps)
    if step_size is None:
        step_size = max(1, (total_steps - warmup_steps) // 3)
    elif step_size < 1:
        raise _invalid("lr_step_size", f"lr_step_size must be at least 1, got {step_size}.")
    if completed_steps < 0:
        raise ValueError(f"completed_steps must be zero or more, got {completed_steps}.")

    def floor(multiplier: float) -> float:
        return min_lr_ratio + (1.0 - min_lr_ratio) * multiplier

    decays: dict[str, Callable[[int, float], float]] = {
        "constant": lambda after, progress: 1.0,
        "linear": lambda after, progress: floor(1.0 - progress),
        "cosine": lambda after, progress: floor(0.5 * (1.0 + math.cos(math.pi * progress))),
        "cosine_with_restarts": lambda after, progress: (
            floor(0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))) if progress < 1 else min_lr_ratio
        ),
        "step": lambda after, progress: max(min_lr_ratio, gamma ** (after // step_size)),
        "polynomial": lambda after, progress: floor((1.0 - progress) ** power),
    }
    decay = decays[name]

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        after = step - warmup_steps
        return decay(after, min(1.0, after / decay_steps))

    # LambdaLR's constructor takes one step itself, so it must start from the step before the next one to run;
    # a fresh optimizer has no "initial_lr" yet, which LambdaLR requires when it does not start from scratch.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return _ResumableLambdaLR(optimizer, multiplier, last_epoch=completed_steps - 1)


class _ResumableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` whose ``load_state_dict`` also puts the restored learning rates into the optimizer.

    Plain ``LambdaLR`` only restores its own counters, so a fresh optimizer would take its next step at the
    first-step learning rate unless the optimizer's state happened to be loaded too.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=True):
            group["lr"] = lr


def learning_rate_at(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The current learning rate of the first parameter group."""
    return float(scheduler.get_last_lr()[0])
