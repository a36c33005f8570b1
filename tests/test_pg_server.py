"""The throw-away PostgreSQL server: a real Optuna storage for several processes, real locks."""
import subprocess
import sys

import optuna
import sqlalchemy
from optuna.trial import TrialState

OPTIMIZE = ("import sys, optuna\n"
            "optuna.load_study(study_name='shared', storage=sys.argv[1])"
            ".optimize(lambda t: t.suggest_float('x', -1, 1) ** 2, n_trials=3)")


def test_two_processes_fill_one_optuna_study(postgres_url):
    optuna.create_study(study_name="shared", storage=optuna.storages.RDBStorage(postgres_url))
    procs = [subprocess.Popen([sys.executable, "-c", OPTIMIZE, postgres_url],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in trials) == list(range(6))


def test_advisory_xact_lock_is_held_until_commit(postgres_url):
    engine = sqlalchemy.create_engine(postgres_url)
    try_lock = sqlalchemy.text("SELECT pg_try_advisory_xact_lock(42)")
    with engine.connect() as holder, engine.connect() as other:
        holder.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(42)"))
        assert other.execute(try_lock).scalar() is False
        holder.commit()
        assert other.execute(try_lock).scalar() is True
        assert holder.execute(try_lock).scalar() is False   # now the other one holds it
    engine.dispose()
