"""A real one-machine SLURM for tests: munged, slurmctld and slurmd in a temporary folder.

Ask for the session fixture `slurm_cluster` (registered in conftest.py). It needs root and the
Debian packages `slurm-wlm` and `munge`; tests skip without them (fail under CI:
conftest.missing_server), and fail with the daemons' logs when those are installed but the cluster
does not come up. Nothing outside the temporary folder is used: a munge key and socket of its own,
free ports, state, spool and logs, so an installed SLURM or munge on the machine is neither used
nor disturbed.

Two settings differ from SLURM's defaults so that a requeued job starts again about 6 s after
`scontrol requeue` instead of 175 s (measured here with the defaults: it may start `cred_expire`
+ 1 = 121 s later, once its old credential has expired, and then waits for the main scheduler's
next pass, every 60 s; backfill skips it since nothing else changed):
AuthInfo=...,cred_expire=5 (the smallest value SLURM accepts) and SchedulerParameters=
sched_interval=1.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SBIN_PATH = os.pathsep.join(["/usr/sbin", "/usr/bin", "/sbin", "/bin", os.environ.get("PATH", "")])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")
INSTALL = "apt-get install slurm-wlm munge"
KILL_WAIT_S = 30  # SLURM's default, what the job scripts' --stop_timeout is chosen against
START_TIMEOUT_S = 30
# States in which a job stays until SLURM forgets it (MinJobAge); a requeued job leaves them.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                          "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
# `scontrol show job -o` is one line of Key=Value fields; values may hold spaces (paths).
FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def parse_fields(line: str) -> dict[str, str]:
    """Key=Value fields of one `scontrol show -o` line (pure)."""
    matches = list(FIELD.finditer(line))
    ends = [m.start() for m in matches[1:]] + [len(line)]
    return {m.group(1): line[m.end():end].strip() for m, end in zip(matches, ends)}


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, node: str, cpus: int, ports: list[int]) -> str:
    """A one-node cluster: no cgroups, no accounting, everything under `root` (pure)."""
    return f"""\
ClusterName=pstest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
KillWait={KILL_WAIT_S}
MinJobAge=120
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=100 State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """The running cluster and the client commands a test needs."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env  # SLURM_CONF for the client commands, no SLURM_*/SBATCH_* of an outer job

    def run(self, *argv: str, timeout: float = 30) -> str:
        """A client command's output; RuntimeError with its stderr if it fails."""
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, args: list[str], env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit a batch job with `env` as its environment (sbatch's --export=ALL); its id."""
        job_env = {**clean_environ(env if env is not None else os.environ),
                   "SLURM_CONF": self.env["SLURM_CONF"]}
        sbatch = shutil.which("sbatch", path=SBIN_PATH)
        proc = subprocess.run([sbatch, "--parsable", *args], env=job_env, cwd=cwd,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        return parse_fields(self.run("scontrol", "show", "job", "-o", job_id).strip())

    def state(self, job_id: str) -> str:
        return self.show_job(job_id)["JobState"]

    def requeue(self, job_id: str) -> None:
        """What preemption or a node failure does: SIGTERM now, SIGKILL after KillWait, rerun."""
        self.run("scontrol", "requeue", job_id)

    def wait_state(self, job_id: str, states: set[str] | frozenset[str],
                   timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; its fields. Fails with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.show_job(job_id)
            if fields["JobState"] in states:
                return fields
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} not in {sorted(states)} after {timeout:g} s: "
                            f"{fields['JobState']} ({fields.get('Reason')})\n{self.logs()}")
            time.sleep(0.25)

    def cancel_all(self, timeout: float = KILL_WAIT_S + 10) -> None:
        """scancel every job and wait until the queue is empty (SIGKILL comes after KillWait)."""
        self.run("scancel", "--user", "root")
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def logs(self, lines: int = 40) -> str:
        """The tail of every daemon's log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def clean_environ(environ) -> dict[str, str]:
    """The environment without an outer job's SLURM_* and sbatch's SBATCH_* input variables."""
    return {k: v for k, v in environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


def missing_requirement() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "a real SLURM needs root (slurmd starts the jobs)"
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL})"
    return None


def start_munged(root: Path) -> subprocess.Popen:
    """munged with its own key and socket; it insists on a socket folder all may enter."""
    folder = root / "munge"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # whatever the umask
    key = folder / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(128))  # 1024 bits, what `mungekey` makes
    argv = [shutil.which("munged", path=SBIN_PATH), "--foreground",
            f"--socket={folder}/munge.socket", f"--key-file={key}",
            f"--pid-file={folder}/munged.pid", f"--log-file={root}/log/munged.log",
            f"--seed-file={folder}/munged.seed"]
    return spawn(argv, os.environ, root / "log" / "munged.stderr.log")


def start_daemon(name: str, args: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen:
    """A SLURM daemon in the foreground (-D), so that we hold its pid."""
    argv = [shutil.which(name, path=SBIN_PATH), "-D", "-f", env["SLURM_CONF"], *args]
    return spawn(argv, env, root / "log" / f"{name}.stderr.log")


def spawn(argv: list[str], env, stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "w") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def wait_until(ready, procs: dict[str, subprocess.Popen], cluster: SlurmCluster,
               what: str) -> None:
    """Poll `ready()`; fail loudly with the logs if a daemon exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [f"{n} (exit {p.returncode})" for n, p in procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {START_TIMEOUT_S} s"
            pytest.fail(f"SLURM test cluster: {what}: {why}\n{cluster.logs()}", pytrace=False)
        time.sleep(0.2)


def node_idle(cluster: SlurmCluster) -> bool:
    try:
        return cluster.run("sinfo", "-h", "-o", "%T").strip() == "idle"
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM our daemons (slurmd first, munged last), SIGKILL what lingers."""
    for name in ("slurmd", "slurmctld", "munged"):
        proc = procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster(missing_server):
    """A running one-node SLURM cluster (see the module docstring); torn down after the session."""
    reason = missing_requirement()
    if reason:
        missing_server(reason)
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    root.chmod(0o755)  # munged checks that every user can reach its socket
    for sub in ("log", "state", "spool"):
        (root / sub).mkdir()
    (root / "plugstack.conf").write_text("")  # not the machine's /etc/slurm/plugstack.conf
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, os.cpu_count() or 1, free_ports(2)))
    env = {**clean_environ(os.environ), "SLURM_CONF": str(conf), "PATH": SBIN_PATH}
    cluster = SlurmCluster(root, env)
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["munged"] = start_munged(root)
        wait_until(lambda: (root / "munge" / "munge.socket").exists(), procs, cluster, "munged")
        procs["slurmctld"] = start_daemon("slurmctld", ["-c"], root, env)
        procs["slurmd"] = start_daemon("slurmd", ["-c", "-N", node], root, env)
        wait_until(lambda: node_idle(cluster), procs, cluster, f"node {node} idle in sinfo")
        yield cluster
    finally:
        if procs.get("slurmctld") is not None and procs["slurmctld"].poll() is None:
            try:
                cluster.cancel_all()
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the daemons go down next anyway
        stop(procs)
        shutil.rmtree(root, ignore_errors=True)
