"""The processes of a multi-process run: sums and maxima across ranks, agreeing on a flag, and leaving the
process group in an order that cannot deadlock. In a single process every function is the identity or a no-op.
And a training process's link to its launcher (finetune.commands.launch, accelerate, torchrun): its exit code
through EXIT_STATUS, and a SIGTERM when the launcher dies."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

EXIT_STATUS = "FINETUNE_EXIT_STATUS"  # file a training process writes its exit code to (rank 0)
CONFIG = "FINETUNE_ACCELERATE_CONFIG"  # the accelerate config file the run was launched with, for its record


def follow_launcher() -> None:
    """In a training process started by a launcher (accelerate, torchrun): receive SIGTERM when the launcher dies,
    so that a launcher killed by SIGTERM still gets the run checkpointed. Linux only; a no-op elsewhere, and when
    not launched (a run from a shell, or under nohup, keeps running when its shell goes)."""
    launched = "LOCAL_RANK" in os.environ or any(key.startswith("ACCELERATE_") for key in os.environ)
    if not launched or not sys.platform.startswith("linux"):
        return
    if os.getppid() == 1:  # the launcher died before this process could ask: as if it had just died
        os.kill(os.getpid(), signal.SIGTERM)
        return
    die_with_parent(signal.SIGTERM)


def report_exit(code: int) -> int:
    """The exit code to leave with. Under this launcher, the run's code goes to the file it reads (main process)
    and the process exits 0, so that accelerate and torchrun, which would turn any other code into 1 and a
    failure report, stay quiet; elsewhere, `code` itself."""
    path = os.environ.get(EXIT_STATUS)
    if not path:
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(str(code))
    return 0


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before the line above
        os.kill(os.getpid(), signum)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_across_ranks(values: list[float], op: str = "sum", group=None) -> list[float]:
    """Sum or max each value over all processes (of `group`); the identity in a single process.

    A collective: every rank must call it at the same point. On an NCCL group the values go through the GPU, a
    device sync point, so the metrics call it at log steps and at the end of training only; a gloo group keeps
    it on the CPU.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def agree(flag: bool, group=None) -> bool:
    """True when any rank says True. Given a gloo group, a CPU collective: no step waits on the GPU."""
    return reduce_across_ranks([1.0 if flag else 0.0], "max", group)[0] > 0


def leave_process_group(trainer=None, wait: bool = True) -> None:
    """End this rank's part in the process group; with `wait`, only once every rank has got here. A no-op in a
    single-process run, and once left.

    Called by every rank right after its last collective work (saving), before the main process alone writes
    the summary and finishes the W&B run, so that no rank exits while a peer still holds a live connection to it.
    The order avoids a deadlock in torch's gloo teardown: a process group destroyed by the last reference to it
    held in C++ (the DDP reducer) joins its worker threads while holding the GIL, and a worker that is releasing
    a finished collective's tensors needs the GIL. So the wrapped model (and the Accelerator's references to it)
    go first, and the process groups die last, from Python, which releases the GIL while it waits.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    if trainer is not None:
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()  # drops its references to the DDP wrapper, then collects
    dist.destroy_process_group()


def check_launch(training_args) -> None:
    """Refuse a launch whose processes did not form one group (a launcher/config mismatch), naming both sizes."""

    import torch

    from finetune.errors import UsageError

    sharded = {"FSDP": os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true",
               "DeepSpeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"}
    for name, asked in sharded.items():
        if asked and not torch.cuda.is_available():
            raise UsageError(f"{name} needs CUDA GPUs, and this machine has none (accelerate would train with plain "
                             "DDP instead); for several CPU processes use launch/accelerate/cpu_ddp.yaml")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise UsageError(f"the launcher started {launched} processes but they formed a group of "
                         f"{training_args.world_size}; check the accelerate config (see launch/accelerate/)")


def launch_record() -> dict[str, object]:
    """How the run was distributed, as the launcher set it up (read from the environment, so it is known before
    the Trainer exists): `run/distributed_type` (NO, DDP, FSDP, DEEPSPEED), world size, machines, and the
    accelerate config file (as the toolkit's launcher knows it; "unknown" under a bare `accelerate launch`)."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        kind = "FSDP"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        kind = "DEEPSPEED"
    else:
        kind = "DDP" if world > 1 else "NO"
    config = os.environ.get(CONFIG)
    return {"run/distributed_type": kind, "run/world_size": world, "run/num_machines": max(1, world // per_machine),
            "run/accelerate_config": config or ("none" if config == "" else "unknown")}
