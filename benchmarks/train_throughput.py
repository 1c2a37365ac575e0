"""Training throughput of the engine against the stock Hugging Face Trainer, on variable-length short texts; prints
one JSON object.

    .venv/bin/python benchmarks/train_throughput.py [--size mini] [--max-length 256] [--batch-size 8] [--steps 20]

Both sides train the same GPT-2 (``workers.ml.modeling.build_from_scratch``, same size, vocabulary, max_length and
seed) on the same generated documents, tokenized by the same byte-level BPE tokenizer into the same token sequences
(the engine's own ``tokenize``: the text, then end-of-text, cut at max_length), with the same batch size, number of
optimizer steps and torch threads. Each side runs in its own subprocess, so each peak memory is its own.

- ``ours``: ``workers.ml.engine.run_training``, which packs the examples into rows of max_length tokens (position ids
  restart at every example: no attention across examples, no padding).
- ``baseline``: ``transformers.Trainer`` with per-batch dynamic padding (``DataCollatorWithPadding``, labels = the
  input ids with padded positions -100), ``train_sampling_strategy="random"`` (no length grouping: what
  ``group_by_length=False`` was before transformers 5), its default optimizer, no torch.compile.

Only the steady state is timed: the ``--steps`` optimizer steps after ``--warmup-steps`` (data reading, tokenizing,
model building, compilation and export are not). ``tokens_per_second`` counts useful tokens only (every token of
every example the timed steps trained on, never padding), counted from the batches themselves; the engine's own
count for the same steps is reported next to it as ``engine_counted_tokens``.

The sides run one after the other (the engine first), ``--repeats`` times in turn, and each finished run's figures
are printed on stderr as one JSON line at once (a run cut off by a time limit keeps them); each side's best run is
reported (the machine may be shared: the best run is the one least slowed by others), with every run's figure in
``runs_tokens_per_second``.

Documents have 5-120 words, uniformly (``--lengths uniform``) or log-uniformly (``--lengths log-uniform``: many
short ones and a long tail, closer to chat data). Dynamic padding pads each batch to its longest example, so the
baseline's padding share depends on how much lengths vary within a batch, not on max_length.

Peak memory: ``peak_rss_mb`` is the subprocess's peak resident memory (ru_maxrss), ``peak_rss_growth_mb`` that less
its memory after imports; on CUDA ``peak_cuda_allocated_mb`` is torch.cuda.max_memory_allocated. On CUDA ``mfu`` is
6 x parameters x tokens_per_second / 989e12 (the bf16 dense peak of an H100/H200 SXM).

Attention of packed rows (``--kernels``): the engine's packed-row kernel is chosen by ``workers.ml.packed_gpt2``
(FlexAttention on CUDA, ``blocked`` on a CPU); ``--kernels hf,blocked,flex,varlen`` measures each in its own run
(``by_kernel``), and ``ours`` is the one a job would get. A kernel that fails is reported under ``failed_kernels``.
Goal on CUDA: ``mfu`` ≥ 0.35 (``goal_met``); on a CPU: a speed-up ≥ 4×.

CUDA graphs: on CUDA the engine replays its compiled packed-row body as CUDA graphs (``workers/ml/engine.py``,
``_cuda_graphs_wanted``); ``--without-cuda-graphs`` also measures it compiled without them (``TUNEHOUSE_CUDA_GRAPHS=0``)
in the same run, under ``ours_without_cuda_graphs``.

Profile (``--profile-steps N``): the engine trains N more steps after the timed ones under torch.profiler, and each
run's ``profile`` lists the kernels (CUDA) or operators (CPU) that took the most time per step, and on CUDA the share
of the step's wall time the device was busy (well under 1: the step waits on the host).

Defaults on a CPU: model "mini", max_length 256, batch 8, torch threads = half the cores (what the engine uses on a
CPU, and never more: the engine lowers a higher count). On CUDA the reference setting: "base" (GPT-2 ~124M with a ~50k
vocabulary), max_length 1024, batch 16, and torch.compile for the engine where it compiles (compile "auto").

LoRA (``--lora CATALOG_ID``, e.g. ``smollm2-135m-instruct``): both sides train the engine's default LoRA adapters on
that offline catalog model (converted once into ``TUNEHOUSE_MODEL_CACHE_DIR``, default ``var/model-cache``), with its
own tokenizer; the baseline's model is the engine's own (``_model_for``), so only the loop differs: the Trainer's
padded batches and stock head against packed rows, the fused loss that skips the frozen head's weight gradient and, on
a CPU, blocked attention for the Llama family (``workers/ml/cpu_attention.py``). A long LoRA run on a CPU keeps the
model eager and compiles only the loss's chunk work, and the benchmark gives the engine that (``compile`` says so).

Compile (``--compile auto``): what the engine's "auto" gives a long job. On CUDA that is torch.compile; on a CPU auto
compiles runs of 200 steps or more where a C++ compiler is installed, so the benchmark's few timed steps are run
compiled there too (``compile`` says ``auto (a long run: on)``); compilation happens in the untimed warm-up steps.

Precision (``--precision best``): the engine runs bf16 autocast where the device has bf16 kernels — CUDA GPUs that
support it, and CPUs whose oneDNN has them (AVX512-BF16 / AMX: the engine's precision "bf16", which a job sets; its
"auto" stays fp32 on a CPU). ``baseline`` is the Trainer at its stock precision: its default fp32 on a CPU, bf16 on
CUDA. When the two differ, ``baseline_same_precision`` is the Trainer given the engine's precision too
(``bf16=True``), and ``speedup_same_precision`` what is left of the speed-up once precision is equal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from benchmarks.machine import cpu_model  # noqa: E402  (the repository root is on sys.path from here)

# bf16 dense peak of an H100 / H200 SXM, in FLOP/s.
_PEAK_FLOPS = 989e12
_GOAL_CPU_SPEEDUP = 4.0
_GOAL_GPU_MFU = 0.35
_ONSETS = ["", "b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "z"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st", "m"]
_LEXICON_SIZE = 20_000
_MIN_WORDS = 5
_MAX_WORDS = 120
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def generate_documents(count: int, *, seed: int, log_uniform: bool = False) -> list[str]:
    """``count`` documents of 5-120 words: sentences of Zipf-distributed pseudo-words, so that a byte-level BPE can
    learn a vocabulary of realistic size (tens of thousands of tokens) from them."""
    chooser = random.Random(seed)
    words: set[str] = set()
    while len(words) < _LEXICON_SIZE:
        words.add(
            "".join(
                chooser.choice(_ONSETS) + chooser.choice(_VOWELS) + chooser.choice(_CODAS)
                for _ in range(chooser.randint(1, 3))
            )
        )
    lexicon = sorted(words)
    chooser.shuffle(lexicon)
    cumulative = []
    total = 0.0
    for rank in range(len(lexicon)):
        total += 1.0 / (rank + 1)
        cumulative.append(total)
    documents = []
    for _ in range(count):
        if log_uniform:
            length = round(math.exp(chooser.uniform(math.log(_MIN_WORDS), math.log(_MAX_WORDS))))
        else:
            length = chooser.randint(_MIN_WORDS, _MAX_WORDS)
        drawn = chooser.choices(lexicon, cum_weights=cumulative, k=length)
        sentences = []
        start = 0
        while start < length:
            end = start + chooser.randint(4, 15)
            sentences.append(" ".join(drawn[start:end]).capitalize() + ".")
            start = end
        documents.append(" ".join(sentences))
    return documents


# ------------------------------------------------------------------------------------------------ the two sides


def _training_config(spec: dict[str, Any]):
    from workers.ml.config import TrainingConfig

    model: dict[str, Any] = {"mode": "from_scratch", "architecture": "gpt2", "model_size": spec["size"]}
    if spec.get("base_model"):  # LoRA on a catalog model: its own tokenizer, the engine's default LoRA settings
        model = {"mode": "lora", "base_model": spec["base_model"]}
    return TrainingConfig(
        train_file=spec["train_file"],
        output_dir=spec["output_dir"],
        task="causal_lm",
        **model,
        tokenizer=spec["tokenizer"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        max_steps=spec["warmup_steps"] + spec["steps"] + spec.get("profile_steps", 0),
        warmup_steps=spec["warmup_steps"],
        # Metrics events are where steps are timed, and each one waits for the device: as few as the timing needs
        # (with the default 5 warm-up and 20 timed steps, one per 5 steps: a job's default). The last step, where
        # profiling ends, always has one.
        log_every_steps=math.gcd(spec["warmup_steps"], spec["steps"]),
        compile=spec["compile"],
        precision=spec["precision"],
        seed=spec["seed"],
        device=spec["device"],
    )


def _train_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from workers.ml import engine
    from workers.ml.data import training_sets
    from workers.ml.engine import run_training

    if spec.get("long_run_compiles_loss"):
        engine._CPU_LOSS_COMPILE_MIN_LOGITS = 0  # what a long run of this model gets (see main)

    # Read-only instrumentation: every micro-batch the engine collates is counted (exact useful tokens: the tokens
    # of the examples in each packed row, its padded tail left out), in the order the steps take them.
    collated: list[tuple[int, int, int]] = []  # (useful tokens, engine's own count, tokens computed)
    original_collate = training_sets.BatchSource.collate

    def counting_collate(source, indices):
        batch = original_collate(source, indices)
        if source.packed is not None:
            positions = source.packed.position_ids[indices]
            starts = positions == 0
            length = positions.shape[1]
            has_tail = starts.sum(dim=1) > source.packed.examples_per_row[indices]
            last_start = (starts * torch.arange(length)).amax(dim=1)
            useful = int(torch.where(has_tail, last_start, length).sum())
        else:
            useful = int(batch.attention_mask.sum()) if batch.attention_mask is not None else batch.input_ids.numel()
        collated.append((useful, batch.useful_tokens, batch.input_ids.numel()))
        return batch

    training_sets.BatchSource.collate = counting_collate

    warmup, steps, profile_steps = spec["warmup_steps"], spec["steps"], spec.get("profile_steps", 0)

    class Recorder:
        def __init__(self) -> None:
            self.step_times: dict[int, float] = {}
            self.start: dict[str, Any] = {}
            self.threads = 0
            self.profiler: torch.profiler.profile | None = None

        def on_event(self, event) -> None:
            if event.type == "metrics":
                # The engine reads the loss (.item()) before emitting: on CUDA the step's work is done by now.
                step = event.data["step"]
                self.step_times[step] = time.perf_counter()
                self.threads = torch.get_num_threads()
                # The profiled steps come after the timed ones, so profiling never slows what is timed.
                if profile_steps and step == warmup + steps:
                    self.profiler = _start_profiler(torch)
                elif self.profiler is not None and step == warmup + steps + profile_steps:
                    self.profiler.stop()
            elif event.data and "num_parameters" in event.data:
                self.start = dict(event.data)

        def should_stop(self) -> bool:
            return False

    recorder = Recorder()
    result = run_training(_training_config(spec), recorder)
    timed = collated[warmup : warmup + steps]
    expected = warmup + steps + profile_steps
    if result.steps_completed != expected or len(collated) != expected:
        raise RuntimeError(f"expected {expected} steps, got {result.steps_completed} ({len(collated)} batches)")
    profile = {}
    if recorder.profiler is not None:
        profiled_seconds = recorder.step_times[expected] - recorder.step_times[warmup + steps]
        profile = {"profile": _profile_summary(recorder.profiler, profile_steps, profiled_seconds)}
    return {
        **profile,
        "seconds": recorder.step_times[warmup + steps] - recorder.step_times[warmup],
        "useful_tokens": sum(useful for useful, _, _ in timed),
        "engine_counted_tokens": sum(counted for _, counted, _ in timed),
        "computed_tokens": sum(computed for _, _, computed in timed),
        "parameters": result.num_parameters,
        "precision": recorder.start.get("precision"),
        "vocab_size": recorder.start.get("vocab_size"),
        "train_rows": recorder.start.get("train_rows"),
        "threads": recorder.threads,
        "attention_kernel": None if spec.get("base_model") else spec["kernel"],
        "cuda_graphs": recorder.start.get("cuda_graphs"),
    }


def _start_profiler(torch):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def _profile_summary(profiler, steps: int, seconds: float, top: int = 40) -> dict[str, Any]:
    """What the profiled steps spent their time on: on a GPU the kernels (and copies) that ran on the device, with the
    milliseconds per step each took, grouped into matmuls, attention and the rest, and the share of the steps' wall
    time the device was busy at all (well under 1: the step waits on the host: Python, kernel launches,
    synchronisations); on a CPU the operators' self time. The steps' wall time includes the profiler's own cost."""
    import torch

    events = list(profiler.key_averages())
    device_events = [event for event in events if event.device_type != torch.autograd.DeviceType.CPU]
    if device_events:
        ranked = sorted(device_events, key=lambda event: event.self_device_time_total, reverse=True)
        times = {event.key: event.self_device_time_total / 1000 / steps for event in ranked}
    else:
        ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)
        times = {event.key: event.self_cpu_time_total / 1000 / steps for event in ranked}
    busy_ms = sum(times.values())
    step_ms = 1000 * seconds / steps
    summary: dict[str, Any] = {
        "measured": "device kernels and copies" if device_events else "CPU operators (self time)",
        "steps": steps,
        "wall_ms_per_step": round(step_ms, 2),
        "busy_ms_per_step": round(busy_ms, 2),
        "busy_share": round(busy_ms / step_ms, 3) if device_events else None,
    }
    if device_events:
        groups = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "cublas"), "attention": ("flex", "flash", "fmha")}
        by_group = dict.fromkeys([*groups, "other"], 0.0)
        for name, milliseconds in times.items():
            group = next((group for group, marks in groups.items() if any(m in name.lower() for m in marks)), "other")
            by_group[group] += milliseconds
        summary["ms_per_step_by_group"] = {group: round(value, 2) for group, value in by_group.items()}
    summary["top"] = [
        {"name": event.key[:120], "ms_per_step": round(times[event.key], 3), "calls_per_step": event.count / steps}
        for event in ranked[:top]
    ]
    if device_events:
        # What the host spends on each operator (dispatch, launches, Python under it): a step whose host time
        # exceeds its device time leaves the device idle.
        host = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)
        summary["host_top"] = [
            {
                "name": event.key[:120],
                "self_cpu_ms_per_step": round(event.self_cpu_time_total / 1000 / steps, 3),
                "calls_per_step": event.count / steps,
            }
            for event in host[:15]
        ]
    return summary


