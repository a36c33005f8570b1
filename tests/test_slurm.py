"""The single-node job script under a real SLURM (tests/slurm_cluster.py): `scontrol requeue` in
the middle of a search stops it (SIGTERM, exit 143), SLURM runs the job again, and the rerun
finishes exactly the budget."""
import os
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from slurm_cluster import FINAL_STATES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "single_node.sbatch"
N_TRIALS = 8


def count_states(checkpoint_dir: Path) -> dict[TrialState, int]:
    """Trials by state, read from the job's SQLite study."""
    study = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{checkpoint_dir / 'optuna_study.db'}")
    trials = study.get_trials(deepcopy=False)
    return {state: sum(t.state == state for t in trials) for state in TrialState}


def wait_for_complete(checkpoint_dir: Path, low: int, timeout: float) -> int:
    """Poll until at least `low` trials are COMPLETE; how many there are then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (checkpoint_dir / "trial_000").exists():  # the launcher has made the study by then
            complete = count_states(checkpoint_dir)[TrialState.COMPLETE]
            if complete >= low:
                return complete
        time.sleep(0.2)
    raise AssertionError(f"fewer than {low} trials completed within {timeout:g} s")


def test_requeued_job_resumes_and_finishes_the_exact_budget(slurm_cluster, tmp_path):
    checkpoint_dir = tmp_path / "search"
    env = {**os.environ, "SLEEPY_SECONDS": "3",  # this venv's python first, as if activated
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    job = slurm_cluster.sbatch(
        [f"--output={tmp_path}/job_%j.out", str(SCRIPT), "--checkpoint_dir", str(checkpoint_dir),
         "--n_trials", str(N_TRIALS), "--cpu_workers", "2", "--no_summary",
         "--objective", "tests/objectives/sleepy.py:objective"], env=env, cwd=ROOT)
    fields = slurm_cluster.wait_state(job, {"RUNNING"} | FINAL_STATES, timeout=20)
    assert fields["JobState"] == "RUNNING", Path(fields["StdOut"]).read_text()

    complete = wait_for_complete(checkpoint_dir, low=2, timeout=30)
    assert complete <= 4, f"{complete} trials done before the requeue: too late to test resuming"
    slurm_cluster.requeue(job)
    fields = slurm_cluster.wait_state(job, FINAL_STATES, timeout=60)

    log = Path(fields["StdOut"]).read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields['JobState']}\n{log}"
    assert int(fields["Restarts"]) >= 1, log
    assert "(restart 0)" in log and "(restart 1)" in log, log  # --open-mode=append kept both runs
    assert "exit code 143" in log, log  # the first run stopped on SIGTERM, cleanly
    assert f"{N_TRIALS}/{N_TRIALS} trials finished" in log, log
    states = count_states(checkpoint_dir)
    assert states[TrialState.COMPLETE] == N_TRIALS, states
    assert states[TrialState.RUNNING] == 0, states
