"""Upload offline W&B runs: `make sync`, `finetune sync`.

    finetune sync                                    # every run under ./wandb (WANDB_DIR/wandb)
    finetune sync wandb/offline-run-20261123_190354-wb0qf05m

Checked first, each in a second: that there are runs, that W&B credentials exist (`wandb login`), and that the
server answers; a problem is one line and exit 2, with the runs left where they are. Each run's upload is bounded
(`--timeout`, seconds); a run that fails or times out is named and the rest go on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from finetune import errors
from finetune.errors import UsageError


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def main(argv: list[str] | None = None) -> int:
    from finetune.tracking.wandb_run import online_problem

    parser = argparse.ArgumentParser(prog="finetune sync", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="offline run directories (default: all under WANDB_DIR)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for each run's upload")
    args = parser.parse_args(argv)
    wandb_dir = Path(os.environ.get("WANDB_DIR") or ".")
    runs = args.runs or offline_runs(wandb_dir)
    try:
        if not runs:
            raise UsageError(f"no offline runs under {wandb_dir / 'wandb'} (set WANDB_DIR, or name the runs)")
        missing = [str(run) for run in runs if not run.is_dir()]
        if missing:
            raise UsageError(f"not a run directory: {', '.join(missing)}")
        problem = online_problem()
        if problem:
            raise UsageError(f"{problem}; the {len(runs)} offline run(s) stay in {runs[0].parent} until then")
    except UsageError as error:
        return errors.report(error)
    wandb = str(Path(sys.executable).parent / "wandb")
    failed = []
    for number, run in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {run}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run([wandb, "sync", "--yes", str(run)], timeout=args.timeout).returncode == 0
        except subprocess.TimeoutExpired:
            print(f"  gave up after {args.timeout:.0f} s", file=sys.stderr)
            done = False
        if not done:
            failed.append(run)
    if failed:
        print(f"error: {len(failed)} of {len(runs)} run(s) not uploaded: {', '.join(map(str, failed))}; run "
              "`finetune sync` again with them", file=sys.stderr)
        return 1
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
