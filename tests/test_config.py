import argparse

import pytest

from config import SearchConfig, UsageError, add_search_args, config_from_args, config_to_argv


def parse(argv):
    parser = argparse.ArgumentParser()
    add_search_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_argv_round_trip_rebuilds_the_same_config(tmp_path):
    data = tmp_path / "data with space"
    data.mkdir()
    cfg = parse(["--data_root", str(data), "--checkpoint_dir", str(tmp_path / "c"), "--n_trials",
                 "5", "--num_writers_subset", "3", "--models", "small,vit", "--no_pretrained",
                 "--storage", "sqlite:///x.db", "--epochs", "7"])
    assert parse(config_to_argv(cfg)) == cfg
    assert cfg.models == ("small", "vit") and cfg.epochs == 7


def test_default_storage_is_sqlite_in_the_checkpoint_dir(tmp_path):
    cfg = SearchConfig(data_root=None, checkpoint_dir=str(tmp_path), n_trials=1)
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
