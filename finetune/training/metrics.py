"""Metrics the bare Trainer doesn't give: throughput, peak memory, model size, FLOPs, MFU and perplexity.

Each number comes from a small pure function below, so tests can call it directly. `MetricsCallback` applies them:

- per log step (W&B history, console): `train/perplexity`, `train/input_tokens_per_second`,
  `train/samples_per_second`, `train/peak_vram_gb` (CUDA); on evaluation `eval/perplexity`, `eval/best_perplexity`;
- once at the end: the run summary (see `summary()`), written to W&B and to `output_dir/summary.json`.

One basis per word: *input tokens* are every non-padding token fed to the model; *target tokens* are the ones with
a loss. Throughput is over training time only (`TrainingClock`: evaluations and checkpoint saves are left out,
wherever they fall). Memory and sizes are in decimal units (GB = 10^9 bytes, MB = 10^6).

Cheap by construction: token and sample counts come from the unpadded features on the host, in the collator
(`finetune.training.trainer.CountingCollator`), and travel with the batch as plain ints, so no step waits for the
device.
Loss sums stay on the device between reads; CUDA memory and cross-rank sums are read at log steps and checkpoints
only. Sums and maxima cover every rank and every micro-step.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from finetune.model.load import count_parameters
from finetune.training import preference
from finetune.training.flops import mfu, training_flops
from finetune.training.ranks import launch_record, reduce_across_ranks, world_size

GB = 1e9  # bytes: every *_gb figure is in decimal gigabytes
MB = 1e6

# Pure functions ------------------------------------------------------------------------------------------------

def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean token cross-entropy; inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def batch_counts(features: list[dict[str, Any]], ignore_index: int = -100) -> tuple[int, int, int]:
    """(samples, input tokens, target tokens) of unpadded features.

    Input tokens are every token fed to the model (no padding). Target tokens are the ones the loss is computed
    on: labels other than `ignore_index`, after the causal shift (the first position predicts nothing).
    """
    inputs = sum(len(feature["input_ids"]) for feature in features)
    targets = sum(sum(1 for label in feature["labels"][1:] if label != ignore_index) for feature in features)
    return len(features), inputs, targets


def weight_bits(quantization: str, dtype) -> int:
    """Bits per base weight: 4 or 8 when quantized, else the dtype's width."""
    if quantization == "int4":
        return 4
    if quantization == "int8":
        return 8
    return dtype.itemsize * 8


def host_peak_rss_gb() -> float:
    """This process's peak resident memory in GB: Linux's VmHWM (the peak of this program's own memory), else
    ru_maxrss (KiB on Linux, bytes on macOS). On Linux ru_maxrss also counts the memory of the process that started
    this one, at the time it did (it is kept across fork and exec): a run started from a large process (a notebook,
    a test runner) would report that process's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def base_weight_bytes(model) -> int:
    """Bytes of the base model's parameters as held in memory: everything but LoRA adapters, 4-bit and 8-bit
    layers at their packed size (what quantization saves). For full fine-tuning, every parameter."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" not in name)


# Trainer wiring ------------------------------------------------------------------------------------------------

@dataclass
class Totals:
    samples: float = 0
    input_tokens: float = 0
    target_tokens: float = 0
    loss_sum: float = 0  # sum over optimizer steps of the step's training loss, as the Trainer logs it

    def as_list(self) -> list[float]:
        return [self.samples, self.input_tokens, self.target_tokens, self.loss_sum]

    def plus(self, values) -> Totals:
        return Totals(*(a + b for a, b in zip(self.as_list(), values, strict=True)))


