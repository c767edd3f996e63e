"""finetune eval: lm-evaluation-harness on a tiny trained run, offline, against the toolkit's own exact match."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext

import pytest

from finetune.commands import bench, evaluate
from finetune.data import eval_tasks
from finetune.training import rundir
from tests.conftest import REPO, subprocess_env, train_and_summarise
from tests.wandb_file import load_run, offline_runs

HELD_OUT = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir, data_files):
    """A QLoRA run (fp32 compute) and a harness task made of the very examples it held out."""
    from finetune.data.load import raw_splits
    from finetune.model.load import load_tokenizer

    root = tmp_path_factory.mktemp("eval")
    trainer, _ = train_and_summarise("qlora_int4", model_name_or_path=llama_dir, dataset=data_files["messages"],
                                     output_dir=root / "run", max_steps=4, dtype="float32", eval_size=HELD_OUT)
    recipe = rundir.trained_recipe(root / "run")
    _, held_out, _ = raw_splits(recipe.data, load_tokenizer(recipe.model), recipe.training.seed,
                                lambda **_: nullcontext())
    tasks = eval_tasks.write_task(root / "tasks", "held_out", eval_tasks.chat_rows(held_out))
    return root / "run", tasks


def test_harness_scores_what_the_toolkit_scores(trained):
    """Same prompts, same greedy generations, same matching: the harness's per-sample responses are the toolkit's
    answers, and its accuracy is bench's exact match."""
    from finetune.data.load import load_splits
    from finetune.training.rundir import load_for_inference

    run, tasks = trained
    manager = evaluate.task_manager([tasks])
    summary, results = evaluate.run_harness(run, ["held_out"], manager, "auto", "auto", None, "auto", True)

    recipe, tokenizer, model = load_for_inference(run)
    split = load_splits(recipe.data, tokenizer, recipe.training.seed, lambda **_: nullcontext()).eval
    pairs = bench.prompts_and_references(split, tokenizer, HELD_OUT)
    ours = [bench.answer(bench.generate(model, tokenizer, ids, eval_tasks.MAX_NEW_TOKENS)[0], tokenizer)[1]
            for ids, _ in pairs]
    samples = sorted(results["samples"]["held_out"], key=lambda s: s["doc_id"])
    assert [s["target"] for s in samples] == [reference for _, reference in pairs]
    assert [s["filtered_resps"][0].strip() for s in samples] == ours
    assert all(ours), "the model generated nothing: the comparison would be empty"
    toolkit = bench.run_benchmark(run, samples=HELD_OUT, max_new_tokens=eval_tasks.MAX_NEW_TOKENS, warmup=0)
    assert summary["lm_eval/held_out/exact_match"] == toolkit["inference/exact_match"]
    assert summary["lm_eval/held_out/samples"] == toolkit["inference/exact_match_samples"] == HELD_OUT
    assert summary["settings"]["quantization"] == "int4" and summary["settings"]["dtype"] == "float32"


