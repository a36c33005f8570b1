"""The trial value's definitions and its interval, with plain arrays."""
import numpy as np
import pytest

from psearch.writer_id import trial_value
from psearch.writer_id.names import DEFAULT_TRIAL_VALUE, TRIAL_VALUES
from psearch.writer_id.trial_value import DEFINITIONS, bootstrap_interval, get, trailing_mean

# The demo's defect: a lucky first epoch, a fall, a slow recovery.
SPIKE_TOP1 = np.array([0.5, 0.25, 0.0, 0.25, 0.25, 0.25])
SPIKE_MAP = np.array([0.55, 0.40, 0.30, 0.42, 0.45, 0.47])


def test_every_named_value_is_defined_and_the_default_is_one_of_them():
    assert set(TRIAL_VALUES) == set(DEFINITIONS)
    assert DEFAULT_TRIAL_VALUE in DEFINITIONS
    with pytest.raises(KeyError, match="choose from"):
        get("top1_max")


def test_a_first_epoch_spike_carries_the_old_value_but_not_the_smoothed_one():
    assert get("top1_best").choose(SPIKE_TOP1, SPIKE_MAP) == (0.5, 0)
    value, epoch = get("map_smooth3").choose(SPIKE_TOP1, SPIKE_MAP)
    # epochs 1-2 have no full window; the best full window is epochs 4-6
    assert epoch == 5 and value == pytest.approx(np.mean([0.42, 0.45, 0.47]))
    assert get("map_last3").choose(SPIKE_TOP1, SPIKE_MAP) == (pytest.approx(value), 5)


def test_top1_ties_are_broken_by_map_then_by_the_earlier_epoch():
    top1 = np.array([0.5, 0.5, 0.5])
    assert get("top1_best").choose(top1, np.array([0.3, 0.6, 0.6])) == (0.5, 1)


def test_a_trial_shorter_than_the_window_keeps_its_last_epoch():
    assert get("map_smooth3").choose(np.array([0.9, 0.1]), np.array([0.8, 0.2])) == (
        pytest.approx(0.5), 1)
    assert get("map_smooth3").choose(np.array([]), np.array([])) == (
        pytest.approx(float("nan"), nan_ok=True), -1)


def test_trailing_mean_skips_nan_and_passes_extra_axes_through():
    assert list(trailing_mean(np.array([1.0, np.nan, 3.0, 5.0]), 3)) == [1.0, 1.0, 2.0, 4.0]
    two = trailing_mean(np.array([[1.0, 2.0], [3.0, 4.0]]), 2)
    assert two.tolist() == [[1.0, 2.0], [2.0, 3.0]]


def queries(n_writers, pages, rng, epochs=4, skill=0.6):
    """Per-query top-1 hits and APs of `epochs` epochs on n_writers x pages query pages."""
    q = n_writers * pages
    top1 = (rng.random((epochs, q)) < skill).astype(float)
    ap = np.clip(skill + 0.2 * rng.standard_normal((epochs, q)), 0, 1)
    return top1, ap, np.repeat(np.arange(n_writers), pages)


def test_the_interval_holds_the_value_and_narrows_with_more_pages():
    rng = np.random.default_rng(0)
    widths = []
    for pages in (2, 20):
        top1, ap, writers = queries(8, pages, rng)
        d = get("map_smooth3")
        value, _ = d.choose(top1.mean(axis=1), ap.mean(axis=1))  # one page each: macro = mean
        low, high = bootstrap_interval(d, top1, ap, writers)
        assert low <= value <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 1.5


def test_the_interval_is_repeatable_and_empty_without_queries():
    rng = np.random.default_rng(1)
    top1, ap, writers = queries(4, 3, rng)
    d = get("top1_best")
    assert bootstrap_interval(d, top1, ap, writers, seed=5) == \
        bootstrap_interval(d, top1, ap, writers, seed=5)
    nan = bootstrap_interval(d, np.zeros((0, 0)), np.zeros((0, 0)), [])
    assert all(np.isnan(nan))


def test_pages_that_all_agree_leave_no_doubt():
    top1 = np.ones((3, 12))
    ap = np.full((3, 12), 0.75)
    for name in DEFINITIONS:
        low, high = bootstrap_interval(get(name), top1, ap, np.repeat(np.arange(4), 3))
        value, _ = get(name).choose(top1.mean(axis=1), ap.mean(axis=1))
        assert low == pytest.approx(value) and high == pytest.approx(value)


def test_the_interval_counts_the_pick_of_the_best_epoch():
    """Max over noisy epochs: resampling must redo the max, so a flat curve of pure noise gets
    an interval above the mean of its epochs (the selection's bias shows)."""
    rng = np.random.default_rng(2)
    top1 = (rng.random((10, 40)) < 0.5).astype(float)
    ap = rng.random((10, 40))
    low, high = bootstrap_interval(get("top1_best"), top1, ap, np.repeat(np.arange(10), 4))
    assert low > 0.5 - 0.05 and high > 0.5
    assert trial_value.resampled_values(get("top1_best"), top1.mean(axis=1)[:, None],
                                        ap.mean(axis=1)[:, None]).shape == (1,)


def test_training_streams_the_same_pick_and_counts_epochs_without_a_better_score():
    """What Trainer decides epoch by epoch (train.advance) is what the definition decides on the
    whole curve; early stopping counts the epochs since the score last improved."""
    from psearch.writer_id.train import FitState, advance

    for name, definition in DEFINITIONS.items():
        state = FitState()
        for epoch, (top1, mean_ap) in enumerate(zip(SPIKE_TOP1, SPIKE_MAP), start=1):
            row = {"epoch": epoch, "val_page_top1": top1, "val_page_map": mean_ap,
                   "val_page_top5": 1.0, "val_line_acc": 0.5, "val_page_cls_acc": 0.5}
            advance(definition, state, row)
            state.history.append(row)
            state.epoch = epoch
            value, idx = definition.choose(SPIKE_TOP1[:epoch], SPIKE_MAP[:epoch])
            assert state.best_epoch == idx + 1, (name, epoch)
            assert state.best["value"] == pytest.approx(value), (name, epoch)
    state = FitState()
    falling = [0.9, 0.8, 0.7, 0.6, 0.5]
    for epoch, v in enumerate(falling, start=1):
        row = {"epoch": epoch, "val_page_top1": v, "val_page_map": v, "val_page_top5": 1.0,
               "val_line_acc": 0.5, "val_page_cls_acc": 0.5}
        advance(get("map_smooth3"), state, row)
        state.history.append(row)
    # epochs 1-2 have no full window; epoch 3 is the first best, 4 and 5 are worse
    assert (state.best_epoch, state.bad_epochs) == (3, 2)
