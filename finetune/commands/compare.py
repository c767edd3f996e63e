"""Compare trained variants: quality against memory and against latency, with the Pareto frontier marked.

    python -m finetune.commands.compare outputs/matrix/* --out outputs/comparison
    python -m finetune.commands.compare outputs/matrix/* --quality lm_eval/tiny_tasks/exact_match   # a harness metric
    python -m finetune.commands.compare --wandb_project my-team/qlora-sweep --out outputs/comparison   # online runs
    make compare RUNS="outputs/lora_bf16 outputs/qlora_int4"

Each run directory contributes its recipe.yaml, summary.json (training), bench.json (inference, from
`python -m finetune.commands.bench`) and eval.json (lm-evaluation-harness, from `finetune eval`: every
`lm_eval/<task>/<metric>` becomes a column and can be the quality axis).
Writes comparison.md, comparison.csv and pareto.png to --out; with tracking on, also
a W&B run (job_type `comparison`) holding the table as a wandb.Table and the plot.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from finetune import errors
from finetune.errors import UsageError
from finetune.training import rundir

COLUMNS = [  # (key in a row, header, format)
    ("run", "run", "{}"),
    ("variant", "variant", "{}"),
    ("objective", "objective", "{}"),
    ("preference_accuracy", "preference accuracy (held out)", "{:.3f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("peak_vram_gb", "peak training VRAM (GB)", "{:.3f}"),
    ("peak_ram_gb", "peak training host RAM (GB)", "{:.3f}"),
    ("train_input_tokens_per_second", "train input tokens/s", "{:,.0f}"),
    ("eval_perplexity", "eval perplexity", "{:.3f}"),
    ("latency_ms_p50", "latency p50 (ms)", "{:.1f}"),
    ("base_weights_gb", "base weights in memory (GB)", "{:.4f}"),
    ("saved_weights_mb", "saved weights (MB)", "{:.2f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("exact_match_samples", "of samples", "{}"),
]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and higher y (quality) are better.

    A point is dominated when another is at least as good on both axes and better on one.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox <= x and oy >= y and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def read_run(directory: Path) -> dict[str, Any]:
    """One table row from a run directory's recipe, training summary and inference benchmark."""
    from finetune.tracking.wandb_run import variant_name

    recipe, summary, bench, evaluation = rundir.results(directory)
    if not summary and not bench and not evaluation:
        raise UsageError(f"{directory}: no {rundir.SUMMARY}, {rundir.BENCH} or {rundir.EVAL}; train (and bench, "
                         "evaluate) it first")

    dtype = recipe.get("dtype", "auto") if recipe.get("dtype") != "auto" else summary.get("model/compute_dtype", "auto")
    variant = variant_name(recipe.get("quantization", "none"), dtype,
                           recipe.get("use_lora", True)) if recipe else ""
    harness = {key: value for key, value in evaluation.items() if key.startswith(HARNESS_PREFIX)}
    # Which way is better, per harness metric, as the task declares it (eval.json's `higher_is_better`).
    directions = {f"{HARNESS_PREFIX}{task}/{metric}": higher
                  for task, metrics in evaluation.get("higher_is_better", {}).items()
                  for metric, higher in metrics.items()}
    objective = recipe.get("objective", "sft") if recipe else None
    # The latest held-out preference accuracy: `finetune eval`'s, else the one the run measured at its end.
    accuracy = evaluation.get("preference/accuracy", summary.get("eval/preference_accuracy"))
    return {"run": directory.name, "variant": variant, "objective": objective, "preference_accuracy": accuracy,
            **row_values(summary, bench), **harness,
            "higher_is_better": directions, "untrained": bool(evaluation.get("settings", {}).get("base_model"))}


HARNESS_PREFIX = "lm_eval/"


def harness_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """A column per harness score any run has (its stderr and counts stay in eval.json)."""
    keys = sorted({key for row in rows for key in row if key.startswith(HARNESS_PREFIX)
                   and not key.endswith(("_stderr", "/samples", "/seconds"))})
    return [(key, key, "{:.3f}") for key in keys]


