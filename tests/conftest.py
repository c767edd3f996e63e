"""Shared fixtures: tiny models built from a config, small data files in every format. Fully offline."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core (pytest-xdist). A worker's torch, and every process a test starts, then
    # takes one thread: two-thread pools on a shared core wait on each other and run many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"

from finetune.embedded.tiny import build_tokenizer, make_task_examples, save_tiny_model, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# The files that take longest (pytest --durations), longest first.
LONGEST_FILES = ("test_real_model.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the rest as collected (each file's tests together, in order): with a worker
    per core (`make test`: `--dist loadfile`) they start at once on workers of their own, and the short files fill
    in around them."""
    items.sort(key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES
               else len(LONGEST_FILES))


def pytest_report_header(config):
    """Which CPU kind the suite runs on: bitsandbytes' CPU paths differ with AVX512-BF16 (see tests/test_kbit.py)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return f"cpu: avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}"


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    """No hub, and no W&B unless a test turns it on: these tests are about the runner, not tracking."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


@pytest.fixture(params=[True, False], ids=["cpu-reports-avx512bf16", "cpu-reports-no-avx512bf16"])
def cpu_reports_avx512bf16(request, monkeypatch) -> bool:
    """Whether bitsandbytes' Linear4bit believes the CPU has AVX512-BF16 (read at construction), forced either way,
    so that both of its CPU paths run on every machine (tests/test_kbit.py)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _model_dir(tmp_path_factory, architecture: str) -> Path:
    # hidden 64 with 4 heads: small, and every linear layer is a whole number of bitsandbytes 64-value blocks.
    return save_tiny_model(tmp_path_factory.mktemp(architecture), architecture, hidden_size=64, layers=2)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory, "qwen2")


def _rows(fmt: str, count: int = 40) -> list[dict]:
    rows = []
    for example in make_task_examples(count, seed=1):
        request, answer = example["messages"][0]["content"], example["messages"][1]["content"]
        instruction, _, word = request.rpartition(" ")
        if fmt == "text":
            rows.append({"text": f"{request} -> {answer}"})
        elif fmt == "alpaca":
            rows.append({"instruction": instruction, "input": word, "output": answer})
        elif fmt == "prompt_completion":
            rows.append({"prompt": f"{request}\n", "completion": answer})
        else:
            rows.append(example)
    return rows


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """One small .jsonl file per dataset format."""
    directory = tmp_path_factory.mktemp("data")
    return {fmt: write_jsonl(_rows(fmt), directory / f"{fmt}.jsonl")
            for fmt in ("text", "alpaca", "messages", "prompt_completion")}


def recipe_argv(recipe: str | Path, **keys) -> list[str]:
    """The command line after `finetune/run.py`: a recipe (a name under recipes/, or a path) and `--key value`
    for each key (`--key v1 v2` for a list)."""
    path = recipe if isinstance(recipe, Path) or "/" in recipe else REPO / "recipes" / f"{recipe}.yaml"
    return [str(path)] + [item for key, value in keys.items()
                          for item in (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))]


def load(argv: list[str]):
    """A recipe as the runner loads it, with this machine's TrainingArguments defaults."""
    from finetune.model.load import hardware_defaults
    from finetune.recipe.load import load_recipe

    return load_recipe(argv, hardware=hardware_defaults)


def train_and_summarise(recipe: str | Path, **keys):
    """Train in this process (no W&B unless the keys say so); returns (trainer, summary.json)."""
    from finetune.run import train

    trainer = train(load(recipe_argv(recipe, **{"report_to": "none", "disable_tqdm": "true", **keys})))
    return trainer, json.loads((Path(trainer.args.output_dir) / "summary.json").read_text())


def accelerate_launch(*args: str, processes: int = 1, config: Path | None = None, script: bool = False,
                      quiet: bool = False) -> list[str]:
    """`accelerate launch ... -m finetune.run ARGS` (or `... finetune/run.py ARGS` with `script`): one process,
    several (DDP over gloo on a CPU), or a config file; `quiet` as the README's lines give it."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", *(["--quiet"] if quiet else [])]
    if config is not None:
        command += ["--config_file", str(config)]
    else:
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
        if processes > 1:
            command += ["--multi_gpu", "--main_process_port", "0"]
    return command + ([str(REPO / "finetune/run.py")] if script else ["-m", "finetune.run"]) + list(args)


def write_recipe(path: Path, **keys) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items()))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: no WANDB_*/HF_* variables of the caller's, hub off, no saved W&B
    login (NETRC points nowhere), unbuffered output; then `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "HF_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NETRC": "/nonexistent/netrc",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_to_end(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured, for launches that start several processes. On a timeout, every
    process of the launch prints its Python stacks (faulthandler, on SIGABRT), all are killed (the launcher's
    workers run in sessions of their own), and the test fails with the stacks: a hang shows where it hangs."""
    import psutil

    env = {**kwargs.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launch = psutil.Process(process.pid)
        everyone = launch.children(recursive=True) + [launch]
        for member in everyone:  # workers first: a launcher that dies first may leave them unsignalled
            with contextlib.suppress(psutil.Error):
                member.send_signal(signal.SIGABRT)
        psutil.wait_procs(everyone, timeout=20)
        for member in everyone:
            with contextlib.suppress(psutil.Error):
                member.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:3])} ... still running after {timeout:.0f} s; its stacks and output:\n"
                    f"{stderr[-12000:]}\n--- stdout ---\n{stdout[-2000:]}", pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def preempt_at_logged_step(argv: list[str], step: int, cwd: Path) -> str:
    """Start `finetune/run.py argv`, send SIGTERM once the Trainer has printed its `step`-th logged loss, and
    return the run's stderr; fails unless the run exits as preempted (75)."""
    from finetune import errors

    process = subprocess.Popen([sys.executable, str(REPO / "finetune/run.py"), *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=cwd, env=subprocess_env(WANDB_DISABLED="true"))
    logged = 0
    for line in process.stdout:  # the Trainer prints one dict per logged step
        if "'loss'" in line:
            logged += 1
            if logged == step:
                process.send_signal(signal.SIGTERM)
                break
    process.stdout.read()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == errors.PREEMPTED, stderr[-3000:]
    return stderr


def lora_model(recipe, padding_free: bool):
    """The recipe's LoRA model in train mode, seeded, with B initialised non-zero (peft starts B at zero, which
    would leave A's gradient zero and untested), for gradient comparisons; its attention as padding-free
    training picks it when `padding_free`."""
    import torch

    from finetune.data import padding_free as packing
    from finetune.model.load import load_model

    torch.manual_seed(0)
    attention = packing.plan(recipe.model, recipe.data).attention if padding_free else None
    model = load_model(recipe.model, attention=attention)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (tmpfs): room for a run's recipe and history, not for a checkpoint. Needs root, as
    CI has; elsewhere the test is skipped, saying so."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"can't mount a small tmpfs here ({made.stderr.strip()}); CI runs as root, where it can")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
