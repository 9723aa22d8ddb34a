"""Start (or reuse) a single-node SLURM cluster on localhost, for tests/test_slurm.py.

Needs root and Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them). There
is no systemd here, so the daemons are started directly: ``munged`` as the munge user, then
``slurmctld``, then ``slurmd -N localhost``. The node is described by ``slurmd -C`` (this
machine's real CPUs and memory); accounting is off, processes are tracked by
``proctrack/linuxproc`` and no task plugin binds them.

The cluster is left running for reuse: test sessions may overlap on one machine, and stopping
the daemons under another session would break its jobs. Run
``python tests/slurm_cluster.py start|stop|status`` to use it by hand.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# qsmflow test cluster (tests/slurm_cluster.py)"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGED_PID = MUNGE_RUN / "munged.pid"
SLURMCTLD_PID = Path("/run/slurmctld.pid")
SLURMD_PID = Path("/run/slurmd.pid")
LOG_DIR = Path("/var/log/slurm")
STATE_DIR = Path("/var/spool/slurmctld")
SPOOL_DIR = Path("/var/spool/slurmd")
LOCK_FILE = Path("/run/qsmflow-slurm-test.lock")
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
READY_STATES = {"idle", "mixed", "allocated", "completing"}


class ClusterUnavailable(Exception):
    """SLURM cannot run on this machine (not installed, or not root): the tests skip."""


class ClusterStartError(RuntimeError):
    """SLURM is installed but did not come up: a real failure, with the daemons' logs."""


@dataclass
class Started:
    """The daemons this process started (and so may stop), as (name, pid)."""

    daemons: list = field(default_factory=list)


def _run(*command, timeout=30, **kwargs):
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)


def node_state() -> str | None:
    """State of node ``localhost`` as sinfo reports it (``idle``, ``down`` ...), or None if no answer."""
    try:
        answer = _run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T", timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0 or not answer.stdout.strip():
        return None
    return answer.stdout.split()[0].strip().rstrip("*~#!%$@^-").lower()


def is_ready() -> bool:
    return node_state() in READY_STATES


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def _wait_for_pid(pid_file: Path, seconds: float = 5.0) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pid = _pid_alive(pid_file)
        if pid is not None:
            return pid
        time.sleep(0.05)
    return None


def _node_line() -> str:
    answer = _run("slurmd", "-C")
    if answer.returncode != 0:
        raise ClusterStartError(f"slurmd -C failed: {answer.stderr.strip()}")
    first = answer.stdout.splitlines()[0].split()
    hardware = [item for item in first if not item.startswith("NodeName=")]
    return " ".join(["NodeName=localhost", "NodeAddr=127.0.0.1", *hardware, "State=UNKNOWN"])


