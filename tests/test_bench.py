"""Inference benchmark, comparison, Pareto frontier and merge, on tiny trained runs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from finetune.commands import bench, compare
from finetune.commands.merge import merge
from finetune.training.rundir import load_for_inference
from tests.conftest import REPO, subprocess_env, train_and_summarise
from tests.wandb_file import load_run, offline_runs


def test_pareto_front_on_hand_made_points():
    # (cost, quality): (1, 1) and (3, 5) and (5, 6) are each best for their cost; (2, 0.5) and (4, 5) are beaten.
    points = [(1, 1), (2, 0.5), (3, 5), (4, 5), (5, 6)]
    assert compare.pareto_front(points) == [0, 2, 4]
    assert compare.pareto_front([(1, 1), (1, 1)]) == [0, 1]  # ties dominate nothing
    assert compare.pareto_front([]) == []


def test_percentile():
    assert bench.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench.percentile([10], 95) == 10
    assert bench.percentile([0, 100], 95) == 95


def test_prompts_stop_where_the_answer_starts(tokenizer):
    from finetune.data.load import tokenize_example

    row = tokenize_example({"prompt": "Reverse: abc\n", "completion": "cba"}, "prompt_completion", tokenizer, 64,
                           False)
    text = {"input_ids": [1, 70, 71, 2], "labels": [-100, 70, 71, 2]}
    (prompt, reference), (text_prompt, none) = bench.prompts_and_references(_Rows([row, text]), tokenizer, 5)
    assert tokenizer.decode(prompt) == "<s>Reverse: abc\n" and reference == "cba"
    assert none is None and text_prompt == [1, 70]


class _Rows(list):
    def select(self, indices):
        return [self[i] for i in indices]


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, llama_dir, data_files):
    """Two tiny runs on the same chat data: QLoRA (fp32 compute, for a tight merge check) and LoRA."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, recipe in (("qlora", "qlora_int4"), ("lora", "lora_bf16")):
        runs[name] = root / name
        train_and_summarise(recipe, model_name_or_path=llama_dir, dataset=data_files["messages"],
                            output_dir=runs[name], max_steps=4, dtype="float32", eval_size=6)
    return runs


def test_bench_writes_its_keys_and_an_inference_run(trained_runs, tmp_path):
    run_dir = trained_runs["qlora"]
    result = subprocess.run([sys.executable, "-m", "finetune.commands.bench", str(run_dir), "--samples", "4",
                             "--max_new_tokens", "8", "--warmup", "1"], capture_output=True, text=True, cwd=REPO,
                            env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_NAME="trained"),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads((run_dir / "bench.json").read_text())
    for key in ("inference/latency_ms_p50", "inference/latency_ms_p95", "inference/latency_ms_mean",
                "inference/tokens_per_second", "inference/peak_ram_gb", "inference/weights_on_disk_gb",
                "inference/memory_footprint_gb"):
        assert numbers[key] > 0, key
    assert numbers["inference/latency_ms_p50"] <= numbers["inference/latency_ms_p95"]
    assert 0 <= numbers["inference/exact_match"] <= 1 and numbers["inference/samples"] == 4
    assert numbers["inference/exact_match_samples"] == 4
    assert "inference/peak_vram_gb" not in numbers  # CPU
    (offline,) = offline_runs(tmp_path)
    run = load_run(offline)
    assert run.run.job_type == "inference" and run.run.display_name == "trained-inference"
    assert run.run.run_group == "trained"
    assert run.summary["inference/latency_ms_p50"] == numbers["inference/latency_ms_p50"]
    # What the model said: prompt, reference and answer of each sample, in bench.json and as a W&B table.
    shown = numbers["samples"]
    assert len(shown) == 4 and all(row["reference"] for row in shown)
    assert sum(row["answer"] == row["reference"] for row in shown) / 4 == numbers["inference/exact_match"]
    (logged,) = [row["inference/answers/path"] for row in run.history if "inference/answers/path" in row]
    table = json.loads((offline / "files" / logged).read_text())
    assert table["columns"] == ["prompt", "reference", "answer"]
    assert table["data"] == [[row["prompt"], row["reference"], row["answer"]] for row in shown]
    assert json.loads(result.stdout) == {key: value for key, value in numbers.items() if key != "samples"}
    assert f"  {shown[0]['reference']!r} -> {shown[0]['answer']!r}" in result.stderr