def _baseline_from_scratch(config, tokenizer):
    from workers.ml import modeling

    return modeling.build_from_scratch(
        architecture="gpt2",
        size=config.model_size,
        task="causal_lm",
        vocab_size=len(tokenizer),
        max_length=config.max_length,
        init=config.init,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # The very model the engine builds: same dropout as the engine's config resolved.
        dropout=config.dropout,
    )


def _train_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from workers.ml import engine, modeling
    from workers.ml.callbacks import NullCallback
    from workers.ml.data.training_sets import read_example_sets, tokenize_like_config

    config = _training_config(spec)
    cuda = spec["device"].startswith("cuda")
    sets = read_example_sets(config, NullCallback())
    if config.base_model:
        # The engine's own tokenizer (pad token set as a job gets it) and LoRA model: the same adapters, targets and
        # dropout; only the training loop differs.
        tokenizer = engine._tokenizer_for(config, sets, None)
        torch.manual_seed(config.seed)
        model = engine._model_for(config, tokenizer, None)
    else:
        tokenizer = modeling.load_tokenizer(spec["tokenizer"])
        torch.manual_seed(config.seed)
        model = _baseline_from_scratch(config, tokenizer)
    tokenizer.model_max_length = config.max_length
    tokenized = tokenize_like_config(sets.train, tokenizer, config=config, sets=sets)
    dataset = [{"input_ids": ids} for ids in tokenized.input_ids]
    padding = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(features):
        batch = padding(features)
        # Masked by attention_mask, not by comparing with the pad id: pad is end-of-text, which is trained.
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    counted: list[tuple[int, int]] = []  # (useful tokens, tokens computed) per training_step
    step_ends: list[float] = []

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            counted.append((int(inputs["attention_mask"].sum()), inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    warmup, steps = spec["warmup_steps"], spec["steps"]
    with tempfile.TemporaryDirectory(prefix="tunehouse-bench-trainer-") as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=1,
            max_steps=warmup + steps,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=warmup,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            bf16=spec["precision"] == "bf16",
            use_cpu=not cuda,
            train_sampling_strategy="random",  # no length grouping (the old group_by_length=False)
            dataloader_num_workers=0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=config.seed,
        )
        trainer = CountingTrainer(
            model=model, args=arguments, train_dataset=dataset, data_collator=collate, callbacks=[StepClock()]
        )
        trainer.train()
    if len(step_ends) != warmup + steps or len(counted) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} steps, got {len(step_ends)} ({len(counted)} batches)")
    timed = counted[warmup : warmup + steps]
    return {
        "seconds": step_ends[warmup + steps - 1] - step_ends[warmup - 1],
        "useful_tokens": sum(useful for useful, _ in timed),
        "computed_tokens": sum(computed for _, computed in timed),
        "parameters": modeling.count_parameters(model),
        "precision": spec["precision"],
        "vocab_size": len(tokenizer),
        "train_rows": len(dataset),
        "threads": torch.get_num_threads(),
    }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(side: str, spec_path: str, result_path: str) -> None:
    import torch
    import transformers  # noqa: F401 - imported before the memory baseline, like torch

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = (_train_ours if side == "ours" else _train_baseline)(spec)
    result["rss_after_imports_mb"] = round(rss_before, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes
    result["peak_rss_mb"] = round(peak, 1)
    result["peak_rss_growth_mb"] = round(peak - rss_before, 1)
    if cuda:
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(result_path).write_text(json.dumps(result))


def _run_side(side: str, spec: dict[str, Any], folder: Path, label: str | None = None) -> dict[str, Any]:
    from workers.ml.engine import CUDA_GRAPHS_VARIABLE
    from workers.ml.packed_gpt2 import KERNEL_VARIABLE

    spec_path = folder / "spec.json"
    result_path = folder / f"{side}.json"
    spec_path.write_text(json.dumps(spec))
    environment = dict(os.environ, **_OFFLINE)
    if spec.get("kernel"):
        environment[KERNEL_VARIABLE] = spec["kernel"]
    if spec.get("without_cuda_graphs"):
        environment[CUDA_GRAPHS_VARIABLE] = "0"
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", side, str(spec_path), str(result_path)],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {side} run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    # Each run's figure goes out as soon as it exists: a run cut off by a time limit (a lent GPU machine's, say) still
    # leaves the figures of the runs it finished.
    progress = {
        "finished": label or side,
        "kernel": spec.get("kernel"),
        "without_cuda_graphs": bool(spec.get("without_cuda_graphs")),
    }
    progress.update(_summary([result], spec["device"].startswith("cuda"), spec["steps"]))
    progress.pop("profile", None)
    print(json.dumps(progress), file=sys.stderr, flush=True)
    return result


def _tokens_per_second(raw: dict[str, Any]) -> float:
    return raw["useful_tokens"] / raw["seconds"]


def _summary(runs: list[dict[str, Any]], cuda: bool, steps: int) -> dict[str, Any]:
    raw = max(runs, key=_tokens_per_second)
    tokens_per_second = _tokens_per_second(raw)
    summary = {
        "tokens_per_second": round(tokens_per_second, 1),
        "runs_tokens_per_second": [round(_tokens_per_second(run), 1) for run in runs],
        "useful_tokens": raw["useful_tokens"],
        "computed_tokens": raw["computed_tokens"],
        "padding_share": round(1 - raw["useful_tokens"] / raw["computed_tokens"], 4),
        "seconds": round(raw["seconds"], 3),
        "seconds_per_step": round(raw["seconds"] / steps, 4),
    }
    if "engine_counted_tokens" in raw:
        summary["engine_counted_tokens"] = raw["engine_counted_tokens"]
    if cuda:
        summary["mfu"] = round(6 * raw["parameters"] * tokens_per_second / _PEAK_FLOPS, 4)
    for key in ("peak_rss_mb", "peak_rss_growth_mb", "peak_cuda_allocated_mb"):
        if key in raw:
            summary[key] = max(run[key] for run in runs)
    for key in (
        "rss_after_imports_mb",
        "precision",
        "threads",
        "train_rows",
        "attention_kernel",
        "cuda_graphs",
        "profile",
    ):
        if key in raw:
            summary[key] = raw[key]
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help='"auto" (cuda when available), "cpu", "cuda" or "cuda:N"')
    parser.add_argument("--size", choices=("tiny", "mini", "small", "base"), help="default: mini on CPU, base on CUDA")
    parser.add_argument(
        "--lora",
        metavar="CATALOG_ID",
        help="LoRA on this offline catalog model (e.g. smollm2-135m-instruct; the engine's default LoRA settings) "
        "instead of GPT-2 from scratch; converted once into TUNEHOUSE_MODEL_CACHE_DIR (default var/model-cache)",
    )
    parser.add_argument("--max-length", type=int, help="default: 256 on CPU, 1024 on CUDA")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU, 16 on CUDA")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=5,
        help="untimed steps before them (at least 1); metrics events, each of which waits for the device, come every "
        "gcd(warm-up, timed) steps",
    )
    parser.add_argument("--documents", type=int, help="generated documents; default: 4000 on CPU, 20000 on CUDA")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary; default: 8192 on CPU, 50257 on CUDA")
    parser.add_argument("--lengths", choices=("uniform", "log-uniform"), default="uniform", help="words per document")
    parser.add_argument("--repeats", type=int, help="runs of each side, best reported; default 2 (CPU), 1 (CUDA)")
    parser.add_argument(
        "--kernels",
        default="",
        help="comma-separated packed-row attention kernels of the engine to measure each (hf, sdpa, flex, varlen; "
        "see workers/ml/packed_gpt2.py); default: the one the engine picks on the device",
    )
    parser.add_argument("--threads", type=int, help="torch threads on CPU; default and maximum: half the cores")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the engine's compile")
    parser.add_argument(
        "--precision",
        choices=("best", "fp32", "bf16"),
        default="best",
        help="the engine's precision; best: bf16 where the device has bf16 kernels (CUDA, or a CPU whose oneDNN has "
        "them), else fp32",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile the engine for this many more steps after the timed ones (torch.profiler): the top kernels "
        "and how busy the device was, under each run's 'profile'",
    )
    parser.add_argument(
        "--without-cuda-graphs",
        action="store_true",
        help="CUDA: also measure the engine's compiled body without CUDA graphs (TUNEHOUSE_CUDA_GRAPHS=0), one more "
        "run, under 'ours_without_cuda_graphs'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON report to this file")
    arguments = parser.parse_args()
    if arguments.warmup_steps < 1 or arguments.steps < 1 or (arguments.repeats is not None and arguments.repeats < 1):
        parser.error("--steps, --warmup-steps and --repeats must be at least 1")
    if arguments.profile_steps < 0:
        parser.error("--profile-steps must be at least 0")

    import torch

    from workers.ml import modeling
    from workers.ml.engine import cpu_compile_works
    from workers.ml.model_cache import prepare_offline_model
    from workers.ml.packed_gpt2 import KERNELS, choose_kernel
    from workers.ml.tokenizer_training import train_byte_level_bpe

    device = arguments.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device is cuda but no CUDA device is available")
    threads = None
    if not cuda:
        engine_threads = max(1, (os.cpu_count() or 2) // 2)
        threads = min(arguments.threads or engine_threads, engine_threads)
    native_bf16 = torch.cuda.is_bf16_supported() if cuda else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precision = arguments.precision if arguments.precision != "best" else ("bf16" if native_bf16 else "fp32")
    # The stock Trainer's precision: its default fp32 on a CPU; bf16 on CUDA, the reference setting.
    stock_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    documents = arguments.documents or (20_000 if cuda else 4_000)
    repeats = arguments.repeats or (1 if cuda else 2)
    automatic_kernel = choose_kernel(torch.device(device))
    kernels = [kernel.strip() for kernel in arguments.kernels.split(",") if kernel.strip()] or [automatic_kernel]
    if any(kernel not in KERNELS for kernel in kernels):
        parser.error(f"--kernels: each one of {', '.join(KERNELS)}")
    vocab_size = arguments.vocab_size or (50_257 if cuda else 8_192)
    # The timed steps are few, but the figure stands for a long job: on a CPU "auto" compiles runs of 200 steps and
    # more (where a C++ compiler is installed), so the engine is given what auto gives such a run.
    engine_compile = arguments.compile
    # A long LoRA run of a catalog model keeps the model eager on a CPU (it would compile for minutes) and compiles
    # only the loss's chunk work, which auto does from a number of logits these few steps do not reach.
    long_run_compiles_loss = engine_compile == "auto" and not cuda and bool(arguments.lora) and cpu_compile_works()
    if engine_compile == "auto" and not cuda and not arguments.lora:
        engine_compile = "on" if cpu_compile_works() else "off"

    with tempfile.TemporaryDirectory(prefix="tunehouse-bench-") as temporary:
        folder = Path(temporary)
        texts = generate_documents(documents, seed=arguments.seed, log_uniform=arguments.lengths == "log-uniform")
        train_file = folder / "documents.jsonl"
        with train_file.open("w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")
        base_model = None
        if arguments.lora:
            cache = os.environ.get("TUNEHOUSE_MODEL_CACHE_DIR", str(REPOSITORY_ROOT / "var" / "model-cache"))
            base_model = str(prepare_offline_model(arguments.lora, cache))
            tokenizer = modeling.load_tokenizer(base_model)
        else:
            tokenizer = train_byte_level_bpe(texts, vocab_size=vocab_size)
            tokenizer.save_pretrained(folder / "tokenizer")
        lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + end-of-text
        spec = {
            "train_file": str(train_file),
            "output_dir": str(folder / "model"),
            "tokenizer": None if base_model else str(folder / "tokenizer"),
            "base_model": base_model,
            "size": arguments.size or ("base" if cuda else "mini"),
            "max_length": arguments.max_length or (1024 if cuda else 256),
            "batch_size": arguments.batch_size or (16 if cuda else 8),
            "steps": arguments.steps,
            "warmup_steps": arguments.warmup_steps,
            "compile": engine_compile,
            "long_run_compiles_loss": long_run_compiles_loss,
            "seed": arguments.seed,
            "device": device,
            "threads": threads,
            "precision": precision,
        }
        # The Trainer at its stock precision and, when the engine runs another one, also at the engine's: the
        # speed-up then splits into what precision gives and what the engine's own work gives.
        baseline_specs = {"baseline": dict(spec, precision=stock_precision)}
        if precision != stock_precision:
            baseline_specs["baseline_same_precision"] = spec
        started = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in (*baseline_specs, *kernels)}
        without_graphs: list[dict[str, Any]] = []
        failures: dict[str, str] = {}
        for _ in range(repeats):
            # The engine first: the figure the goal is about, announced on stderr even if a time limit cuts the rest.
            for kernel in kernels:
                # One kernel that fails on this device (say, a torch without it) must not lose the others' figures.
                try:
                    ours_spec = dict(spec, kernel=kernel, profile_steps=arguments.profile_steps)
                    runs[kernel].append(_run_side("ours", ours_spec, folder))
                except RuntimeError as error:
                    failures[kernel] = str(error)[-2000:]
            for side, side_spec in baseline_specs.items():
                runs[side].append(_run_side("baseline", side_spec, folder, label=side))
            if cuda and arguments.without_cuda_graphs:
                plain_spec = dict(spec, kernel=automatic_kernel, without_cuda_graphs=True)
                without_graphs.append(_run_side("ours", plain_spec, folder))
        wall_seconds = time.perf_counter() - started
        measured = [kernel for kernel in kernels if runs[kernel]]
        if not measured:
            raise RuntimeError(f"no engine run succeeded: {failures}")
        # "ours" is what a job gets: the engine's own choice of kernel when it was measured, else the first measured.
        ours_kernel = automatic_kernel if automatic_kernel in measured else measured[0]
        ours_runs, baseline_runs = runs[ours_kernel], runs["baseline"]

    ours, baseline = ours_runs[0], baseline_runs[0]
    if ours["parameters"] != baseline["parameters"] or ours["vocab_size"] != baseline["vocab_size"]:
        raise RuntimeError(f"the two models differ: {ours} / {baseline}")
    ours_summary = _summary(ours_runs, cuda, arguments.steps)
    baseline_summary = _summary(baseline_runs, cuda, arguments.steps)
    speedup = ours_summary["tokens_per_second"] / baseline_summary["tokens_per_second"]
    report: dict[str, Any] = {
        "benchmark": "useful (non-padding) training tokens per second: packed engine vs HF Trainer with padding",
        "precision": {"ours": precision, "baseline": stock_precision},
        "device": device,
        "device_name": _device_name(device),
        "architecture": None if arguments.lora else "gpt2",
        "size": None if arguments.lora else spec["size"],
        "lora": arguments.lora,
        "parameters": ours["parameters"],
        "vocab_size": ours["vocab_size"],
        "max_length": spec["max_length"],
        "batch_size": spec["batch_size"],
        "warmup_steps": arguments.warmup_steps,
        "timed_steps": arguments.steps,
        "documents": documents,
        "lengths": arguments.lengths,
        "document_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "document_tokens_max": max(lengths),
        "compile": "auto (a long run: the loss compiled)"
        if long_run_compiles_loss
        else arguments.compile
        if engine_compile == arguments.compile
        else f"auto (a long run: {engine_compile})",
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "ours": ours_summary,
        "baseline": baseline_summary,
        "speedup": round(speedup, 2),
        "wall_seconds": round(wall_seconds, 1),
    }
    if "baseline_same_precision" in runs:
        same_precision = _summary(runs["baseline_same_precision"], cuda, arguments.steps)
        report["baseline_same_precision"] = same_precision
        report["speedup_same_precision"] = round(
            ours_summary["tokens_per_second"] / same_precision["tokens_per_second"], 2
        )
    if without_graphs:
        plain = _summary(without_graphs, cuda, arguments.steps)
        report["ours_without_cuda_graphs"] = plain
        report["cuda_graphs_gain"] = round(ours_summary["tokens_per_second"] / plain["tokens_per_second"], 3)
    if len(kernels) > 1:
        report["by_kernel"] = {kernel: _summary(runs[kernel], cuda, arguments.steps) for kernel in measured}
    if failures:
        report["failed_kernels"] = failures
    if arguments.lora:
        pass  # the goals are set for GPT-2 from scratch; LoRA reports its figures without one
    elif cuda:
        report["goal_mfu"] = _GOAL_GPU_MFU
        report["goal_met"] = ours_summary["mfu"] >= _GOAL_GPU_MFU
    else:
        report["goal_speedup"] = _GOAL_CPU_SPEEDUP
        report["goal_met"] = speedup >= _GOAL_CPU_SPEEDUP
    print(json.dumps(report, indent=2))
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