def slurm_conf() -> str:
    return "\n".join([
        MARKER,
        "ClusterName=qsmflowtest",
        "SlurmctldHost=localhost",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=600",
        "SchedulerType=sched/backfill",
        # SLURM may hold a batch job up to batch_sched_delay (3 s) before scheduling it; the tests'
        # chains of short jobs then wait about 3 s per node (0.95 s without it, measured here)
        "SchedulerParameters=batch_sched_delay=0",
        f"StateSaveLocation={STATE_DIR}",
        f"SlurmdSpoolDir={SPOOL_DIR}",
        f"SlurmctldPidFile={SLURMCTLD_PID}",
        f"SlurmdPidFile={SLURMD_PID}",
        f"SlurmctldLogFile={LOG_DIR / 'slurmctld.log'}",
        f"SlurmdLogFile={LOG_DIR / 'slurmd.log'}",
        _node_line(),
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _logs() -> str:
    tails = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = LOG_DIR / name
        if path.is_file():
            tails.append(f"--- {path} (last lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(tails)


def _start_munge(started: Started) -> None:
    if _run("sh", "-c", "munge -n | unmunge").returncode == 0:
        return
    if not MUNGE_KEY.is_file():
        if shutil.which("mungekey"):
            _run("mungekey", "--create", "--keyfile", str(MUNGE_KEY))
        else:
            MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)
    answer = _run("runuser", "-u", "munge", "--", shutil.which("munged"), "--force")
    if answer.returncode != 0:
        raise ClusterStartError(f"munged did not start: {answer.stderr.strip()}")
    for _ in range(50):
        if _run("sh", "-c", "munge -n | unmunge").returncode == 0:
            started.daemons.append(("munged", _wait_for_pid(MUNGED_PID)))
            return
        time.sleep(0.1)
    raise ClusterStartError("munged started but 'munge -n | unmunge' still fails")


def start() -> Started:
    """Make sure a single-node cluster answers on localhost; return what was started here.

    Sessions that start at the same time take turns (a lock file); the later one reuses.

    Raises
    ------
    ClusterUnavailable
        SLURM or munge is not installed, or this is not root (tests skip).
    ClusterStartError
        Installed, but the cluster did not become ready (tests fail, with the logs).
    """
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        raise ClusterUnavailable(f"SLURM/munge not installed (missing {', '.join(missing)}); "
                                 "install Debian's slurm-wlm and munge (see .ci/run)")
    if os.geteuid() != 0 and not is_ready():
        raise ClusterUnavailable("starting a local SLURM needs root, and no cluster answers on localhost")
    with open(LOCK_FILE if os.geteuid() == 0 else os.devnull, "a") as lock:
        if os.geteuid() == 0:
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _start()


def _start() -> Started:
    started = Started()
    ours = SLURM_CONF.is_file() and MARKER in SLURM_CONF.read_text(errors="replace")
    may_answer = SLURM_CONF.is_file() and (not ours or _pid_alive(SLURMCTLD_PID) is not None)
    if may_answer and is_ready():  # (sinfo takes ~10 s to give up when nothing answers)
        return started
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting a local SLURM needs root, and no cluster answers on localhost")
    if SLURM_CONF.exists() and not ours:
        raise ClusterUnavailable(f"{SLURM_CONF} belongs to another SLURM set-up that does not answer; not overwriting it")

    _start_munge(started)
    for directory in (SLURM_CONF.parent, LOG_DIR, STATE_DIR, SPOOL_DIR):
        directory.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(slurm_conf())

    if _pid_alive(SLURMCTLD_PID) is None:
        answer = _run("slurmctld")  # recovers saved jobs, if any, rather than losing them
        if answer.returncode != 0:
            raise ClusterStartError(f"slurmctld did not start: {answer.stderr.strip()}\n{_logs()}")
        for _ in range(100):
            if _run("scontrol", "ping").returncode == 0:
                break
            time.sleep(0.1)
        started.daemons.append(("slurmctld", _wait_for_pid(SLURMCTLD_PID)))
    if _pid_alive(SLURMD_PID) is None:
        answer = _run("slurmd", "-N", "localhost")
        if answer.returncode != 0:
            raise ClusterStartError(f"slurmd did not start: {answer.stderr.strip()}\n{_logs()}")
        started.daemons.append(("slurmd", _wait_for_pid(SLURMD_PID)))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = node_state()
        if state in READY_STATES:
            return started
        if state and ("down" in state or "drain" in state):
            _run("scontrol", "update", "NodeName=localhost", "State=RESUME")
        time.sleep(0.5)
    raise ClusterStartError(f"node localhost is not ready after 60 s (state {node_state()})\n{_logs()}")


def start_or_skip() -> None:
    """For a test: make sure the cluster answers (see :func:`start`), or skip the test saying why
    SLURM cannot run on this machine."""
    import pytest

    try:
        start()
    except ClusterUnavailable as reason:
        pytest.skip(f"no SLURM here: {reason}")


def stop(started: Started) -> None:
    """Stop the daemons that :func:`start` started (newest first), and wait until they exit."""
    for name, pid in reversed(started.daemons):
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


def _main(argv) -> int:
    command = argv[0] if argv else "status"
    if command == "start":
        try:
            started = start()
        except ClusterUnavailable as error:
            print(f"unavailable: {error}")
            return 1
        print("ready; started:", ", ".join(f"{n} ({p})" for n, p in started.daemons) or "nothing (already running)")
    elif command == "stop":
        stop(Started([(name, _pid_alive(pid_file)) for name, pid_file in
                      (("munged", MUNGED_PID), ("slurmctld", SLURMCTLD_PID), ("slurmd", SLURMD_PID))]))
        print("stopped")
    else:
        print(f"node localhost: {node_state() or 'no answer'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
