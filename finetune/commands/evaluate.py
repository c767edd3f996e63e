"""Benchmarks on a trained run: EleutherAI's lm-evaluation-harness, on the model as it was trained.

    finetune eval outputs/tiny                                   # the embedded recipe: its own task, tiny_tasks
    finetune eval outputs/qlora_int4 --tasks arc_easy,hellaswag --limit 200
    finetune eval outputs/my_run --tasks my_task --include_path my_tasks/ --log_samples
    make eval RUN=outputs/tiny TASKS=tiny_tasks
    finetune eval outputs/tiny_dpo                               # a DPO run: preference accuracy, held out
    finetune eval outputs/tiny --preferences outputs/tiny_dpo    # the SFT run on the DPO run's held-out pairs

The model is loaded as `finetune bench` loads it (`finetune.training.rundir.load_for_inference`: the base with the
quantization it was trained with plus the adapter, or the full model) and handed to the harness's `hf` model, so
a 4-bit run is scored in 4 bits. The harness's results go to `eval.json` in the run directory, with one flat key
per number (`lm_eval/<task>/<metric>`, what `finetune compare --quality` takes), and, with tracking on, to a W&B
run with job_type `evaluation` in the training run's group: the harness's own results table, and with
`--log_samples` every sample's prompt, response and score as a table.

Your own data, offline: a harness YAML task whose dataset is a local JSONL (`write_task` writes one from
single-turn rows), found through `--include_path DIR`.

Preference accuracy (`--preferences`, the default for a DPO run): the share of preference pairs whose chosen answer
the model gives a higher log-probability than the rejected one (`finetune.training.preference`), on a run's
held-out pairs (its own, or another run's: `--preferences RUN`) or every pair of a data file (`--preferences
FILE`). It goes into eval.json as `preference/accuracy`, beside the harness's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune import errors
from finetune.data.eval_tasks import chat_rows, write_task
from finetune.errors import UsageError
from finetune.training import rundir

TINY_TASK = "tiny_tasks"
TINY_TASK_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny" / "lm_eval"
INSTALL = "pip install lm-eval==0.4.13 (it is in requirements.txt: make install)"


def tiny_task(directory: Path = TINY_TASK_DIR) -> Path:
    """The embedded recipe's task, built once: the examples recipes/tiny.yaml holds out (the prompts
    finetune.commands.bench scores on a run of it), as a generate-until task. Returns its directory."""
    if (directory / f"{TINY_TASK}.yaml").is_file():
        return directory
    from contextlib import nullcontext

    from finetune.data.load import raw_splits
    from finetune.embedded.tiny import ASSETS_DIR
    from finetune.model.load import load_tokenizer
    from finetune.recipe.load import load_recipe

    recipe = load_recipe([str(ASSETS_DIR.parent.parent / "recipes" / "tiny.yaml"), "--model_name_or_path",
                          str(ASSETS_DIR / "model"), "--dataset", str(ASSETS_DIR / "tasks.jsonl")])
    _, held_out, _ = raw_splits(recipe.data, load_tokenizer(recipe.model), recipe.training.seed,
                                lambda **_: nullcontext())
    return write_task(directory, TINY_TASK, chat_rows(held_out))


# Checking the request before the model loads ---------------------------------------------------------------------

def task_manager(include_path: list[Path]):
    """The harness's task registry: its own tasks plus every task under `include_path`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(f"finetune eval needs lm-eval: {INSTALL}") from None
    return TaskManager(include_path=[str(p) for p in include_path] or None)


def hub_datasets(manager, name: str, seen: set[str] | None = None) -> list[str]:
    """The hub datasets a task (or every task of a group or tag) downloads: `dataset_path`s that are neither a
    datasets builder for local files nor a local directory."""
    seen = set() if seen is None else seen
    if name in seen or name not in manager.task_index:
        return []
    seen.add(name)
    entry = manager.task_index[name]
    config = entry.cfg or {}
    children = config.get("task") if isinstance(config.get("task"), list) else []
    children = [c if isinstance(c, str) else c.get("task") for c in children]
    members = [t for t, e in manager.task_index.items() if name in (e.tags or ())]
    found = []
    for child in [c for c in children + members if isinstance(c, str)]:
        found += hub_datasets(manager, child, seen)
    path = config.get("dataset_path")
    local_builders = {"json", "csv", "parquet", "text", "arrow"}
    if path and path not in local_builders and not Path(path).expanduser().exists():
        found.append(path)
    return sorted(set(found))


