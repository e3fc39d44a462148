"""A real single-node SLURM cluster on localhost for tests: munged with its own key,
slurmctld and slurmd (Debian's slurm-wlm 22.05), all under one temporary
directory, stopped on exit.

No accounting database: ``sacct`` would fail, and submitit (which asks ``sacct``
for job states) would wait forever on a job that died without writing a result.
``tests/slurm/sacct`` answers submitit's one query from ``scontrol show job``
(finished jobs stay listed for ``MinJobAge`` seconds); it goes first on PATH for
the processes that watch jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SACCT_SHIM = Path(__file__).resolve().parent / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS) and os.geteuid() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a SLURM client: the config, and the sacct shim first on PATH."""
        return os.environ | {"SLURM_CONF": str(self.conf), "PATH": f"{SACCT_SHIM}:{os.environ['PATH']}"}

    def start(self) -> Cluster:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # clients (every job) reach the socket through it
        key = root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self.socket = root / "munge" / "munge.socket.2"
        self._spawn(
            [
                _daemon("munged"),
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
                f"--log-file={root / 'log' / 'munged.log'}",
            ]
        )
        _wait(lambda: self.socket.exists(), "munged's socket", root / "log" / "munged.log")
        cpus = os.cpu_count() or 1
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(
            f"""ClusterName=ftxtest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
NodeName={self.host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        env = self.env
        self._spawn([_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._spawn([_daemon("slurmd"), "-D", "-f", str(self.conf)], env)
        _wait(self._node_idle, "the node to be idle", root / "log" / "slurmd.log", timeout=60)
        return self

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}.out", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, **kwargs)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (slurmd first, munged last)."""
        if self.conf.exists():
            subprocess.run(["scancel", "--user=root"], capture_output=True, env=self.env)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait(ready, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"timed out waiting for {what}; {log}:\n{tail}")