def test_eval_command_writes_eval_json_and_an_evaluation_run(trained, tmp_path):
    run, tasks = trained
    result = subprocess.run([sys.executable, "-m", "finetune", "eval", str(run), "--tasks", "held_out",
                             "--include_path", str(tasks), "--log_samples"], capture_output=True, text=True,
                            cwd=REPO, env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
                                                         WANDB_NAME="trained"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held_out" in result.stdout and "exact_match" in result.stdout  # the harness's table
    saved = json.loads((run / rundir.EVAL).read_text())
    accuracy = saved["lm_eval/held_out/exact_match"]
    assert saved["results"]["held_out"]["exact_match,none"] == accuracy
    assert saved["lm_eval/held_out/samples"] == HELD_OUT and saved["lm_eval/seconds"] > 0
    (offline,) = offline_runs(tmp_path)
    logged = load_run(offline)
    assert logged.run.job_type == "evaluation" and logged.run.display_name == "trained-evaluation"
    assert logged.run.run_group == "trained"
    assert logged.summary["lm_eval/held_out/exact_match"] == accuracy
    assert logged.config["lm_eval"]["tasks"] == ["held_out"]
    tables = {key.rsplit("/", 1)[0]: json.loads((offline / "files" / row[key[:-len("_type")] + "path"]).read_text())
              for row in logged.history for key, value in row.items() if key.endswith("/_type")
              and value == "table-file"}
    results, samples = tables["evaluation/eval_results"], tables["held_out_eval_results"]  # the harness's tables
    rows = [dict(zip(results["columns"], data, strict=True)) for data in results["data"]]
    (row,) = [r for r in rows if r["Metric"] == "exact_match"]
    assert row["Tasks"] == "held_out" and float(row["Value"]) == accuracy
    assert len(samples["data"]) == HELD_OUT  # one row per sample, with the model's response


def test_compare_takes_a_harness_metric_as_quality(trained, tmp_path):
    from finetune.commands import compare

    run, _ = trained
    rundir.write_json(run / rundir.EVAL, {"lm_eval/held_out/exact_match": 0.5, "lm_eval/held_out/samples": 6,
                                          "higher_is_better": {"held_out": {"exact_match": True}}})
    rows = [compare.read_run(run)]
    assert compare.quality_axis(rows, "lm_eval/held_out/exact_match") == (
        "lm_eval/held_out/exact_match", "lm_eval/held_out/exact_match on 6 samples (higher is better)", True)
    out = tmp_path / "comparison"
    assert compare.main([str(run), "--out", str(out), "--quality", "lm_eval/held_out/exact_match"]) == 0
    assert "| lm_eval/held_out/exact_match |" in (out / "comparison.md").read_text().splitlines()[0] + " |"
    assert "| 0.500 |" in (out / "comparison.md").read_text()


def test_compare_refuses_a_metric_a_run_lacks(trained, tmp_path, capsys):
    from finetune.commands import compare

    run, _ = trained
    rundir.write_json(run / rundir.EVAL, {"lm_eval/held_out/exact_match": 0.5})
    assert compare.main([str(run), "--out", str(tmp_path / "out"), "--quality", "lm_eval/held_out/exact_mach"]) == 2
    assert "did you mean `lm_eval/held_out/exact_match`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.commands.evaluate", *args], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(WANDB_DISABLED="true"), timeout=300)


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    run, tasks = trained
    unknown = _eval(str(run), "--tasks", "arc_eazy,tiny_taks", "--include_path", str(tasks))
    hub = _eval(str(run), "--tasks", "arc_easy")
    unfinished = _eval(str(tmp_path))
    for result in (unknown, hub, unfinished):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "no task `arc_eazy` (did you mean `arc_easy`" in unknown.stderr
    assert "no task `tiny_taks` (did you mean `tiny_tasks`" in unknown.stderr  # the embedded task too
    assert "`allenai/ai2_arc` from the Hugging Face Hub" in hub.stderr and "HF_HUB_OFFLINE=1" in hub.stderr
    assert "no recipe.yaml" in unfinished.stderr


@pytest.mark.parametrize("option, expected", [
    (["--limit", "0"], "--limit: must be more than 0, got 0; leave it out to score every example"),
    (["--batch_size", "abc"], "--batch_size: 'abc' is neither a positive integer nor auto"),
])
def test_bad_options_are_one_line_before_anything_loads(option, expected, trained, capsys):
    run, _ = trained
    results = run / rundir.EVAL
    before = results.read_bytes() if results.is_file() else None  # an earlier test's scores, or none
    assert evaluate.main([str(run), *option]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert (results.read_bytes() if results.is_file() else None) == before


def test_a_bare_models_results_go_only_where_nothing_is_lost(trained, llama_dir, tmp_path, capsys):
    run, _ = trained
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    cases = {run: "is a training run; give another directory",
             llama_dir: "the model_name_or_path directory",
             llama_dir / "results": "inside the model_name_or_path directory",
             tmp_path / "theirs": "holds files no evaluation wrote (notes.txt); give a new or empty directory"}
    for out, expected in cases.items():
        assert evaluate.main([str(llama_dir), "--tasks", "tiny_tasks", "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: --out: {out} ") and expected in line
    assert not (llama_dir / rundir.EVAL).exists() and not (llama_dir / "results").exists()
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"
