"""Bad input, as a new user types it: one `error:` line naming the value and the fix, exit code 2,
at most three lines of output, no traceback, no checkpoint folder created and an existing study
left byte-for-byte unchanged. Real launcher subprocesses; the pure checks with plain data."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from psearch.engine import devices, layout
from psearch.engine.cli import short_error
from psearch.engine.errors import UsageError
from psearch.writer_id.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVE = ROOT / "tests" / "objectives" / "sleepy.py"


def launch(tmp_path, *flags, env=None, objective=f"{OBJECTIVE}:objective", timeout=120):
    """The launcher as a user runs it, from `tmp_path`; (exit code, output lines)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update({"SLEEPY_SECONDS": "0", **(env or {})})
    argv = [sys.executable, str(ROOT / "parallel_search.py"), "--n_trials", "1", "--no_summary",
            *(["--objective", objective] if objective else []), *flags]
    done = subprocess.run(argv, cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


def assert_refused(code, lines, *words):
    text = "\n".join(lines)
    assert code == 2, text
    assert "Traceback" not in text and len(lines) <= 3, text
    assert any(line.startswith("error: ") for line in lines), text
    for word in words:
        assert word in text, text


def tree(path):
    """Every file under `path` with the hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lines_data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "lines", writers=3,
                          pages_per_writer=3, lines_per_page=2)


def test_a_bad_checkpoint_dir_is_one_line_and_creates_nothing(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    for flag_value, words in [("afile", ["is a file"]), ("afile/sub", ["is a file"]),
                              ("", ["--checkpoint_dir is empty"]),
                              (" ", ["--checkpoint_dir is empty"])]:
        code, lines = launch(tmp_path, "--cpu_workers", "1", "--checkpoint_dir", flag_value)
        assert_refused(code, lines, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("flags,words", [
    (["--storage", "foo://bar"], ["--storage 'foo://bar' cannot be opened"]),
    (["--cpu_workers", "1000"], ["at most", "--cpu_workers 1000"]),
    (["--cpu_workers", "1", "--workers_per_gpu", "0"], ["--workers_per_gpu"]),
    (["--n_trials", "0"], ["--n_trials must be at least 1"]),
    (["--trial_timeout", "-3"], ["--trial_timeout"]),
    (["--n_trials", "x"], ["invalid int value", "--help"]),
    (["--pruner", "sometimes"], ["--pruner", "--help"]),
    (["--gpus", "0", "--cpu_workers", "2"], ["conflicts"]),
])
def test_bad_flags_are_refused_before_anything_is_created(tmp_path, flags, words):
    code, lines = launch(tmp_path, "--checkpoint_dir", "runs/c", "--cpu_workers", "1", *flags)
    assert_refused(code, lines, *words)
    assert list(tmp_path.iterdir()) == []


def test_bad_data_is_refused_without_a_folder_or_a_log(tmp_path, lines_data):
    (tmp_path / "empty").mkdir()
    cases = [(["--data_root", str(tmp_path / "missing")], "is not a folder"),
             (["--data_root", str(tmp_path / "empty")], "empty"),
             (["--data_root", str(lines_data), "--num_writers_subset", "9"], "3")]
    for flags, word in cases:
        code, lines = launch(tmp_path, "--checkpoint_dir", "runs/c", "--cpu_workers", "1",
                             "--models", "small", *flags, objective=None)
        assert_refused(code, lines, word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_refused_rerun_leaves_the_study_and_the_folder_unchanged(tmp_path):
    code, lines = launch(tmp_path, "--checkpoint_dir", "c", "--cpu_workers", "1")
    assert code == 0, lines
    before = tree(tmp_path / "c")
    other = tmp_path / "other.py"
    other.write_text(OBJECTIVE.read_text())
    for flags, objective, word in [
            (["--direction", "minimize"], f"{OBJECTIVE}:objective", "maximize"),
            ([], f"{other}:objective", "other settings"),
            (["--heartbeat_grace", "30"], f"{OBJECTIVE}:objective", "--heartbeat_grace 90")]:
        code, lines = launch(tmp_path, "--checkpoint_dir", "c", "--cpu_workers", "1",
                             "--n_trials", "2", *flags, objective=objective)
        assert_refused(code, lines, word)
        assert tree(tmp_path / "c") == before  # not a byte changed, no new log file


def test_the_same_objective_by_a_relative_or_an_absolute_path_is_one_setting(tmp_path):
    shutil.copy(OBJECTIVE, tmp_path / "obj.py")
    code, lines = launch(tmp_path, "--checkpoint_dir", "c", "--cpu_workers", "1",
                         objective="obj.py:objective")
    assert code == 0, lines
    code, lines = launch(tmp_path, "--checkpoint_dir", "c", "--cpu_workers", "1", "--n_trials",
                         "2", objective=f"{tmp_path / 'obj.py'}:objective")
    assert code == 0, lines
    assert len(optuna.load_study(study_name="writer_id_search",
                                 storage=layout.default_storage_url(tmp_path / "c")).trials) == 2


def test_a_damaged_study_file_is_refused_and_left_as_it_is(tmp_path):
    (tmp_path / "c").mkdir()
    db = tmp_path / "c" / layout.STUDY_DB_NAME
    db.write_bytes(b"this is not a database" * 100)
    before = tree(tmp_path / "c")
    code, lines = launch(tmp_path, "--checkpoint_dir", "c", "--cpu_workers", "1")
    assert_refused(code, lines, "not a SQLite database", str(db))
    assert tree(tmp_path / "c") == before


def test_folders_and_a_study_that_cannot_be_written_are_refused(tmp_path, small_disk):
    read_only_fs = small_disk
    study_dir = read_only_fs / "search"
    study_dir.mkdir()
    subprocess.run([sys.executable, "-c", "import optuna, sys; optuna.create_study(study_name="
                    "'writer_id_search', storage=sys.argv[1])",
                    layout.default_storage_url(study_dir)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_fs)], check=True)
    before = tree(read_only_fs)
    for ckpt, word in [(read_only_fs, "read-only file system"),
                       (read_only_fs / "new" / "sub", "cannot create"),
                       (study_dir, "read-only")]:
        code, lines = launch(tmp_path, "--checkpoint_dir", str(ckpt), "--cpu_workers", "1")
        assert_refused(code, lines, word)
    assert tree(read_only_fs) == before


@pytest.mark.parametrize("one,two", [("a?b", "a"), ("x%41", "xA"), ("h#1", "h")])
def test_odd_characters_in_the_path_give_separate_working_studies(tmp_path, one, two):
    for ckpt, n in ((one, 1), (two, 2)):
        code, lines = launch(tmp_path, "--checkpoint_dir", ckpt, "--cpu_workers", "1",
                             "--n_trials", str(n))
        assert code == 0, lines
    for ckpt, n in ((one, 1), (two, 2)):
        assert (tmp_path / ckpt / layout.STUDY_DB_NAME).is_file()
        study = optuna.load_study(study_name="writer_id_search",
                                  storage=layout.default_storage_url(tmp_path / ckpt))
        assert len(study.trials) == n


def test_a_gpu_the_driver_does_not_report_is_refused(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"  # a stand-in for the driver's tool: two GPUs
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-aaaa1111-0000)'\n"
                    "echo 'GPU 1: NVIDIA H200 (UUID: GPU-bbbb2222-0000)'\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    code, lines = launch(work, "--checkpoint_dir", "c", "--gpus", "0,5", env=env)
    assert_refused(code, lines, "--gpus 0,5: no GPU 5", "lists 0, 1")
    code, lines = launch(work, "--checkpoint_dir", "c", env={**env, "CUDA_VISIBLE_DEVICES": "GPU-cc"})
    assert_refused(code, lines, "CUDA_VISIBLE_DEVICES=GPU-cc: no GPU GPU-cc")
    code, lines = launch(work, "--checkpoint_dir", "c", "--gpus", "7",
                         env={"PATH": "/usr/bin:/bin"})  # no driver tool at all
    assert_refused(code, lines, "--gpus 7: this machine has no nvidia-smi", "--cpu_workers")
    assert list(work.iterdir()) == []


def test_a_bad_flag_prints_three_lines_not_the_whole_usage():
    text = short_error("parallel_search.py", "--checkpoint_dir C [options]", "bad value")
    assert text.splitlines() == ["usage: parallel_search.py --checkpoint_dir C [options]",
                                 "error: bad value", "(run parallel_search.py --help for every flag)"]
    for script in ("parallel_search.py", "summarize.py", "single_gpu_hyperparameter_search.py"):
        done = subprocess.run([sys.executable, str(ROOT / script), "--bogus"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 3 and "--help" in done.stderr


# ---------------------------------------------------------------- pure checks, plain data

SMI_L = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5a2c1d3e-aaaa-bbbb-cccc-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-0d7f9e2c-1111-2222-3333-444444444444)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-77e0b0f1-aaaa-bbbb-cccc-111111111111)
"""


def test_gpu_ids_are_checked_against_what_the_driver_lists():
    inv = devices.parse_nvidia_smi_list(SMI_L)
    assert inv.indices == ("0", "1") and len(inv.uuids) == 3
    assert devices.unknown_gpus(["0", "1", "GPU-5a2c", "MIG-0d7f9e2c-1111-2222-3333-444444444444"],
                                inv) == []
    assert devices.unknown_gpus(["2", "GPU-", "GPU-9"], inv) == ["2", "GPU-", "GPU-9"]
    devices.check_gpus_exist(["7"], None, "--gpus 7")  # no driver tool: the worker checks
    with pytest.raises(UsageError, match=r"--gpus 0,7: no GPU 7 on this machine .*lists 0, 1"):
        devices.check_gpus_exist(["0", "7"], inv, "--gpus 0,7")


def test_worker_count_limits_follow_cores_and_memory():
    gib = 1 << 30
    assert devices.max_workers(2, 24 * gib, per_worker=192 << 20) == 8
    assert devices.max_workers(64, 24 * gib, per_worker=gib) == 24
    assert devices.max_workers(64, None, per_worker=gib) == 256
    assert devices.max_workers(1, gib // 2, per_worker=gib) == 1
    devices.check_worker_count(8, 8, 2, 24 * gib, "--cpu_workers 8")
    with pytest.raises(UsageError, match=r"--cpu_workers 9 asks for 9 workers; .* at most 8 "
                                         r"\(2 cores, 24.0 GiB memory\)"):
        devices.check_worker_count(9, 8, 2, 24 * gib, "--cpu_workers 9")


def test_workers_number_gpus_as_nvidia_smi_does_unless_the_user_chose():
    slot = devices.WorkerSlot("gpu3", 0, "3")
    assert devices.worker_env({}, slot, 1, 1, 2)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    mine = devices.worker_env({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, slot, 1, 1, 2)
    assert mine["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_paths_in_the_study_url_are_quoted_and_read_back_as_written(tmp_path):
    from psearch.engine.urls import sqlite_path

    for name in ("a?b", "x%41", "h#1", "plain dir"):
        url = layout.default_storage_url(tmp_path / name)
        assert sqlite_path(url) == tmp_path / name / layout.STUDY_DB_NAME


def test_output_dir_and_study_file_checks(tmp_path):
    assert layout.check_output_dir("--checkpoint_dir", str(tmp_path / "new" / "deeper")) == \
        tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    for value in ("", "f", "f/g"):
        with pytest.raises(UsageError):
            layout.check_output_dir("--checkpoint_dir", str(tmp_path / value) if value else value)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    layout.check_sqlite_file(empty)  # SQLite makes an empty file a database
    layout.check_sqlite_file(tmp_path / "missing.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(UsageError, match="not a SQLite database"):
        layout.check_sqlite_file(bad)
    with pytest.raises(UsageError, match="not a regular file"):
        layout.check_sqlite_file(tmp_path)