def is_cached(dataset: str) -> bool:
    """Whether a hub dataset can load offline: a snapshot in the hub cache, or datasets' own processed copy."""
    from datasets import config as datasets_config
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(dataset, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # huggingface_hub's LocalEntryNotFoundError and kin: not cached
        pass
    return any(Path(datasets_config.HF_DATASETS_CACHE).glob(dataset.replace("/", "___") + "*"))


def check_tasks(manager, tasks: list[str], env=os.environ) -> None:
    """Every task is known to the harness, and can load its data here. Raises UsageError naming each unknown task
    (with the closest names the registry holds) and each hub dataset that can't be reached offline."""
    from finetune.embedded import smollm2
    from finetune.recipe.load import did_you_mean
    from finetune.tracking.wandb_run import is_truthy

    problems = []
    known = [*manager.all_tasks, TINY_TASK, smollm2.TASK, smollm2.MOVES_TASK]  # registered when named
    for task in tasks:
        if task not in manager.task_index:
            problems.append(f"--tasks: the harness has no task `{task}`{did_you_mean(task, known)}; "
                            "list them with `lm-eval ls tasks`, or add your own with --include_path DIR")
    offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if is_truthy(env.get(name))]
    if offline and not problems:
        for task in tasks:
            for dataset in hub_datasets(manager, task):
                if not is_cached(dataset):
                    problems.append(f"--tasks: `{task}` needs the dataset `{dataset}` from the Hugging Face Hub, "
                                    f"and {offline[0]}=1 with no cached copy; download it where there is a network "
                                    f"(python -c \"import datasets; datasets.load_dataset('{dataset}')\") and "
                                    f"copy ~/.cache/huggingface over, unset {offline[0]}, or use a local task "
                                    "(--include_path)")
    if problems:
        raise UsageError(problems)


# Running the harness ---------------------------------------------------------------------------------------------

def inference_dtype(requested: str, recipe_dtype: str) -> str:
    """The dtype to evaluate in: the one asked for; `auto` keeps the run's on a GPU and takes float32 on a CPU,
    where bf16/fp16 matmuls are emulated (slower, and fp16 lacks kernels)."""
    if requested != "auto":
        return requested
    import torch

    return recipe_dtype if torch.cuda.is_available() else "float32"


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """`lm_eval/<task>/<metric>` for every number of the harness's results (`/<filter>` added for filters other
    than `none`), and `lm_eval/<task>/samples`: the keys eval.json, W&B and `finetune compare` share."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias and "N/A" stderr
            metric, _, filter_name = key.partition(",")
            flat[f"lm_eval/{task}/{metric}" + ("" if filter_name in ("", "none") else f"/{filter_name}")] = value
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            flat[f"lm_eval/{task}/samples"] = samples
    return flat


def load_target(target: Path, dtype: str):
    """(settings, tokenizer, model) to evaluate: a finished run as it was trained (base with its quantization plus
    the adapter, or the full model), or a bare model (a directory, a .gguf file or a hub id) with no adapter, the
    zero line a run's gain is measured from."""
    from finetune.training.rundir import load_for_inference

    if is_run(target):
        recipe = rundir.trained_recipe(target)
        chosen_dtype = inference_dtype(dtype, recipe.model.dtype)
        recipe, tokenizer, model = load_for_inference(target, dtype=chosen_dtype)
        return {"dtype": chosen_dtype, "quantization": recipe.model.quantization}, tokenizer, model
    from finetune.model.load import load_model, load_tokenizer
    from finetune.recipe.keys import ModelArguments

    chosen_dtype = inference_dtype(dtype, "auto")
    model_args = ModelArguments(model_name_or_path=str(target), dtype=chosen_dtype, use_lora=False)
    return ({"dtype": chosen_dtype, "quantization": "none", "base_model": str(target)}, load_tokenizer(model_args),
            load_model(model_args, for_training=False))