def row_values(summary: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers from a training summary and an inference benchmark (either may be empty)."""
    return {
        "trainable_params": summary.get("model/trainable_params"),
        "peak_vram_gb": summary.get("train/peak_vram_gb"),
        "peak_ram_gb": summary.get("train/peak_ram_gb"),
        "train_input_tokens_per_second": summary.get("train/input_tokens_per_second"),
        "eval_perplexity": summary.get("eval/perplexity"),
        "latency_ms_p50": bench.get("inference/latency_ms_p50"),
        "base_weights_gb": summary.get("model/base_weights_gb"),
        "saved_weights_mb": summary.get("model/saved_weights_mb"),
        "exact_match": bench.get("inference/exact_match"),
        "exact_match_samples": bench.get("inference/exact_match_samples"),
    }


def read_wandb_project(path: str) -> list[dict[str, Any]]:
    """Rows from the training runs of an online W&B project (`entity/project`), through wandb.Api."""
    import wandb

    from finetune.tracking.wandb_run import online_problem

    problem = online_problem()
    if problem:
        raise UsageError(f"--wandb_project {path}: {problem}")

    rows = []
    for run in wandb.Api().runs(path, filters={"jobType": "training"}):
        summary = dict(run.summary)
        rows.append({"run": run.name, "variant": run.config.get("model_variant", ""),
                     **row_values(summary, summary)})
    return rows


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None or value == "" else fmt.format(value)


OUTPUTS = ("comparison.md", "comparison.csv", "pareto.png")  # everything a comparison writes into --out


def destination_problem(out: Path) -> str | None:
    """Why the comparison must not be written into `out`, or None: it is new, empty, or an earlier comparison's;
    never a run's directory, nor one holding other files (a model's, a dataset's, anyone's)."""
    if (out / rundir.RECIPE).is_file() or (out / rundir.MARKER).exists():
        return f"--out: {out} is a training run's directory; give a directory of its own (default outputs/comparison)"
    return rundir.destination_problem(out, "comparison", OUTPUTS)


def write_tables(rows: list[dict[str, Any]], out: Path, extra: list[tuple[str, str, str]] = ()) -> None:
    """comparison.md and comparison.csv: COLUMNS, with `extra` (key, header, format) columns after the first two,
    then harness scores; the Markdown table leaves out the columns no run has."""
    import io

    columns = COLUMNS[:2] + list(extra) + COLUMNS[2:] + harness_columns(rows)
    shown = [c for c in columns if any(cell(r, c[0], c[2]) != "-" for r in rows)]  # the CSV keeps every column
    header = "| " + " | ".join(h for _, h, _ in shown) + " |"
    rule = "|" + "|".join("---" for _ in shown) + "|"
    lines = [header, rule] + ["| " + " | ".join(cell(r, k, f) for k, _, f in shown) + " |" for r in rows]
    rundir.write_text(out / "comparison.md", "\n".join(lines) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[k for k, _, _ in columns])
    writer.writeheader()
    writer.writerows({k: r.get(k) for k, _, _ in columns} for r in rows)
    rundir.write_text(out / "comparison.csv", table.getvalue())


def quality_axis(rows: list[dict[str, Any]], requested: str | None = None) -> tuple[str, str, bool]:
    """(row key, label, higher is better): `requested` (a harness metric, `lm_eval/<task>/<metric>`, which every
    run must have); else exact match when every run has it and it tells them apart, else eval perplexity.
    Raises UsageError naming the runs without the requested metric, and the metrics they have."""
    if requested is not None:
        missing = [r["run"] for r in rows if r.get(requested) is None]
        if missing:
            from finetune.recipe.load import did_you_mean

            known = sorted({k for r in rows for k in r if k.startswith(HARNESS_PREFIX)})
            hint = did_you_mean(requested, known) if known else \
                "; evaluate the runs first (finetune eval RUN --tasks ...)"
            raise UsageError(f"--quality: {', '.join(missing)} have no `{requested}` in {rundir.EVAL}{hint}")
        higher = all(r.get("higher_is_better", {}).get(requested, True) for r in rows)
        samples = sorted({r.get(requested.rsplit("/", 1)[0] + "/samples") for r in rows} - {None})
        of = f" on {'/'.join(str(c) for c in samples)} samples" if samples else ""
        return requested, f"{requested}{of} ({'higher' if higher else 'lower'} is better)", higher
    preferences = [r.get("preference_accuracy") for r in rows]
    if None not in preferences and len(set(preferences)) > 1:
        return "preference_accuracy", "preference accuracy, held out (higher is better)", True
    matches = [r.get("exact_match") for r in rows]
    if None not in matches and len(set(matches)) > 1:
        counts = sorted({r.get("exact_match_samples") for r in rows} - {None})
        of = f" on {'/'.join(str(c) for c in counts)} samples" if counts else ""
        return "exact_match", f"exact match{of} (higher is better)", True
    return "eval_perplexity", "eval perplexity (lower is better)", False


def plot_pareto(rows: list[dict[str, Any]], path: Path, quality: str | None = None,
                measure: tuple[str, str, bool] | None = None, what: str = "Fine-tuning variants") -> Path:
    """Up to three panels, quality (see quality_axis; or `measure`: row key, label, higher is better) against peak
    training memory, training tokens/s and inference latency, each where the runs have it; frontier points joined
    and labelled. An untrained base scored by `finetune eval MODEL` (eval.json's
    settings name a base_model) is a dotted line: the zero line the variants' gains start from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, quality_label, higher = measure or quality_axis(rows, quality)
    on_gpu = all(r.get("peak_vram_gb") is not None for r in rows if r.get("train_input_tokens_per_second"))
    memory = ("peak_vram_gb", "peak training GPU memory (GB)", False) if on_gpu else \
        ("peak_ram_gb", "peak training host memory (GB)", False)
    panels = [memory, ("train_input_tokens_per_second", "training input tokens/s", True),
              ("latency_ms_p50", "inference latency p50 (ms)", False)]
    panels = [panel for panel in panels if any(r.get(panel[0]) is not None for r in rows)] or panels[:1]
    bases = [r for r in rows if r.get("untrained") and r.get(quality) is not None]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for axis, (cost, cost_label, more_is_better) in zip(axes[0], panels, strict=True):
        usable = [r for r in rows if r.get(cost) is not None and r.get(quality) is not None]
        points = [(-r[cost] if more_is_better else r[cost], r[quality] if higher else -r[quality]) for r in usable]
        front = set(pareto_front(points))
        by_cost = sorted(range(len(usable)), key=lambda i: usable[i][cost])
        for rank, i in enumerate(by_cost):
            row, on_front = usable[i], i in front
            axis.scatter(row[cost], row[quality], s=90 if on_front else 50, zorder=3,
                         color="tab:red" if on_front else "tab:gray", edgecolor="black" if on_front else "none")
            # Neighbours along the cost axis get labels above and below in turn, so that they don't overlap.
            axis.annotate(row["run"], (row[cost], row[quality]), textcoords="offset points",
                          xytext=(6, 8 if rank % 2 == 0 else -16), fontsize=9,
                          fontweight="bold" if on_front else "normal")
        frontier = sorted((usable[i][cost], usable[i][quality]) for i in front)
        if len(frontier) > 1:
            axis.plot(*zip(*frontier, strict=True), color="tab:red", linestyle="--", zorder=2, label="Pareto frontier")
        for base in bases:
            axis.axhline(base[quality], color="tab:blue", linestyle=":", zorder=1, label=f"{base['run']} (untrained)")
        if len(frontier) > 1 or bases:
            axis.legend(loc="best")
        axis.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
        axis.set_xlabel(cost_label + (" - higher is better" if more_is_better else " - lower is better"))
        axis.set_ylabel(quality_label)
        if not higher:
            axis.invert_yaxis()  # better quality is up in every panel
        axis.grid(alpha=0.3)
        axis.set_title(f"quality vs {cost_label.split(' (')[0]}")
    figure.suptitle(f"{what}: red points are on the Pareto frontier (nothing beats them on both axes)")
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run output directories")
    parser.add_argument("--wandb_project", help="entity/project: also take the training runs logged there")
    parser.add_argument("--out", type=Path, default=Path("outputs/comparison"))
    parser.add_argument("--quality", help="the quality axis: a harness metric of eval.json, "
                                          "lm_eval/<task>/<metric> (default: exact match, else eval perplexity)")
    args = parser.parse_args(argv)
    try:
        twice = sorted({str(d) for d in args.runs if sum(d.resolve() == e.resolve() for e in args.runs) > 1})
        if twice:
            raise UsageError(f"{', '.join(twice)}: given twice; name each run once")
        rows = [read_run(directory) for directory in args.runs]
        if args.wandb_project:
            rows += read_wandb_project(args.wandb_project)
        if not rows:
            raise UsageError("no runs to compare; pass run directories or --wandb_project")
        quality_axis(rows, args.quality)  # refused before anything is written
        problem = destination_problem(args.out)
        if problem:
            raise UsageError(problem)
    except UsageError as error:
        return errors.report(error)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, args.out)
    plot = plot_pareto(rows, args.out / "pareto.png", args.quality)
    log_to_wandb(rows, plot)
    print((args.out / "comparison.md").read_text())
    print(f"table: {args.out / 'comparison.md'}, {args.out / 'comparison.csv'}\nplot: {plot}", file=sys.stderr)
    return errors.OK


def log_to_wandb(rows: list[dict[str, Any]], plot: Path) -> None:
    """A `comparison` run with the table and the plot, unless tracking is off (WANDB_DISABLED)."""
    from finetune.tracking import wandb_run as tracking

    plan = tracking.resolve_job("comparison", "comparison")
    run = tracking.start(plan, {"runs": [r["run"] for r in rows]})
    if run is None:
        return
    import wandb

    keys = [k for k, _, _ in COLUMNS + harness_columns(rows)]
    run.log({"comparison": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
             "pareto": wandb.Image(str(plot))})
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
