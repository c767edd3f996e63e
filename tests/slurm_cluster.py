"""A Slurm cluster on this machine, for the tests: Debian's slurmctld, two slurmd (two emulated nodes, n1 and
n2, reached at 127.0.0.1) and munge, run as root.

    python -m tests.slurm_cluster start /tmp/slurm    # prints the SLURM_CONF to export
    python -m tests.slurm_cluster stop /tmp/slurm

The configuration lives in its own directory (clients find it through SLURM_CONF), the daemons' state, spool, logs
and pid files too; only munge uses the system's key and socket. `.ci/run` installs the packages
(`apt-get install slurmctld slurmd slurm-client munge`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")  # two emulated nodes on this machine: multi-node jobs run for real
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


def missing() -> str | None:
    """Why no cluster can start here (a binary missing, not root), or None."""
    absent = [name for name in BINARIES if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd "
                "slurm-client munge")
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class Cluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.conf = directory / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        # Job ids unlike any earlier cluster's: the job's log (logs/finetune-<id>.out, appended to) is its own.
        self.first_job_id = 1000 + int(time.time()) % 50_000_000

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for name in ("state", "spool", "log"):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // (2 * len(NODES))
        cpus = max(1, (os.cpu_count() or 2) // len(NODES))
        for node in NODES:
            (self.directory / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=finetune-tests
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
FirstJobId={self.first_job_id}
MpiDefault=none
KillWait=60
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation={self.directory}/state
SlurmdSpoolDir={self.directory}/spool/%n
SlurmctldPidFile={self.directory}/slurmctld.pid
SlurmdPidFile={self.directory}/slurmd-%n.pid
SlurmctldLogFile={self.directory}/log/slurmctld.log
SlurmdLogFile={self.directory}/log/slurmd-%n.log
""" + "".join(f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={6920 + i} CPUs={cpus} "
              f"RealMemory={memory_mb} State=UNKNOWN\n" for i, node in enumerate(NODES))
            + f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP\n")

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for directory in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(directory).mkdir(parents=True, exist_ok=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # one munged for every cluster
            subprocess.run([_binary("munged"), "--force"], check=False, capture_output=True)
        env = {**os.environ, **self.env}
        subprocess.run([_binary("slurmctld"), "-f", str(self.conf)], check=True, env=env)
        for node in NODES:  # Debian's Slurm runs several slurmd on one machine, one per emulated node
            subprocess.run([_binary("slurmd"), "-f", str(self.conf), "-N", node], check=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            if state.split() and all(word in ("idle", "mixed", "allocated") for word in state.split()):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Slurm node did not come up in {timeout:.0f} s; see {self.directory}/log")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env={**os.environ, **self.env},
                       capture_output=True)
        stopping = []
        for name in [f"slurmd-{node}" for node in NODES] + ["slurmctld"]:
            pid_file = self.directory / f"{name}.pid"
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
                stopping.append(pid)
            except (OSError, ValueError):
                continue
        deadline = time.monotonic() + 10
        while stopping and time.monotonic() < deadline:  # gone, so a next cluster finds its ports free
            stopping = [pid for pid in stopping if _alive(pid)]
            time.sleep(0.1)

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        env = {**os.environ, **self.env, **kwargs.pop("env", {})}
        return subprocess.run(list(command), capture_output=True, text=True, env=env, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a mapping (JobState, Restarts, ExitCode, Reason, ...); {} once it is gone."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields


if __name__ == "__main__":
    action, directory = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(directory)
    if action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
