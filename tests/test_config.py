import argparse

import pytest

from psearch.engine.config import (SearchConfig, add_search_args, child_env, config_from_args,
                                   config_to_argv)
from psearch.engine.urls import redact_url, resolve_storage, url_secrets, without_password
from psearch.engine.errors import UsageError
from psearch.writer_id.builtin import KIND


def build_parser():
    parser = argparse.ArgumentParser()
    add_search_args(parser, KIND)
    return parser


def parse(argv):
    return config_from_args(build_parser().parse_args(argv), KIND)


def test_argv_round_trip_rebuilds_the_same_config(tmp_path):
    data = tmp_path / "data with space"
    data.mkdir()
    cfg = parse(["--data_root", str(data), "--checkpoint_dir", str(tmp_path / "c"), "--n_trials",
                 "5", "--num_writers_subset", "3", "--models", "small,vit", "--no_pretrained",
                 "--storage", "sqlite:///x.db", "--epochs", "7", "--trial_timeout", "90.5",
                 "--keep_last"])
    argv = config_to_argv(cfg)
    assert "sqlite:///x.db" not in argv  # a URL may hold a password: it goes in the environment
    assert config_from_args(build_parser().parse_args(argv), KIND, environ=child_env(cfg)) == cfg
    assert cfg.options.models == ("small", "vit") and cfg.epochs == 7
    assert cfg.trial_timeout == 90.5 and cfg.keep_last


def test_storage_from_the_environment_and_urls_shown_without_passwords():
    env = {"OPTUNA_STORAGE": "postgresql://ana:s3cr%40t@db.cluster:5432/search"}
    assert resolve_storage("env:OPTUNA_STORAGE", env) == env["OPTUNA_STORAGE"]
    assert resolve_storage("sqlite:///x.db", {}) == "sqlite:///x.db"
    with pytest.raises(UsageError, match="OPTUNA_STORAGE is not set; export OPTUNA_STORAGE="):
        resolve_storage("env:OPTUNA_STORAGE", {})
    with pytest.raises(UsageError, match="not set"):
        resolve_storage("env:", env)
    url = env["OPTUNA_STORAGE"]
    assert redact_url(url) == "postgresql://ana:***@db.cluster:5432/search"
    assert without_password(url) == "postgresql://ana@db.cluster:5432/search"
    assert url_secrets(url) == ["s3cr%40t"]
    query = "postgresql://ana@h/db?sslmode=require&password=pw&x=1"
    assert redact_url(query) == "postgresql://ana@h/db?sslmode=require&password=***&x=1"
    assert without_password(query) == "postgresql://ana@h/db?sslmode=require&x=1"
    assert url_secrets(query) == ["pw"]
    for plain in ("sqlite:////a/b.db", "journal:///x.log", "postgresql://ana@h/db"):
        assert redact_url(plain) == plain and url_secrets(plain) == []
    cfg = SearchConfig(checkpoint_dir="/c", n_trials=1, storage=url)
    assert cfg.to_dict()["storage"] == "postgresql://ana:***@db.cluster:5432/search"


def test_default_storage_is_sqlite_in_the_checkpoint_dir(tmp_path):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=1)
    assert cfg.storage_url == f"sqlite:///{tmp_path.resolve()}/optuna_study.db"


@pytest.mark.parametrize("extra, fragment", [
    (["--n_trials", "0"], "--n_trials must be at least 1, got 0"),
    (["--n_trials", "2", "--models", "small,resnet"], "unknown model 'resnet'"),
    (["--n_trials", "2", "--use_all_writers", "--num_writers_subset", "3"],
     "--use_all_writers conflicts with --num_writers_subset 3"),
    (["--n_trials", "2", "--img_height", "8"], "at least 16 pixels"),
    (["--n_trials", "2", "--num_writers_subset", "1"], "at least 2"),
])
def test_bad_values_are_named(tmp_path, extra, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        parse(["--data_root", str(tmp_path), "--checkpoint_dir", str(tmp_path / "c"), *extra])


def test_missing_data_root_and_bad_objective_spec(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        parse(["--data_root", str(tmp_path / "nope"), "--checkpoint_dir", "c", "--n_trials", "1"])
    with pytest.raises(UsageError, match="not of the form"):
        parse(["--objective", "no_colon", "--checkpoint_dir", "c", "--n_trials", "1"])
    with pytest.raises(UsageError, match="does not exist"):
        parse(["--objective", "missing.py:f", "--checkpoint_dir", "c", "--n_trials", "1"])
