"""Every setting stored with a built-in study is enforced: a rerun of a finished search with one of
them changed exits 2 with an `error:` line naming it and leaves the study file as it was. (A
setting left out of `study.search_settings` would let a rerun mix trials whose values mean
different things.) One tiny real search; each refusal stops before training, so it is quick."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from psearch.writer_id.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
# 4 writers, 1 trial of 1 epoch of the small model: what the first run stores.
FLAGS = ["--n_trials", "1", "--epochs", "1", "--models", "small", "--img_height", "32",
         "--img_width", "256", "--batch_size", "8", "--lines_per_writer", "16",
         "--num_workers", "0"]


def search(data: Path, ckpt: Path, *changed: str) -> subprocess.CompletedProcess:
    """The search command line, FLAGS overridden by `changed` (argparse keeps the last value)."""
    return subprocess.run([sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"),
                           "--data_root", str(data), "--checkpoint_dir", str(ckpt), *FLAGS,
                           *changed], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The data root, the checkpoint folder of a finished one-trial search on it, and a copy of
    the same data elsewhere."""
    root = tmp_path_factory.mktemp("refusal")
    data = make_synthetic(root / "data", writers=4, pages_per_writer=6, lines_per_page=4,
                          height=32)
    done = search(data, root / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    return data, root / "run", shutil.copytree(data, root / "same data elsewhere")


DATA_COPY = "<the same data elsewhere>"  # stands for the fixture's copy in CHANGES
# Each setting of study.search_settings, changed alone: the rerun's flags, and what its error line
# must say.
CHANGES = {
    "objective": (["--objective", f"{ROOT / 'tests' / 'objectives' / 'sleepy.py'}:objective"],
                  "objective: stored 'builtin:writer_identification'"),
    "data_root": (["--data_root", DATA_COPY], "data_root: stored"),
    "writers": (["--num_writers_subset", "3"], "writers: stored '4 values"),
    "img_height": (["--img_height", "48"], "img_height: stored 32, now 48"),
    "img_width": (["--img_width", "320"], "img_width: stored 256, now 320"),
    "epochs": (["--epochs", "2"], "epochs: stored 1, now 2"),
    # --no_pretrained: the refusal must not depend on convnext's downloaded weights
    "models": (["--models", "small,convnext", "--no_pretrained"],
               "models: stored ['small'], now ['small', 'convnext']"),
    "max_val_pages_per_writer": (["--max_val_pages_per_writer", "1"],
                                 "max_val_pages_per_writer: stored 20, now 1"),
    "trial_value": (["--trial_value", "map_last3"],
                    "trial_value: stored 'map_smooth3', now 'map_last3'"),
    "direction": (["--direction", "minimize"], "set to maximize, not --direction minimize"),
}


@pytest.mark.parametrize("changed, says", CHANGES.values(), ids=list(CHANGES))
def test_a_rerun_with_one_setting_changed_is_refused_and_changes_nothing(finished, changed,
                                                                         says):
    data, ckpt, data_copy = finished
    study = ckpt / "optuna_study.db"
    before = study.read_bytes()
    refused = search(data, ckpt, *(str(data_copy) if a == DATA_COPY else a for a in changed))
    assert refused.returncode == 2, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and says in error, error
    assert study.read_bytes() == before
