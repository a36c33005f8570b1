"""Launchers started as a user would start them, for the process tests: a real
`parallel_search.py` subprocess (optionally under another host name), its output in a file, and
helpers to read the study and the trial folders it leaves."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLEEPY = ROOT / "tests" / "objectives" / "sleepy.py"


TAG_VAR = "PSEARCH_TEST_RUN"  # put in each launcher's environment by the test, inherited by all


def processes_tagged(tag, exclude=()):
    """Every live process but `exclude` whose environment carries TAG_VAR=`tag`: all that a
    launcher started with that tag left, forked (whose /proc environ is the launcher's own) or
    exec'd, also once orphaned and adopted by init."""
    mark = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _descendants_by_env(run):
    """Every live process of `run` but the launcher itself (see processes_tagged)."""
    return processes_tagged(run.tag, exclude=(run.proc.pid,))


class Run:
    """One launcher process started like a user would, output kept in a file."""

    def __init__(self, ckpt, flags, sleep, env=None, objective=SLEEPY, host=None, out=None,
                 summary=False):
        self.ckpt = Path(ckpt)
        self.out_path = Path(out) if out else self.ckpt.parent / (self.ckpt.name + ".out")
        self.tag = uuid.uuid4().hex
        full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        full_env.update({"SLEEPY_SECONDS": str(sleep), TAG_VAR: self.tag, **(env or {})})
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*as_host(host), sys.executable, str(ROOT / "parallel_search.py"), "--objective",
                 f"{objective}:objective", "--checkpoint_dir", str(self.ckpt),
                 *([] if summary else ["--no_summary"]), *flags],
                env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started = time.monotonic()

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running after {timeout} s:\n{self.output()}")

    def output(self):
        return self.out_path.read_text(errors="replace")

    def started_trials(self):
        return len(list(self.ckpt.glob("trial_*/env.json")))

    def wait_until_started(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while self.started_trials() < n:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"{n} trials never started:\n{self.output()}"
            time.sleep(0.1)


@pytest.fixture
def runs():
    """Start launchers; kill whatever is left of them when the test ends."""
    started = []
    yield lambda *a, **k: started.append(Run(*a, **k)) or started[-1]
    for run in started:
        for pid in [run.proc.pid, *_descendants_by_env(run)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.proc.wait()


def trials(ckpt=None, storage=None):
    storage = storage or f"sqlite:///{Path(ckpt) / 'optuna_study.db'}"
    return optuna.load_study(study_name="writer_id_search", storage=storage).get_trials()


def by_state(ts, state):
    return [t for t in ts if t.state == state]


def envs(ckpt):
    return [json.loads(p.read_text()) for p in sorted(Path(ckpt).glob("trial_*/env.json"))]


def max_overlap(records):
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def as_host(host):
    """argv prefix that runs a command under its own host name (a new UTS namespace), standing in
    for another node of a cluster; [] for this host."""
    if host is None:
        return []
    return ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$0" "$@"']


def can_pose_as_another_host():
    """True when `unshare --uts` works here (root, and unshare installed)."""
    try:
        return subprocess.run([*as_host("probe"), "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs for the trials to fill (root only; skipped with the reason otherwise),
    unmounted at the end. Remount it to change its size (`mount -o remount,size=64m`) or make it
    read-only (`remount,ro`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