def run_harness(target: Path, tasks: list[str], manager, batch_size: str, dtype: str, limit: float | None,
                chat_template: str, log_samples: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the run or model (load_target), evaluate `tasks`. Returns (eval.json's content, the harness's full
    results)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    settings, tokenizer, model = load_target(target, dtype)
    apply_chat_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template == "auto" else \
        chat_template == "true"
    import torch

    # "auto" probes the largest batch that fits the GPU; a CPU has no such limit to find, and a batch of 8 keeps
    # the left padding small for short prompts.
    chosen_batch = batch_size if batch_size != "auto" or torch.cuda.is_available() else "8"
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=chosen_batch)
    started = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model=harness_model, tasks=tasks, task_manager=manager, limit=limit,
                                          log_samples=log_samples, apply_chat_template=apply_chat_template)
    except ConnectionError as error:  # requests' and huggingface_hub's connection errors derive from it
        raise UsageError(f"--tasks: the harness could not reach the Hugging Face Hub ({str(error)[:120]}); "
                         "download the task's dataset first, or set HF_HUB_OFFLINE=1 to use the cache") from None
    seconds = time.perf_counter() - started
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    summary = {
        **flat_metrics(results),
        "lm_eval/seconds": seconds,
        "settings": {"tasks": tasks, **settings, "batch_size": chosen_batch,
                     "apply_chat_template": apply_chat_template, "limit": limit,
                     "lm_eval_version": lm_eval.__version__},
        "results": results.get("results", {}),
        "groups": results.get("groups", {}),
        "n-samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "higher_is_better": results.get("higher_is_better", {}),
    }
    return summary, results


def held_out_pairs(source: Path, tokenizer, max_length: int):
    """(tokenized preference pairs, what they are) from `source`: a run's held-out pairs as it saved them, or every
    row of a preference data file, tokenized here (`finetune.data.preference`). Raises UsageError when there are
    none."""
    from contextlib import nullcontext

    from finetune.training.preference import has_pairs

    if is_run(source):
        rows = rundir.saved_eval_split(source)
        if not has_pairs(rows):
            raise UsageError(f"--preferences: {source} holds out no preference pairs (it trained "
                             f"{'on other rows' if rows is not None else 'without an eval split'}); give "
                             "--preferences a data file of prompt/chosen/rejected rows or a run that held pairs out, "
                             "or --tasks")
        return rows, f"{source} (held out)"
    from finetune.data.load import load_splits
    from finetune.recipe.keys import DataArguments

    data = DataArguments(dataset=str(source), eval_size=0, max_length=max_length)
    splits = load_splits(data, tokenizer, 0, lambda **_: nullcontext(), objective="dpo")
    return splits.train, str(source)


def score_preferences(target: Path, source: Path, dtype: str, batch_size: str) -> dict[str, Any]:
    """eval.json's preference keys for the run or model `target` on the pairs `source` names (held_out_pairs)."""
    from finetune.training.preference import preference_accuracy

    if is_run(source):
        held_out_pairs(source, None, 0)  # the run holds pairs: checked before the model loads
    settings, tokenizer, model = load_target(target, dtype)
    if is_run(source) and source.resolve() != target.resolve():
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(source))
        if theirs.get_vocab() != tokenizer.get_vocab() or theirs.chat_template != tokenizer.chat_template:
            raise UsageError(f"--preferences: {source}'s held-out pairs are token ids of another tokenizer (or chat "
                             f"template) than {target}'s; give the pairs' data file instead, tokenized for it")
    max_length = rundir.trained_recipe(target).data.max_length if is_run(target) else 1024
    rows, described = held_out_pairs(source, tokenizer, max_length)
    started = time.perf_counter()
    scored = preference_accuracy(model, rows, tokenizer.pad_token_id, 8 if batch_size == "auto" else int(batch_size))
    return {"preference/accuracy": scored["accuracy"], "preference/pairs": scored["pairs"],
            "preference/seconds": time.perf_counter() - started,
            "preference/settings": {"pairs": described, **settings}}


def is_run(target: Path) -> bool:
    """Whether `target` is a training run's directory (it holds the run's recipe), not a bare model."""
    return (target / rundir.RECIPE).is_file()