class TrainingClock:
    """Wall time spent training. It stops while the Trainer evaluates or writes a checkpoint and goes on afterwards,
    so an interrupted interval is continued, never dropped or restarted; it stops for good at the last step."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds  # accumulated while stopped
        self.since: float | None = None  # perf_counter() when it last started, None while stopped

    def start(self) -> None:
        if self.since is None:
            self.since = time.perf_counter()

    def stop(self) -> None:
        if self.since is not None:
            self.seconds += time.perf_counter() - self.since
            self.since = None

    def read(self) -> float:
        return self.seconds + (time.perf_counter() - self.since if self.since is not None else 0.0)


def wait_for_device() -> None:
    """Let queued GPU work finish, so that it is timed as what queued it. A device sync point: called only where
    training pauses (before an evaluation or checkpoint, and at the last step), never per step."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class MetricsCallback(TrainerCallback, ExportableState):
    """Adds throughput, memory and perplexity to the Trainer's logs and builds the run summary.

    Its totals are saved in every checkpoint (trainer_state.json) and restored on resume, so a resumed run's
    summary covers the whole training, not just the part after the restart.
    """

    def __init__(self, objective: str = "sft"):
        self.objective = objective  # sft: the loss is a token cross-entropy, so it has a perplexity
        self.interval = Totals()  # this rank, since the last close (log step or checkpoint)
        self.interval_loss = None  # this rank's summed step losses since the last close: a device tensor, no sync
        self.unlogged = Totals()  # all ranks, since the last log step
        self.totals = Totals()  # all ranks, whole run
        self.clock = TrainingClock()  # training time only: evaluation and checkpoint saving left out
        self.clock_at_last_log = 0.0
        self.waiting_for: set[str] = set()  # what the clock waits for before it goes on ("evaluate", "save")
        self.finished = False  # the last step has run: the clock stays stopped
        self.eval_steps: list[int] = []  # global step of each evaluation
        self.peak_vram = 0.0
        self.peak_vram_reserved = 0.0
        self.peak_ram_gb = 0.0
        self.eval_losses: list[float] = []

    @property
    def train_seconds(self) -> float:
        return self.clock.read()

    def add(self, counts: tuple[int, int, int]) -> None:
        self.interval = self.interval.plus((*counts, 0))

    def add_loss(self, loss) -> None:
        """One micro-step's loss tensor, as the Trainer accumulates it; added on the device, read at closes."""
        self.interval_loss = loss if self.interval_loss is None else self.interval_loss + loss

    def _close_interval(self) -> None:
        """Sum this rank's counts since the last close over all ranks, into the totals and into what the next log
        step reports. Collective: called on every rank at the same point (log steps, before checkpoints, at the
        end). Reading the loss is a device sync; at a log step the Trainer has just synced to read its own."""
        loss = float(self.interval_loss) if self.interval_loss is not None else 0.0
        summed = reduce_across_ranks([*self.interval.as_list()[:3], loss], "sum")
        summed[3] /= world_size()  # the Trainer logs the mean loss over ranks
        self.totals = self.totals.plus(summed)
        self.unlogged = self.unlogged.plus(summed)
        self.interval, self.interval_loss = Totals(), None

    def _read_cuda_peak(self) -> float | None:
        """Peak allocated GB since the last read, max over ranks; resets the counter. Log steps only."""
        import torch

        if not torch.cuda.is_available():
            return None
        allocated, reserved = reduce_across_ranks(
            [torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB], "max")
        torch.cuda.reset_peak_memory_stats()
        self.peak_vram = max(self.peak_vram, allocated)
        self.peak_vram_reserved = max(self.peak_vram_reserved, reserved)
        return allocated

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if args.eval_on_start:
            self.waiting_for = {"evaluate"}  # the clock starts once that evaluation is over
        else:
            self.clock.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.finished:
            self.waiting_for.clear()  # whatever the last step scheduled is over by now
            self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        self._pause_for(args, control)
        if control.should_save:  # a checkpoint follows: bring the totals it will record up to this step
            self._close_interval()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._pause_for(args, control)

    def _pause_for(self, args, control) -> None:
        """Stop the clock when an evaluation or a checkpoint follows this step, or training ends here."""
        waiting = {name for name, due in (("evaluate", control.should_evaluate), ("save", control.should_save)) if due}
        if waiting and str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            waiting.add("save")  # decided after the evaluation; if none comes, the next step starts the clock
        if not (waiting or control.should_training_stop):
            return
        wait_for_device()
        self.clock.stop()
        self.waiting_for |= waiting
        self.finished = self.finished or control.should_training_stop

    def _resume_after(self, event: str) -> None:
        self.waiting_for.discard(event)
        if not self.waiting_for and not self.finished:
            self.clock.start()

    def on_evaluate(self, args, state, control, **kwargs):
        self.eval_steps.append(state.global_step)
        self._resume_after("evaluate")

    def on_save(self, args, state, control, **kwargs):
        self._resume_after("save")

    def add_to_log(self, logs: dict[str, float]) -> None:
        """Add this callback's numbers to a log the Trainer is about to hand to its loggers (FinetuneTrainer.log),
        so that every logger, W&B's included, sees them."""
        if "loss" in logs:  # a training log, on every rank: the Trainer has just synced to read the loss
            self._close_interval()
            interval, now = self.unlogged, self.clock.read()
            seconds, self.unlogged, self.clock_at_last_log = now - self.clock_at_last_log, Totals(), now
            if self.objective == "sft":
                logs["perplexity"] = perplexity(logs["loss"])
            logs["input_tokens_per_second"] = rate(interval.input_tokens, seconds)
            logs["samples_per_second"] = rate(interval.samples, seconds)
            peak = self._read_cuda_peak()
            if peak is not None:
                logs["peak_vram_gb"] = peak
        elif "eval_loss" in logs:
            self.eval_losses.append(logs["eval_loss"])
            if self.objective == "sft":
                logs["eval_perplexity"] = perplexity(logs["eval_loss"])
                logs["eval_best_perplexity"] = perplexity(min(self.eval_losses))

    def on_train_end(self, args, state, control, **kwargs):
        self.finished = True
        self.clock.stop()
        self._close_interval()
        self._read_cuda_peak()
        (self.peak_ram_gb,) = reduce_across_ranks([host_peak_rss_gb()], "max")

    def evaluated_at(self, step: int) -> bool:
        """Whether an evaluation already ran at this global step (the Trainer evaluates at the last one)."""
        return step in self.eval_steps

    def state(self) -> dict:
        return {"args": {}, "attributes": {
            "totals": self.totals.as_list(), "train_seconds": self.train_seconds, "peak_vram": self.peak_vram,
            "peak_vram_reserved": self.peak_vram_reserved, "eval_losses": self.eval_losses}}

    def restore(self, checkpoint: Path) -> None:
        """Continue the totals saved in a checkpoint's trainer_state.json (nothing to do if it has none)."""
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("stateful_callbacks", {})
        attributes = saved.get(type(self).__name__, {}).get("attributes")
        if not attributes:
            return
        self.totals = Totals(*attributes["totals"])
        self.clock = TrainingClock(attributes["train_seconds"])
        self.clock_at_last_log = self.clock.seconds
        self.peak_vram, self.peak_vram_reserved = attributes["peak_vram"], attributes["peak_vram_reserved"]
        self.eval_losses = list(attributes["eval_losses"])

    def summary(self, trainer, model_args, saved_weights: list[Path]) -> dict[str, Any]:
        """The run summary: one flat dict, units in the names. CUDA keys only on CUDA, MFU only on known GPUs."""
        import torch

        from finetune.model import gguf as gguf_import
        from finetune.model.load import dtype_choice

        model, state, args = trainer.model, trainer.state, trainer.args
        trainable, total = count_parameters(model)
        total_flops = training_flops(model, total, self.totals.input_tokens, self.totals.samples, model_args.use_lora,
                                     *preference_forwards(trainer))
        base_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                          next(model.parameters()).dtype)
        seconds = self.train_seconds

        out: dict[str, Any] = {
            "train/input_tokens_per_second": rate(self.totals.input_tokens, seconds),
            "train/samples_per_second": rate(self.totals.samples, seconds),
            "train/input_tokens": int(self.totals.input_tokens),
            "train/target_tokens": int(self.totals.target_tokens),
            "train/samples": int(self.totals.samples),
            "train/train_seconds": seconds,
            "train/peak_ram_gb": self.peak_ram_gb,
            "train/total_flops": total_flops,
        }
        if state.global_step:
            out["train/mean_loss"] = self.totals.loss_sum / state.global_step
        if torch.cuda.is_available():
            out["train/peak_vram_gb"] = self.peak_vram
            out["train/peak_vram_reserved_gb"] = self.peak_vram_reserved
            utilisation = mfu(total_flops, seconds, torch.cuda.get_device_name(), args.world_size)
            if utilisation is not None:
                out["train/mfu"] = utilisation
        out.update({
            "model/total_params": int(total),
            "model/trainable_params": int(trainable),
            "model/trainable_percent": 100.0 * trainable / total if total else 0.0,
            "model/weight_bits": weight_bits(model_args.quantization, base_dtype),
            "model/base_weights_gb": base_weight_bytes(model) / GB,
            "model/memory_footprint_gb": model.get_memory_footprint() / GB,
            "model/compute_dtype": dtype_choice(model_args.dtype)[0],
            **{f"model/{key}": value for key, value in gguf_import.info(model_args.model_name_or_path).items()},
        })
        if saved_weights:
            out["model/saved_weights_mb"] = sum(p.stat().st_size for p in saved_weights) / MB
        if self.eval_losses:
            out["eval/loss"] = self.eval_losses[-1]
            if self.objective == "sft":
                out["eval/perplexity"] = perplexity(self.eval_losses[-1])
                out["eval/best_perplexity"] = perplexity(min(self.eval_losses))
        out.update(preference_metrics(state.log_history))
        out["final/total_steps"] = state.global_step
        out["final/total_epochs"] = state.epoch
        out.update(launch_record())
        out["run/world_size"] = args.world_size
        return out


