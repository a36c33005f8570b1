"""A database password never leaves the process that needs it: a real PostgreSQL role with a
password and scram-sha-256 authentication, a search run with it, and a scan of the console, of
every file under the checkpoint folder, of the study and of every process's command line sampled
while the search runs."""
import threading
import time
import uuid
from pathlib import Path

import optuna
import psycopg
import pytest
from optuna.trial import TrialState

from psearch.engine import storage as storage_lib, urls

from launcher_runs import by_state, trials

PASSWORD = f"Pw-{uuid.uuid4().hex[:12]}-secret"


@pytest.fixture
def password_db(postgres_server, postgres_url):
    """(URL with the password, URL without it): a role that must log in with its password."""
    role = f"searcher_{uuid.uuid4().hex[:8]}"
    dbname = postgres_url.rsplit("/", 1)[1]
    admin = dict(host=postgres_server.host, port=postgres_server.port, user="postgres",
                 autocommit=True)
    with psycopg.connect(dbname="postgres", **admin) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        conn.execute(f'ALTER DATABASE "{dbname}" OWNER TO {role}')
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        original = hba.read_text()
        hba.write_text(f"host all {role} {postgres_server.host}/32 scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
    bare = f"postgresql://{role}@{postgres_server.host}:{postgres_server.port}/{dbname}"
    try:
        yield bare.replace(f"{role}@", f"{role}:{PASSWORD}@"), bare
    finally:
        hba.write_text(original)
        with psycopg.connect(dbname="postgres", **admin) as conn:
            conn.execute("SELECT pg_reload_conf()")


def test_the_role_really_needs_its_password(password_db, monkeypatch):
    with_password, bare = password_db
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    with pytest.raises(storage_lib.UsageError, match="password") as refused:
        storage_lib.make_storage(bare)
    assert PASSWORD not in str(refused.value)
    storage_lib.make_storage(with_password)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # libpq's own way: a URL without the password
    optuna.create_study(study_name="via_pgpassword", storage=storage_lib.make_storage(bare))


class CmdlineSampler:
    """Reads the command line of every process on the machine every few milliseconds."""

    def __init__(self, secret: bytes):
        self.secret, self.samples, self.leaks = secret, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        line = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if self.secret in line:
                        self.leaks.append(line.replace(b"\0", b" ").decode(errors="replace"))
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("given_as", ["url", "env"])
def test_a_search_with_a_password_shows_it_nowhere(tmp_path, runs, password_db, given_as):
    with_password, _ = password_db
    ckpt = tmp_path / "search"
    storage, env = ((with_password, {}) if given_as == "url" else
                    ("env:OPTUNA_STORAGE", {"OPTUNA_STORAGE": with_password}))
    with CmdlineSampler(PASSWORD.encode()) as sampler:
        run = runs(ckpt, ["--cpu_workers", "2", "--n_trials", "4", "--storage", storage],
                   sleep=1, env=env, summary=True)
        # The launcher itself was started with the password in its argv (given_as == "url"):
        # it hides it first thing; what a sampler may see is the interpreter's start-up only.
        time.sleep(0.5)
        launcher_start = len(sampler.leaks)
        assert run.wait(120) == 0, run.output()
    assert sampler.samples > 50
    assert sampler.leaks[launcher_start:] == [], sampler.leaks  # never a worker, never later
    assert all("parallel_search.py" in leak for leak in sampler.leaks), sampler.leaks
    if given_as == "env":
        assert sampler.leaks == []
    console = run.output()
    assert PASSWORD not in console
    assert "searcher_" in console and ":***@" in console  # the banner names the study, redacted
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert any(p.name == "report.md" for p in files) and any(p.suffix == ".log" for p in files)
    leaking = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert leaking == []
    study = optuna.load_study(study_name="writer_id_search",
                              storage=storage_lib.make_storage(with_password))
    ts = trials(storage=urls.driver_url(with_password))
    assert len(by_state(ts, TrialState.COMPLETE)) == 4
    stored = repr(study.user_attrs) + repr([(t.user_attrs, t.system_attrs) for t in ts])
    assert PASSWORD not in stored