def default_tasks(model_name: str, dataset: str | None = None) -> list[str]:
    """The embedded recipes' own tasks: tiny_tasks for the tiny model or data, smollm2_contacts for SmolLM2's."""
    from finetune.embedded.smollm2 import TASK as SMOLLM2_TASK
    from finetune.recipe.keys import embedded_assets

    owners = embedded_assets(model_name, dataset)
    return [task for owner, task in (("tiny", TINY_TASK), ("smollm2", SMOLLM2_TASK)) if owner in owners][:1]


def include_dirs(tasks: list[str]) -> list[Path]:
    """The directories of the embedded tasks among `tasks`, written on first use."""
    from finetune.embedded import smollm2

    dirs = []
    if TINY_TASK in tasks:
        dirs.append(tiny_task())
    if smollm2.TASK in tasks or smollm2.MOVES_TASK in tasks:
        dirs.append(smollm2.ensure_assets() / "lm_eval")
    return dirs


def log_to_wandb(output_dir: Path, summary: dict[str, Any], results: dict[str, Any], log_samples: bool,
                 base: str | None = None) -> None:
    """An `evaluation` run in the training run's group, named after it (when tracking is on): the flat metrics in
    its summary, the harness's results table (lm_eval's WandbLogger), and with `log_samples` a table per task. A
    bare model (`base`) gets a run of its own, named after the output directory."""
    from finetune.tracking import wandb_run as tracking

    config = {"lm_eval": summary["settings"]}
    if base is None:
        run = tracking.start_follow_up(output_dir, "evaluation", config)
    else:
        run = tracking.start(tracking.resolve_job("evaluation", output_dir.name), config)
    if run is None:
        return
    from lm_eval.loggers import WandbLogger

    logger = WandbLogger()  # finds the run just started
    logger.post_init(results)
    logger.log_eval_result()
    if log_samples:
        logger.log_eval_samples(results["samples"])
    run.summary.update({k: v for k, v in summary.items() if k.startswith("lm_eval/")})
    run.finish()


