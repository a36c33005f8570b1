"""The synthetic data set: layout, messiness, determinism, and writers separable by style."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from psearch.engine.errors import UsageError
from psearch.writer_id import data_index, image_cache, synthetic

REPO = Path(__file__).resolve().parents[1]


def test_default_layout_and_images(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "d", writers=3, pages_per_writer=6,
                                    lines_per_page=4, height=48)
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val"]
    index = data_index.index_dataset(str(root))
    assert index.writers == ("writer_00", "writer_01", "writer_02") and not index.notes
    assert {s: len(r) for s, r in index.splits.items()} == {"train": 36, "val": 24, "test": 12}
    for record in index.splits["val"]:
        with Image.open(record.path) as img:
            pixels = np.asarray(img)
        assert img.mode == "L" and pixels.shape[0] == 48
        assert 300 * 48 // 64 <= pixels.shape[1] <= 900 * 48 // 64
        assert np.median(pixels) > 170 and pixels.min() < 110   # dark ink on light paper


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    kwargs = dict(writers=2, pages_per_writer=2, lines_per_page=2)
    a = synthetic.make_synthetic(tmp_path / "a", seed=1, **kwargs)
    b = synthetic.make_synthetic(tmp_path / "b", seed=1, **kwargs)
    c = synthetic.make_synthetic(tmp_path / "c", seed=2, **kwargs)
    rel = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert rel == sorted(p.relative_to(b) for p in b.rglob("*.png")) and len(rel) == 8
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in rel)
    assert not any((a / r).read_bytes() == (c / r).read_bytes() for r in rel)


def test_mess_has_what_real_data_has(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "m", writers=8, pages_per_writer=4,
                                    lines_per_page=4, mess=True)
    index = data_index.index_dataset(str(root))
    assert "Writer 03 (Ibn Muqla)" in index.writers and "kātib, al-" in index.writers
    assert len(index.writers) == 8
    records = [r for recs in index.splits.values() for r in recs]
    assert any(r.page.count("/") == 3 for r in records)                  # a book level
    suffixes = Counter(Path(r.path).suffix for r in records)
    assert {".png", ".PNG", ".jpg", ".JPEG", ".tif"} <= set(suffixes)
    modes = set()
    for r in records:
        try:
            with Image.open(r.path) as img:
                modes.add(img.mode)
        except OSError:
            pass
    assert {"L", "RGB", "RGBA", "I;16"} <= modes
    assert any("page_empty" in n for n in index.notes)
    corrupt = [r.path for r in records if Path(r.path).name in ("line_900.png", "line_901.png")]
    sizes = sorted(Path(p).stat().st_size for p in corrupt)
    assert len(corrupt) == 2 and sizes[0] == 0 < sizes[1]               # zero-byte and truncated
    cache = image_cache.build_or_load_cache([r.path for r in records], 32, 256, tmp_path / "c")
    assert sorted(p for p, ok in zip(cache.paths, cache.ok) if not ok) == sorted(corrupt)
    assert not any(".thumbnails" in r.path or r.path.endswith(".txt") for r in records)


def test_flat_layout_is_auto_split(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "f", writers=3, pages_per_writer=6,
                                    lines_per_page=2, flat=True)
    assert sorted(p.name for p in root.iterdir()) == ["writer_00", "writer_01", "writer_02"]
    index = data_index.index_dataset(str(root))
    assert {s: len(r) for s, r in index.splits.items()} == {
        "train": 18, "val": 12, "test": 6}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(writers=1), "--writers"), (dict(pages_per_writer=1), "--pages-per-writer"),
    (dict(lines_per_page=0), "--lines-per-page"), (dict(height=8), "--height")])
def test_bad_arguments_are_usage_errors(tmp_path, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        synthetic.make_synthetic(tmp_path / "x", **kwargs)


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        synthetic.make_synthetic(tmp_path)


def style_features(path: str) -> np.ndarray:
    """Crude HOG-like features: gradient orientations, vertical ink profile, gray histogram."""
    with Image.open(path) as img:
        a = image_cache.preprocess(img, 32, 384).astype(np.float32) / 255
    gy, gx = np.gradient(a)
    angle = (np.arctan2(gy, gx) % np.pi) / np.pi * 8
    hog = np.bincount(angle.astype(int).clip(0, 7).ravel(), weights=np.hypot(gx, gy).ravel(),
                      minlength=8)
    profile = (a < 0.6).mean(axis=1)
    hist = np.histogram(a, bins=8, range=(0, 1))[0]
    return np.concatenate([hog / (hog.sum() + 1e-6), profile / (profile.sum() + 1e-6),
                           hist / hist.sum()])


def test_writers_are_separable_by_style(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "s", writers=6, pages_per_writer=4,
                                    lines_per_page=4)
    index = data_index.index_dataset(str(root))

    def xy(split):
        recs = index.splits[split]
        return (np.array([style_features(r.path) for r in recs]),
                np.array([index.writers.index(r.writer) for r in recs]))

    x_train, y_train = xy("train")
    x_eval, y_eval = xy("val")
    accuracy = LogisticRegression(max_iter=2000, C=10).fit(x_train, y_train).score(x_eval, y_eval)
    assert accuracy > 3 / 6   # chance is 1/6


def test_cli_runs_as_a_script(tmp_path):
    out = tmp_path / "cli out"
    run = subprocess.run([sys.executable, "dataset.py", "make-synthetic", str(out), "--writers",
                          "2", "--pages-per-writer", "2", "--lines-per-page", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list(out.rglob("*.png"))) == 4 and "Wrote 2 writers" in run.stderr


def test_similarity_makes_writers_share_one_script(tmp_path):
    own = synthetic.random_style(np.random.default_rng(0))
    script = synthetic.random_style(np.random.default_rng(1))
    mixed = synthetic.shared_script_style(script, own, 0.9, np.random.default_rng(2))
    assert mixed.pen == pytest.approx(0.1 * own.pen + 0.9 * script.pen)
    assert mixed.slant == pytest.approx(0.1 * own.slant + 0.9 * script.slant)
    assert mixed.frequencies.sum() == pytest.approx(1.0)
    # the script's letters, each bent a little in this writer's hand
    assert len(mixed.glyphs) == len(script.glyphs)
    assert all(len(m.strokes) == len(g.strokes) for m, g in zip(mixed.glyphs, script.glyphs))
    assert not np.allclose(mixed.glyphs[0].strokes[0], script.glyphs[0].strokes[0])
    root = synthetic.make_synthetic(tmp_path / "alike", writers=2, pages_per_writer=4,
                                    lines_per_page=1, similarity=0.75)
    assert len(data_index.index_dataset(str(root)).splits["val"]) == 4
    with pytest.raises(UsageError, match="similarity"):
        synthetic.make_synthetic(tmp_path / "bad", writers=2, similarity=1.0)


def test_cli_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["make-synthetic", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--writers", "--pages-per-writer", "--lines-per-page", "--seed", "--height",
                 "--flat", "--mess"):
        assert flag in text
    assert text.count("(default:") >= 7


def test_cli_makes_a_flat_data_set_and_rejects_a_used_folder(tmp_path, capsys):
    out = tmp_path / "flat data"
    assert synthetic.main(["make-synthetic", str(out), "--writers", "3", "--pages-per-writer", "2",
                    "--lines-per-page", "2", "--height", "24", "--flat"]) == 0
    assert not (out / "train").exists() and len(list(out.glob("*/*/*.png"))) == 12
    assert set(data_index.index_dataset(str(out)).splits) == {"train", "val"}  # split by page
    with Image.open(next(out.glob("*/*/*.png"))) as img:
        assert img.size[1] == 24
    assert synthetic.main(["make-synthetic", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
