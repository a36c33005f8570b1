"""Storage URLs, the per-storage budget lock's target, the network-file-system warning and the
owner of a trial: pure helpers with plain data, /proc read for this very process."""
import os

import pytest

from psearch.engine import ownership, procfs, storage as storage_lib, urls

MOUNTS = """\
sysfs /sys sysfs rw 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/home /home nfs4 rw,vers=4.2 0 0
lustre@o2ib:/scratch /scratch lustre rw 0 0
/dev/sdb1 /scratch/local\\040disk ext4 rw 0 0
"""


@pytest.mark.parametrize("url, psycopg2, expected", [
    ("postgresql://u@h:5432/db", False, "postgresql+psycopg://u@h:5432/db"),
    ("postgres://u@h/db", False, "postgresql+psycopg://u@h/db"),
    ("postgres://u@h/db", True, "postgresql+psycopg://u@h/db"),  # SQLAlchemy refuses postgres://
    ("postgresql://u@h/db", True, "postgresql://u@h/db"),
    ("postgresql+psycopg2://u@h/db", False, "postgresql+psycopg2://u@h/db"),
    ("sqlite:////x/a.db", False, "sqlite:////x/a.db"),
    ("mysql+pymysql://u@h/db", False, "mysql+pymysql://u@h/db"),
])
def test_postgresql_urls_get_the_installed_driver(url, psycopg2, expected):
    assert urls.driver_url(url, have_psycopg2=psycopg2) == expected


def test_file_paths_behind_urls():
    assert urls.journal_path("journal:///shared/s.log") == "/shared/s.log"
    assert urls.journal_path("sqlite:///x.db") is None
    assert str(urls.sqlite_path("sqlite:////abs/dir/s.db")) == "/abs/dir/s.db"
    assert str(urls.sqlite_path("sqlite:///rel/s.db")) == "rel/s.db"
    assert urls.sqlite_path("sqlite://") is None
    assert urls.sqlite_path("postgresql://u@h/db") is None


def test_dashboard_command_takes_a_journal_path_not_its_url():
    assert storage_lib.dashboard_command("journal:///sh ared/s.log") == \
        "optuna-dashboard '/sh ared/s.log'"
    assert storage_lib.dashboard_command("sqlite:////c/optuna_study.db") == \
        "optuna-dashboard sqlite:////c/optuna_study.db"
    assert storage_lib.dashboard_command("postgresql://u@h/db").startswith(
        "optuna-dashboard postgresql")


def test_mount_of_picks_the_deepest_mount_and_decodes_spaces():
    assert storage_lib.mount_of("/home/ana/c/optuna_study.db", MOUNTS) == ("/home", "nfs4")
    assert storage_lib.mount_of("/scratch/local disk/s.db", MOUNTS) == ("/scratch/local disk",
                                                                       "ext4")
    assert storage_lib.mount_of("/scratch/x.db", MOUNTS) == ("/scratch", "lustre")
    assert storage_lib.mount_of("/homework/x.db", MOUNTS) == ("/", "ext4")


@pytest.mark.parametrize("url, warned", [
    ("sqlite:////home/ana/c/optuna_study.db", "nfs4"),
    ("sqlite:////scratch/run/optuna_study.db", "lustre"),
    ("sqlite:////scratch/local disk/s.db", None),
    ("sqlite:////tmp/s.db", None),
    ("postgresql://u@h/db", None),
    ("journal:////home/ana/s.log", None),
])
def test_sqlite_on_a_network_file_system_is_warned_about(url, warned):
    warning = storage_lib.network_filesystem_warning(url, MOUNTS)
    if warned is None:
        assert warning is None
    else:
        assert warned in warning and "postgresql://" in warning and "journal:///" in warning


def test_heartbeat_interval_is_a_quarter_of_the_grace_at_most_20_s():
    assert [storage_lib.heartbeat_interval_s(g) for g in (5, 8, 40, 90, 600)] == [1, 2, 10, 20, 20]


def test_an_unreachable_database_is_a_usage_error():
    with pytest.raises(storage_lib.UsageError, match="cannot be opened"):
        storage_lib.make_storage("postgresql://nobody@127.0.0.1:1/none")


def test_this_process_is_alive_and_judged_by_its_start_time():
    here = ownership.Host.current()
    attrs = ownership.owner_attrs(here, run="r", worker="cpu0")
    assert attrs["pid"] == os.getpid() and attrs["pid_start"] > 0
    assert ownership.judge(attrs, here) == ownership.Verdict.ALIVE
    assert ownership.judge({**attrs, "pid_start": attrs["pid_start"] + 1}, here) == \
        ownership.Verdict.DEAD  # same pid, another process: the pid was reused
    assert ownership.judge({**attrs, "host": "elsewhere"}, here) == ownership.Verdict.UNKNOWN
    assert ownership.judge({**attrs, "pid_start": None}, here) == ownership.Verdict.UNKNOWN
    assert procfs.process_start(2 ** 22 + 1) is None


def test_run_ids_and_log_safe_host_names():
    host = ownership.Host(name="gpu-node_07.cluster", boot_id="b")
    assert ownership.run_id(host, pid=42, started=0).startswith("gpu-node_07.cluster/42/19")
    assert ownership.safe_host("gpu-node_07.cluster") == "gpu-node-07.cluster"
    assert ownership.safe_host("/..") == "host"


def test_a_duplicate_schema_is_a_race_to_retry_and_other_errors_are_not():
    import sqlalchemy.exc

    def operational(text):
        return sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception(text))

    assert storage_lib.is_schema_race(operational("table studies already exists"))
    assert storage_lib.is_schema_race(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("x")))
    assert not storage_lib.is_schema_race(operational("unable to open database file"))
    assert not storage_lib.is_schema_race(ValueError("bad url"))


def test_launchers_started_together_on_a_new_sqlite_folder_all_run(tmp_path):
    """Every launcher of a new folder creates Optuna's tables; the losers of that race must open
    them, not stop with a wrong 'cannot be opened' (seen in 2 of 5 tries before)."""
    import subprocess
    import sys
    from pathlib import Path

    import optuna

    root = Path(__file__).resolve().parents[1]
    for round_ in range(3):
        ckpt = tmp_path / f"new folder {round_}"
        procs = [subprocess.Popen(
            [sys.executable, str(root / "parallel_search.py"), "--objective",
             f"{root / 'tests' / 'objectives' / 'sleepy.py'}:objective", "--checkpoint_dir",
             str(ckpt), "--n_trials", "3", "--cpu_workers", "1", "--no_summary"],
            env={**os.environ, "SLEEPY_SECONDS": "0.2"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for _ in range(3)]
        for proc in procs:
            out = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, out
        study = optuna.load_study(study_name="writer_id_search",
                                  storage=f"sqlite:///{ckpt / 'optuna_study.db'}")
        assert sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials) == 3
