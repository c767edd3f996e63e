"""Compare trained variants: quality against memory and against latency, with the Pareto frontier marked.

    python -m finetune.compare outputs/matrix/* --out outputs/comparison
    python -m finetune.compare --wandb_project my-team/qlora-sweep --out outputs/comparison   # online runs
    make compare RUNS="outputs/lora_bf16 outputs/qlora_int4"

Each run directory contributes its recipe.yaml, summary.json (training) and bench.json (inference, from
`python -m finetune.bench`). Writes comparison.md, comparison.csv and pareto.png to --out; with tracking on, also
a W&B run (job_type `comparison`) holding the table as a wandb.Table and the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

COLUMNS = [  # (key in a row, header, format)
    ("run", "run", "{}"),
    ("variant", "variant", "{}"),
    ("quantization", "quantization", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("peak_memory_gb", "peak memory (GB)", "{:.3f}"),  # GPU where the run had one, else host RAM
    ("train_tokens_per_second", "train tokens/s", "{:,.0f}"),
    ("eval_perplexity", "eval perplexity", "{:.3f}"),
    ("latency_ms_p50", "latency p50 (ms)", "{:.1f}"),
    ("model_size_gb", "size on disk (GB)", "{:.4f}"),
    ("exact_match", "exact match", "{:.3f}"),
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
    from finetune.tracking import variant_name

    def load(name: str) -> dict:
        path = directory / name
        return json.loads(path.read_text()) if path.is_file() else {}

    recipe = yaml.safe_load((directory / "recipe.yaml").read_text()) if (directory / "recipe.yaml").is_file() else {}
    summary, bench = load("summary.json"), load("bench.json")
    if not summary and not bench:
        raise ValueError(f"{directory}: no summary.json or bench.json; train (and bench) it first")

    variant = variant_name(recipe.get("quantization", "none"), recipe.get("dtype", "auto"),
                           recipe.get("use_lora", True)) if recipe else ""
    return {
        "run": directory.name,
        "variant": variant,
        "quantization": recipe.get("quantization", ""),
        "trainable_params": summary.get("model/trainable_params"),
        # GPU memory when the run had one, host memory otherwise.
        "peak_memory_gb": summary.get("train/peak_vram_gb", summary.get("train/peak_ram_gb")),
        "peak_memory_is_gpu": "train/peak_vram_gb" in summary,
        "train_tokens_per_second": summary.get("train/tokens_per_second"),
        "eval_perplexity": summary.get("eval/perplexity"),
        "latency_ms_p50": bench.get("inference/latency_ms_p50"),
        "model_size_gb": bench.get("inference/model_size_gb"),
        "exact_match": bench.get("inference/exact_match"),
    }


def read_wandb_project(path: str) -> list[dict[str, Any]]:
    """Rows from the training runs of an online W&B project (`entity/project`), through wandb.Api."""
    import wandb

    rows = []
    for run in wandb.Api().runs(path, filters={"jobType": "training"}):
        summary, config = run.summary, run.config
        rows.append({
            "run": run.name, "variant": config.get("model_variant", ""), "quantization": config.get("quantization"),
            "trainable_params": summary.get("model/trainable_params"),
            "peak_memory_gb": summary.get("train/peak_vram_gb", summary.get("train/peak_ram_gb")),
            "train_tokens_per_second": summary.get("train/tokens_per_second"),
            "eval_perplexity": summary.get("eval/perplexity"),
            "latency_ms_p50": summary.get("inference/latency_ms_p50"),
            "model_size_gb": summary.get("inference/model_size_gb"),
            "exact_match": summary.get("inference/exact_match"),
        })
    return rows


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None or value == "" else fmt.format(value)


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    header = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule] + ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    with (out / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows({k: r.get(k) for k, _, _ in COLUMNS} for r in rows)


def quality_axis(rows: list[dict[str, Any]]) -> tuple[str, str, bool]:
    """(row key, label, higher is better): exact match when every run has it and it tells them apart,
    else eval perplexity."""
    matches = [r.get("exact_match") for r in rows]
    if None not in matches and len(set(matches)) > 1:
        return "exact_match", "exact match (higher is better)", True
    return "eval_perplexity", "eval perplexity (lower is better)", False


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels, quality against peak memory and against latency; frontier points joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, quality_label, higher = quality_axis(rows)
    on_gpu = any(r.get("peak_memory_is_gpu") for r in rows)
    memory = "peak training GPU memory (GB)" if on_gpu else "peak training host memory (GB)"
    panels = [("peak_memory_gb", memory), ("latency_ms_p50", "inference latency p50 (ms)")]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, (cost, cost_label) in zip(axes, panels, strict=True):
        usable = [r for r in rows if r.get(cost) is not None and r.get(quality) is not None]
        points = [(r[cost], r[quality] if higher else -r[quality]) for r in usable]
        front = set(pareto_front(points))
        by_cost = sorted(range(len(usable)), key=lambda i: usable[i][cost])
        for rank, i in enumerate(by_cost):
            row, on_front = usable[i], i in front
            axis.scatter(row[cost], row[quality], s=90 if on_front else 50, zorder=3,
                         color="tab:red" if on_front else "tab:gray", edgecolor="black" if on_front else "none")
            # Neighbours along the cost axis get labels above and below in turn, so that they don't overlap.
            axis.annotate(row["variant"] or row["run"], (row[cost], row[quality]), textcoords="offset points",
                          xytext=(6, 8 if rank % 2 == 0 else -16), fontsize=9,
                          fontweight="bold" if on_front else "normal")
        frontier = sorted((usable[i][cost], usable[i][quality]) for i in front)
        if len(frontier) > 1:
            axis.plot(*zip(*frontier, strict=True), color="tab:red", linestyle="--", zorder=2, label="Pareto frontier")
            axis.legend(loc="best")
        axis.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
        axis.set_xlabel(cost_label + " - lower is better")
        axis.set_ylabel(quality_label)
        if not higher:
            axis.invert_yaxis()  # better quality is up in both panels
        axis.grid(alpha=0.3)
        axis.set_title(f"quality vs {cost_label.split(' (')[0]}")
    figure.suptitle("Fine-tuning variants: red points are on the Pareto frontier (nothing beats them on both axes)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run output directories")
    parser.add_argument("--wandb_project", help="entity/project: also take the training runs logged there")
    parser.add_argument("--out", type=Path, default=Path("outputs/comparison"))
    args = parser.parse_args(argv)
    try:
        rows = [read_run(directory) for directory in args.runs]
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.wandb_project:
        rows += read_wandb_project(args.wandb_project)
    if len(rows) < 1:
        print("error: no runs to compare; pass run directories or --wandb_project", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_tables(rows, args.out)
    plot = plot_pareto(rows, args.out / "pareto.png")
    log_to_wandb(rows, plot)
    print((args.out / "comparison.md").read_text())
    print(f"table: {args.out / 'comparison.md'}, {args.out / 'comparison.csv'}\nplot: {plot}", file=sys.stderr)
    return 0


def log_to_wandb(rows: list[dict[str, Any]], plot: Path) -> None:
    """A `comparison` run with the table and the plot, unless tracking is off (WANDB_DISABLED)."""
    import os

    from finetune.tracking import has_credentials, is_truthy

    if is_truthy(os.environ.get("WANDB_DISABLED")) or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if has_credentials(os.environ) else "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "finetune"), job_type="comparison", mode=mode,
                     name=os.environ.get("WANDB_NAME", "comparison"))
    keys = [k for k, _, _ in COLUMNS]
    run.log({"comparison": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
             "pareto": wandb.Image(str(plot))})
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
