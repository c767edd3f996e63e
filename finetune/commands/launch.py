"""The launcher behind `launch/train.sh`, `make train` and `finetune launch`: accelerate, with exact exit codes and
signals that reach the training processes.

    python -m finetune.commands.launch recipes/tiny.yaml --max_steps 100
    ACCELERATE_CONFIG=launch/accelerate/cpu_ddp.yaml python -m finetune.commands.launch recipes/tiny.yaml
    python -m finetune.commands.launch --num_machines 2 --machine_rank 0 ... -- recipes/tiny.yaml  # accelerate's

What `accelerate launch` alone does not do, and this does:
- Bad input is reported before any process starts: one line per problem, exit code 2, no traceback.
- The exit code of the run (0, 2, 3, 75; see finetune.errors) comes back exactly. accelerate turns every failure
  into 1 (and a CalledProcessError traceback without `--quiet`); the training processes write their code to a
  file this launcher reads (FINETUNE_EXIT_STATUS).
- SIGTERM, SIGINT and SIGUSR1 sent to this launcher (by a user, a container runtime, a scheduler) go to every
  training process, which checkpoints at the next step boundary and exits 75. A second Ctrl-C stops them at once.
  accelerate's own launcher dies on SIGTERM and leaves a single training process running; under torchrun (several
  processes) it forwards SIGTERM but kills the workers 30 s later. Training processes started by a bare
  `accelerate launch` get SIGTERM when their launcher dies (`follow_launcher`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.training.ranks import CONFIG, EXIT_STATUS, die_with_parent
from finetune.training.rundir import rerun_hint

ACCELERATE = "--accelerate-launch"  # `-m finetune.commands.launch --accelerate-launch ARGS`: accelerate_launch
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def accelerate_command(argv: list[str], config: str | None, options: list[str] = ()) -> list[str]:
    """`accelerate launch [OPTIONS]` of `-m finetune.run ARGV` (run by `accelerate_launch`): the accelerate config
    file when given, else the user's accelerate default config when there is one, else one process."""
    command = [sys.executable, "-m", "finetune.commands.launch", ACCELERATE, *options]
    if config:
        command += ["--config_file", config]
    elif "--config_file" not in options and not default_accelerate_config().is_file():
        command += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    return command + ["-m", "finetune.run", *argv]


def accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch ARGV`, in this process, between the launcher and the training processes. Dies with the
    launcher (a `kill -9` of it leaves nothing running: the training processes get SIGTERM when this process
    goes, and checkpoint). Returns 128 + the signal that killed a training process, which accelerate would turn
    into 1; 1 for any other failure; 0 when the training processes exited (they report their codes in
    EXIT_STATUS)."""
    import logging

    die_with_parent(signal.SIGKILL)
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    args.quiet = False  # a failed training process raises, with its return code, instead of sys.exit(1)
    args.num_cpu_threads_per_process = args.num_cpu_threads_per_process or cpu_threads(args)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:  # one process
        return 128 - error.returncode if error.returncode < 0 else 1
    except Exception as error:  # several processes: torchrun's ChildFailedError names each failure
        failures = getattr(error, "failures", None)
        if not failures:
            logging.getLogger("finetune").exception("accelerate launch failed")
            return 1
        codes = [failure.exitcode for failure in failures.values()]
        return 128 - min(codes) if min(codes) < 0 else 1
    return 0


def cpu_threads(args) -> int | None:
    """Threads for each training process on a machine without CUDA GPUs, where neither the command nor
    OMP_NUM_THREADS says: the CPUs this launcher may use, shared among the machine's processes. accelerate gives
    each process one thread (OMP_NUM_THREADS=1) unless told `--cpu`, which trains a laptop at a fraction of its
    speed; `python finetune/run.py` uses them all. None: accelerate's choice stands."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return None
    config = None
    if args.config_file or default_accelerate_config().is_file():
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(args.config_file)
    processes = args.num_processes or getattr(config, "num_processes", None) or 1
    machines = args.num_machines or getattr(config, "num_machines", None) or 1
    return max(len(os.sched_getaffinity(0)) // max(processes // machines, 1), 1)


def default_accelerate_config() -> Path:
    from accelerate.commands.config import default_config_file

    return Path(default_config_file)


def check(argv: list[str]) -> int | None:
    """What finetune.run checks before torch loads (the recipe, W&B values, the output directory), here before any
    process starts: the exit code when it is bad input (the problems printed), None when it may go on. What needs
    the Trainer (its own checks) is checked by the training process."""
    from finetune import errors, run

    flags = [token for token in argv if token in run.FLAGS]
    try:
        run.check([token for token in argv if token not in run.FLAGS], flags)
    except errors.UsageError as error:
        return errors.report(error)
    return None


def check_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS, which accelerate reads as an integer (a traceback otherwise), refused in one line."""
    if value is None or (value.strip().isdigit() and int(value) > 0):
        return None
    from finetune import errors

    return errors.report(errors.UsageError(
        f"OMP_NUM_THREADS: {value!r} is not a number of threads; set a positive integer, or unset it (each training "
        "process then gets its share of the CPUs)"))


def check_config(path: str | None) -> int | None:
    """An accelerate config this machine can't run, refused before accelerate starts: DeepSpeed without the
    package, FSDP or DeepSpeed without a CUDA GPU (accelerate would train with plain DDP instead)."""
    if not path:
        return None
    import importlib.util

    import yaml

    from finetune import errors

    try:
        kind = str((yaml.safe_load(Path(path).read_text()) or {}).get("distributed_type", ""))
    except (OSError, yaml.YAMLError) as error:
        return errors.report(errors.UsageError(f"accelerate config {path}: can't be read ({error})"))
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        return errors.report(errors.UsageError(f"accelerate config {path}: DeepSpeed is not installed; pip install "
                                               "deepspeed (it needs CUDA GPUs), or use another config"))
    if kind in ("FSDP", "DEEPSPEED"):
        import torch

        if not torch.cuda.is_available():
            return errors.report(errors.UsageError(
                f"accelerate config {path}: {kind} needs CUDA GPUs, and this machine has none (accelerate would "
                "train with plain DDP instead); for several CPU processes use launch/accelerate/cpu_ddp.yaml"))
    return None


def descendants(process) -> list:
    import psutil

    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []


def run(command: list[str]) -> int:
    """Run `command` in a session of its own, forwarding FORWARDED signals to the processes it starts; returns its
    exit code, or the one its training processes reported."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as scratch:
        status = Path(scratch) / "exit-status"
        config = next((command[i + 1] for i, token in enumerate(command[:-1]) if token == "--config_file"), "")
        # accelerate's own launcher ignores these signals: they are for the training processes, which this
        # launcher tells (torchrun would kill its workers 30 s after a SIGTERM; accelerate would die of one).
        process = subprocess.Popen(command, env={**os.environ, EXIT_STATUS: str(status), CONFIG: config},
                                   start_new_session=True, preexec_fn=_ignore_forwarded)
        interrupts, pending, delivered, killed = [], [], [], []

        def send(targets, signum):
            delivered.append(int(signum))
            for target in targets:
                try:
                    target.send_signal(signum)
                except (psutil.Error, ProcessLookupError):
                    pass

        def forward(signum, frame):
            if signum == signal.SIGINT:
                interrupts.append(time.monotonic())
            if len(interrupts) > 1:  # a second Ctrl-C: everything, at once
                if not killed:
                    print("stopped at once (a second Ctrl-C), without saving; a rerun resumes from the last "
                          "checkpoint, if one was written", file=sys.stderr, flush=True)
                killed.append(signum)
                send([*descendants(process), process], signal.SIGKILL)
                return
            # The training processes, not accelerate's own launcher: it would die of SIGTERM, or pass it on and
            # kill the workers 30 s later. Before they exist, the signal waits for them.
            targets = descendants(process)
            if targets:
                send(targets, signum)
            else:
                pending.append(signum)

        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
        try:
            workers = []
            while process.poll() is None:
                workers = descendants(process) or workers
                if workers and pending:
                    send(workers, pending.pop(0))
                time.sleep(0.2)
            psutil.wait_procs([w for w in workers if w.is_running()], timeout=None)  # they may outlive accelerate
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if killed:
            return 128 + signal.SIGINT
        if status.is_file():
            return int(status.read_text())
        if delivered:  # the run was stopped by the signal before it could say so (while it was starting)
            print(f"error: stopped by {signal.Signals(delivered[-1]).name} before training began; nothing was saved",
                  file=sys.stderr, flush=True)
            return 128 + delivered[-1]
        code = process.returncode if process.returncode >= 0 else 128 - process.returncode
        if code > 128:  # a training process killed by a signal it can't handle (the kernel's OOM killer: SIGKILL)
            print(f"error: the training process was killed by {signal.Signals(code - 128).name}"
                  f"{' (the out-of-memory killer sends it; see dmesg)' if code - 128 == signal.SIGKILL else ''}, "
                  f"without saving; {rerun_hint(overwrites(command))} from the last checkpoint",
                  file=sys.stderr, flush=True)
        return code


def overwrites(command: list[str]) -> bool:
    """Whether a training command line says --overwrite_output_dir (true): run again, it starts over."""
    for i, token in enumerate(command):
        value = token.split("=", 1)[1] if token.startswith("--overwrite_output_dir=") else (
            (command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--") else "true")
            if token == "--overwrite_output_dir" else None)
        if value is not None and value.lower() in ("true", "1", "yes"):
            return True
    return False


def _ignore_forwarded() -> None:
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    from finetune import logs

    argv = logs.take_verbose(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [ACCELERATE]:
        return accelerate_launch(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    options, argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    config = os.environ.get("ACCELERATE_CONFIG") or None
    problem = check_threads(os.environ.get("OMP_NUM_THREADS")) or check(argv) or check_config(config or next(
        (options[i + 1] for i, token in enumerate(options[:-1]) if token == "--config_file"), None))
    if problem is not None:
        return problem
    return run(accelerate_command(argv, config, options))


if __name__ == "__main__":
    sys.exit(main())