def format_results(results: dict) -> str:
    """task, metric, value (± stderr) per line: the harness's numbers (its own table needs a pytablewriter whose
    empty-header handling differs between versions)."""
    lines = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filtering = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filtering}")
            error = f" ± {stderr:.4f}" if isinstance(stderr, int | float) else ""
            lines.append(f"{task:<24} {metric:<20} {value:.4f}{error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from finetune import logs
    from finetune.tracking.wandb_run import model_label

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="a finished training run's output_dir, or a bare model (a model "
                                                 "directory, a .gguf file or a hub id) to score without an adapter")
    parser.add_argument("--tasks", help="comma-separated harness tasks or groups (default for the embedded recipes: "
                                        f"{TINY_TASK}, or smollm2_contacts for SmolLM2)")
    parser.add_argument("--include_path", type=Path, action="append", default=[],
                        help="a directory of your own harness YAML tasks (repeatable)")
    parser.add_argument("--out", type=Path, help="for a bare model: the directory for eval.json (default "
                                                "outputs/base-<model name>); a run's results go into the run")
    parser.add_argument("--batch_size", default="auto", help="an integer, or auto: the largest that fits a GPU, "
                                                             "8 on a CPU")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: the run's dtype on a GPU, float32 on a CPU")
    parser.add_argument("--limit", type=float, help="at most this many examples per task (a fraction if < 1)")
    parser.add_argument("--apply_chat_template", default="auto", choices=["auto", "true", "false"],
                        help="auto: when the tokenizer has a chat template (a chat-trained model needs it)")
    parser.add_argument("--log_samples", action="store_true", help="every sample's output to W&B, as a table")
    parser.add_argument("--preferences", nargs="?", const="", type=str, metavar="RUN_OR_FILE",
                        help="preference accuracy: on the target run's held-out pairs (no value), another run's, or "
                             "every row of a prompt/chosen/rejected data file; the default for a DPO run")
    args = parser.parse_args(argv)
    args.target = args.target.expanduser()
    try:
        if args.limit is not None and args.limit <= 0:
            raise UsageError(f"--limit: must be more than 0, got {args.limit:g}; leave it out to score every example")
        if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
            raise UsageError(f"--batch_size: {args.batch_size!r} is neither a positive integer nor auto")
        if is_run(args.target):
            if args.out is not None:
                raise UsageError(f"--out: {args.target} is a run; its results go to {args.target / rundir.EVAL}")
            if rundir.unwritable(args.target):
                raise UsageError(f"{rundir.unwritable(args.target)} is not writable; eval.json goes into the run's "
                                 "directory")
            recipe = rundir.trained_recipe(args.target)
            if not rundir.is_finished(args.target):
                raise UsageError(f"{args.target}: no {rundir.SUMMARY}; the training has not finished")
            defaults, out, base = default_tasks(recipe.model.model_name_or_path, recipe.data.dataset), args.target, None
            if recipe.objective.objective == "dpo" and args.preferences is None and not args.tasks:
                args.preferences, defaults = "", []  # a DPO run is scored on its held-out pairs
        else:
            base = str(args.target)
            problem = base_model_problem(args.target)
            if problem:
                raise UsageError(problem)
            defaults = default_tasks(base)
            out = args.out or Path("outputs") / f"base-{model_label(base)}"
            problem = out_problem(out, args.target)
            if problem:
                raise UsageError(problem)
        preferences = None
        if args.preferences is not None:
            if args.preferences == "" and base is not None:
                raise UsageError("--preferences: a bare model has no held-out pairs; give a DPO run's output_dir or "
                                 "a data file of prompt/chosen/rejected rows")
            preferences = Path(args.preferences).expanduser() if args.preferences else args.target
            if not preferences.exists():
                raise UsageError(f"--preferences: no such run or data file {args.preferences!r}")
        if args.tasks:
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        elif preferences is not None:
            tasks = []
        elif defaults:
            tasks = defaults
        else:
            raise UsageError("--tasks: give the tasks to run (e.g. --tasks arc_easy,hellaswag); only the embedded "
                             f"recipes have a default ({TINY_TASK}, smollm2_contacts)")
        logs.setup()  # after the checks above, which need no library: a mistyped path is reported at once
        if not logs.verbose():  # the harness narrates each step at INFO (seeds, contexts); its results follow
            import logging

            logging.getLogger("lm_eval").setLevel(logging.WARNING)
        saved = rundir.read_json(out / rundir.EVAL) or {}
        results = None
        if tasks:
            manager = task_manager(list(args.include_path) + include_dirs(tasks))
            check_tasks(manager, tasks)
            summary, results = run_harness(args.target, tasks, manager, args.batch_size, args.dtype, args.limit,
                                           args.apply_chat_template, args.log_samples)
            saved = {**{k: v for k, v in saved.items() if k.startswith("preference/")}, **summary}
        if preferences is not None:
            scored = score_preferences(args.target, preferences, args.dtype, args.batch_size)
            saved = {**saved, **scored}
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_json(out / rundir.EVAL, saved)
        if results is not None:
            log_to_wandb(out, saved, results, args.log_samples, base)
    except UsageError as error:
        return errors.report(error)
    if results is not None:
        print(format_results(results))
    if preferences is not None:
        print(f"preference accuracy {scored['preference/accuracy']:.1%} on {scored['preference/pairs']} pairs of "
              f"{scored['preference/settings']['pairs']}")
    print(f"eval: {out / rundir.EVAL}", file=sys.stderr)
    return errors.OK


def out_problem(out: Path, model: Path) -> str | None:
    """Why a bare model's results must not go into `out`, or None: it is new, empty, or holds only an earlier
    eval.json; never a training run's directory, the model's own, or a directory of other files."""
    from finetune.recipe.keys import protected_problem

    if out.exists() and is_run(out):
        return f"--out: {out} is a training run; give another directory for the base model's results"
    problem = protected_problem(out, str(model), "", option="--out")
    return problem or rundir.destination_problem(out, "evaluation", {rundir.EVAL})


def base_model_problem(target: Path) -> str | None:
    """Why `target` (not a run) can't be evaluated as a bare model, or None."""
    from finetune.recipe.keys import embedded_asset, is_local_path

    name = str(target)
    if not is_local_path(name) or embedded_asset(target):
        return None  # a hub id (the loader says whether it is cached), or the shipped model (written on first use)
    if target.is_dir() and not (target / "config.json").is_file():
        return (f"{target}: neither a training run (no {rundir.RECIPE}) nor a model directory (no config.json); "
                "give a finished run's output_dir, a model directory or a .gguf file")
    if not target.exists():
        return f"{target}: no such run, model directory or .gguf file"
    return None


if __name__ == "__main__":
    sys.exit(main())
