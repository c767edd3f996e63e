"""What a run can end with: the exit codes of the README's table, and the error for bad input.

| code | meaning |
|---|---|
| 0 | trained, evaluated, saved |
| 2 | bad input (recipe, environment, data, output directory): nothing was written |
| 3 | stopped on a non-finite loss or weights; the last good checkpoint is kept |
| 74 | the disk filled up while writing: free space, run the same command to resume |
| 75 | preempted (SIGTERM/SIGINT/SIGUSR1): checkpoint saved, run the same command to resume |
| 128 + signal | stopped before training began (130 for Ctrl-C, 143 for SIGTERM), or by a second Ctrl-C: nothing saved |
"""

from __future__ import annotations

import os
import sys

OK = 0
USAGE = 2
DIVERGED = 3
DISK_FULL = 74  # EX_IOERR
PREEMPTED = 75  # EX_TEMPFAIL: "try again later", the same command resumes


class UsageError(Exception):
    """Bad input, every problem found, one line each. Commands print them and exit with USAGE."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def report(error: UsageError) -> int:
    """Print each problem as `error: ...` on stderr (by the main process only: under a launcher every process
    finds the same problems); returns USAGE."""
    if int(os.environ.get("RANK", "0")) != 0:
        return USAGE
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    return USAGE


def says_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or the quota is full: an OSError's errno, or the words, as
    safetensors and others put them into their own errors."""
    import errno

    chain = [error, error.__cause__, error.__context__]
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or any(
        text in str(error) for text in ("No space left on device", "Disk quota exceeded"))