def preference_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each of TRL's preference metrics, training's and evaluation's, as summary keys
    (`train/rewards/accuracies`, `eval/rewards/accuracies`, ...). Empty for a supervised run."""
    out = {}
    names = dict.fromkeys(name for names in preference.METRICS.values() for name in names)
    for entry in log_history:
        for name in names:
            if name in entry:
                out[f"train/{name}"] = entry[name]
            if f"eval_{name}" in entry:
                out[f"eval/{name}"] = entry[f"eval_{name}"]
    return out


def preference_forwards(trainer) -> tuple[int, int]:
    """(forward passes per input token besides training's own, sequences per example) of a run's objective: DPO's
    reference forward (none when precomputed) over both answers of a pair; KTO's reference forward, and its KL
    term's forwards (policy and reference) over as many mismatched tokens. (0, 1) for supervised training."""
    objective = getattr(getattr(trainer, "recipe", None), "objective", None)
    if objective is None or not objective.preference:
        return 0, 1
    reference = 0 if trainer.args.precompute_ref_log_probs else 1
    if objective.objective == "dpo":
        return reference, 2
    kl = getattr(trainer, "calculate_KL", False)
    return reference + (1 + reference if kl else 0), 1


# The console table: (summary key, label with its unit and basis, format). README "Metrics" explains each.
REPORT_ROWS = [
    ("train/mean_loss", "train loss, mean over the run", "{:.4f}"),
    ("eval/loss", "eval loss, last", "{:.4f}"),
    ("eval/perplexity", "eval perplexity, last", "{:.2f}"),
    ("eval/best_perplexity", "eval perplexity, best", "{:.2f}"),
    ("eval/preference_accuracy_start", "preference accuracy, held out, at the start", "{:.1%}"),
    ("eval/preference_accuracy", "preference accuracy, held out, at the end", "{:.1%}"),
    ("eval/rewards/accuracies", "reward accuracy vs reference, eval", "{:.1%}"),
    ("eval/rewards/margins", "reward margin vs reference, eval", "{:.3f}"),
    ("train/input_tokens_per_second", "input tokens/s, all ranks", "{:,.0f}"),
    ("train/samples_per_second", "samples/s, all ranks", "{:,.2f}"),
    ("train/input_tokens", "input tokens (no padding)", "{:,}"),
    ("train/target_tokens", "target tokens (with loss)", "{:,}"),
    ("train/train_seconds", "training time (s)", "{:,.1f}"),
    ("train/peak_vram_gb", "peak VRAM allocated (GB)", "{:.2f}"),
    ("train/peak_vram_reserved_gb", "peak VRAM reserved (GB)", "{:.2f}"),
    ("train/peak_ram_gb", "peak host RAM (GB)", "{:.2f}"),
    ("train/mfu", "MFU", "{:.1%}"),
    ("model/trainable_params", "trainable params", "{:,}"),
    ("model/total_params", "total params", "{:,}"),
    ("model/weight_bits", "bits per base weight", "{}"),
    ("model/compute_dtype", "compute dtype", "{}"),
    ("model/gguf_quantization", "GGUF file's quantization", "{}"),
    ("model/base_weights_gb", "base weights in memory (GB)", "{:.4f}"),
    ("model/saved_weights_mb", "saved weights (MB)", "{:.2f}"),
    ("final/total_steps", "steps", "{}"),
    ("run/world_size", "processes", "{}"),
]


def format_report(summary: dict[str, Any]) -> str:
    """The headline numbers as a two-column table for the console."""
    rows = [(label, fmt.format(summary[key])) for key, label, fmt in REPORT_ROWS if key in summary]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    return "\n".join([rule] + [f"{label:<{width}}   {value:>{value_width}}" for label, value in rows] + [rule])


def report(trainer, output_dir: Path, summary: dict[str, Any]) -> None:
    """Tell the user what the run did, its headline numbers (the table), and where everything went."""
    import logging

    from finetune.training import rundir

    logger = logging.getLogger("finetune")
    world = trainer.args.world_size
    logger.info("trained %d steps on %d process%s", trainer.state.global_step, world, "es" if world > 1 else "")
    evals = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    if len(evals) > 1 and evals[0][0] < evals[-1][0]:
        (first_step, first), (last_step, last) = evals[0], evals[-1]
        if trainer.recipe.objective.preference:
            logger.info("eval loss (%s): %.4f (step %d) -> %.4f (step %d)", trainer.recipe.objective.objective,
                        first, first_step, last, last_step)
        else:
            logger.info("eval loss: %.4f (step %d) -> %.4f (step %d); perplexity %.2f -> %.2f", first, first_step,
                        last, last_step, perplexity(first), perplexity(last))
    if "eval/preference_accuracy" in summary:
        logger.info("preference accuracy on %d held-out pairs: %.1f%% at the start -> %.1f%% at the end",
                    summary["eval/preference_pairs"], 100 * summary["eval/preference_accuracy_start"],
                    100 * summary["eval/preference_accuracy"])
    print(format_report(summary), file=sys.stderr)
    weights = rundir.saved_weights(output_dir, trainer.recipe.model.use_lora)
    written = [path.name for path in weights[:1]] + [rundir.RECIPE, rundir.SUMMARY] + \
        [path.name for _, path in sorted(rundir.checkpoints(output_dir))]
    logger.info("wrote %s: %s", output_dir, ", ".join(written))