def test_compare_writes_table_csv_and_a_png(trained_runs, tmp_path):
    for run_dir in trained_runs.values():
        (run_dir / "bench.json").write_text(json.dumps({"inference/latency_ms_p50": 10.0,
                                                        "inference/exact_match": 0.5,
                                                        "inference/exact_match_samples": 32}))
    out = tmp_path / "comparison"
    assert compare.main([str(trained_runs["qlora"]), str(trained_runs["lora"]), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "qlora-int4" in table and "lora-fp32" in table and table.count("\n") == 4
    assert "peak training host RAM (GB)" in table and "| 32 |" in table
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["qlora", "lora"]  # run names: variants may repeat
    assert all(float(r["peak_ram_gb"]) > 0 and float(r["train_input_tokens_per_second"]) > 0 for r in rows)
    assert all(r["peak_vram_gb"] == "" for r in rows)  # CPU: no GPU figure, not a zero
    # What 4-bit saves shows: the same base, held in memory, is smaller than in fp32.
    summaries = {name: json.loads((d / "summary.json").read_text()) for name, d in trained_runs.items()}
    assert [float(r["base_weights_gb"]) for r in rows] == pytest.approx(
        [summaries["qlora"]["model/base_weights_gb"], summaries["lora"]["model/base_weights_gb"]])
    assert float(rows[0]["base_weights_gb"]) < float(rows[1]["base_weights_gb"])
    import matplotlib.image

    image = matplotlib.image.imread(out / "pareto.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_compare_writes_only_where_nothing_is_lost(trained_runs, llama_dir, tmp_path, capsys):
    runs = [str(trained_runs["qlora"]), str(trained_runs["lora"])]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "comparison.md").write_text("mine")
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = {path: path.read_bytes() for root in (llama_dir, tmp_path / "notes", trained_runs["lora"])
              for path in root.rglob("*") if path.is_file()}
    cases = {trained_runs["lora"]: "is a training run's directory; give a directory of its own",
             llama_dir: "holds files no comparison wrote (chat_template.jinja, config.json,",
             tmp_path / "notes": "holds files no comparison wrote (todo.txt); give a new or empty directory"}
    for out, message in cases.items():
        assert compare.main([*runs, "--out", str(out)]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: --out: {out} ") and message in line
    assert {path: path.read_bytes() for path in before} == before
    assert compare.main([*runs, runs[0] + "/", "--out", str(tmp_path / "twice")]) == 2
    assert capsys.readouterr().err == f"error: {runs[0]}: given twice; name each run once\n"
    out = tmp_path / "comparison"
    for _ in range(2):  # an earlier comparison is replaced
        assert compare.main([*runs, "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == sorted(compare.OUTPUTS)


def test_merged_model_gives_the_logits_of_base_plus_adapter(trained_runs, cpu_reports_avx512bf16, tmp_path):
    """QLoRA with fp32 compute: dequantize, merge, and compare. Tolerance: 1e-4 absolute on the logits.

    The reference (4-bit base + adapter, eval mode, no_grad) must not take bitsandbytes' packed bf16 CPU path."""
    from transformers import AutoModelForCausalLM

    merged_dir = merge(trained_runs["qlora"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert not any(type(m).__name__.startswith("Linear4bit") for m in merged.modules())
    _, tokenizer, adapted = load_for_inference(trained_runs["qlora"])
    ids = tokenizer(["Reverse the word. abcde", "How many letters does the word have? xyz"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        expected = adapted(**ids).logits
        actual = merged(**ids).logits
    assert torch.allclose(actual, expected, rtol=0, atol=1e-4), (actual - expected).abs().max()
    assert math.isfinite(float(actual.abs().max()))


def test_merge_refuses_a_directory_without_a_run(tmp_path):
    from finetune.commands.merge import main

    assert main([str(tmp_path)]) == 2


def test_merge_writes_only_where_nothing_is_lost(trained_runs, llama_dir, data_files, tmp_path, capsys):
    """Never into the run, the base model's or the dataset's directory, nor over files a merge did not write; an
    earlier merge is replaced whole, and nothing is left beside it."""
    from finetune.commands.merge import main

    run = trained_runs["lora"]
    base_weights = (llama_dir / "model.safetensors").read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    refused = {run: "is the run's own directory", llama_dir: "is the model_name_or_path directory",
               data_files["messages"].parent: "is the directory of the dataset file",
               mine: "holds files no merge wrote (config.json)"}
    for out, reason in refused.items():
        assert main([str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --out: {out} {reason}"), err
    assert (llama_dir / "model.safetensors").read_bytes() == base_weights
    assert (mine / "config.json").read_text() == "{}" and sorted(p.name for p in mine.iterdir()) == ["config.json"]
    merged = tmp_path / "models" / "merged"
    for _ in range(2):  # into a new directory, then over that merge
        assert main([str(run), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()
    assert sorted(p.name for p in merged.parent.iterdir()) == ["merged"]
    (merged / "notes.txt").write_text("mine")  # a user's file in an earlier merge: that merge is not replaced
    assert main([str(run), "--out", str(merged)]) == 2
    assert "holds files no merge wrote (notes.txt)" in capsys.readouterr().err
    assert (merged / "notes.txt").read_text() == "mine" and (merged / "model.safetensors").is_file()


def test_a_finished_run_is_served_from_anywhere_without_its_training_data(llama_dir, data_files, tmp_path,
                                                                          monkeypatch):
    """Chat, bench and merge of a run whose recipe used relative paths, from another working directory, after its
    training data moved away: the run's recipe.yaml records absolute paths and its eval split."""
    import shutil

    from finetune.training import rundir

    workdir = tmp_path / "project"
    (workdir / "data").mkdir(parents=True)
    shutil.copy(data_files["messages"], workdir / "data" / "chat.jsonl")
    monkeypatch.chdir(workdir)
    train_and_summarise("lora_bf16", model_name_or_path=llama_dir, dataset="data/chat.jsonl",
                        output_dir="outputs/run", max_steps=2, dtype="float32", eval_size=6)
    run = workdir / "outputs" / "run"
    before = bench.run_benchmark(run, samples=4, max_new_tokens=4, warmup=0)
    (workdir / "data" / "chat.jsonl").rename(tmp_path / "moved.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = rundir.trained_recipe(run)
    assert recipe.data.dataset == str(workdir / "data" / "chat.jsonl")
    assert recipe.training.output_dir == str(run)
    load_for_inference(run)  # what `finetune chat` loads
    after = bench.run_benchmark(run, samples=4, max_new_tokens=4, warmup=0)
    assert after[bench.SAMPLES] == before[bench.SAMPLES]  # the same prompts, from the saved eval split
    assert merge(run, run / "merged") == run / "merged" and (run / "merged" / "config.json").is_file()
    assert not (elsewhere / "outputs").exists() and list(elsewhere.iterdir()) == []


def test_bench_options_are_checked_before_anything_loads(trained_runs, capsys):
    for option, value, least in (("--samples", "0", 1), ("--max_new_tokens", "0", 1), ("--warmup", "-1", 0),
                                 ("--show", "-1", 0)):
        assert bench.main([str(trained_runs["lora"]), option, value]) == 2
        assert capsys.readouterr().err == f"error: {option}: must be at least {least}, got {value}\n"


def test_follow_ups_on_a_read_only_or_full_disk_are_one_line(trained_runs, small_disk, tmp_path):
    """Read-only: each refuses before loading anything (exit 2); a disk that fills while merging: exit 74; both in
    one line, with nothing left half-written."""
    import shutil


    run = small_disk / "run"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # room for the copy
    shutil.copytree(trained_runs["lora"], run, ignore=shutil.ignore_patterns("checkpoint-*", "merged*"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    commands = {"bench": [str(run)], "eval": [str(run), "--tasks", "tiny_tasks"],
                "compare": [str(trained_runs["qlora"]), "--out", str(small_disk / "cmp")],
                "merge": [str(trained_runs["qlora"]), "--out", str(small_disk / "merged")]}
    for command, argv in commands.items():
        result = subprocess.run([sys.executable, "-m", "finetune", command, *argv], capture_output=True, text=True,
                                cwd=REPO, env=subprocess_env(WANDB_MODE="disabled"), timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith("error: ") and " is not writable" in line and str(small_disk) in line, line
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    room = shutil.disk_usage(small_disk).used // 1024 + 32  # KiB: the run, and 32 KiB more (the model needs more)
    subprocess.run(["mount", "-o", f"remount,size={room}k", str(small_disk)], check=True)
    result = subprocess.run([sys.executable, "-m", "finetune", "merge", str(run), "--out", str(small_disk / "m")],
                            capture_output=True, text=True, cwd=REPO, env=subprocess_env(WANDB_MODE="disabled"),
                            timeout=300)
    assert result.returncode == 74 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: finetune merge: No space left on device") and "free some space" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["run"]  # no staging directory left
