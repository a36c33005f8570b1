"""Page-retrieval and classification metrics against hand-computed values and scikit-learn."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from psearch.writer_id import metrics


def unit(deg: float) -> list[float]:
    """A 2-D unit vector at `deg` degrees: cosine similarity then orders pages by angle."""
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_hand_computed_retrieval_three_writers_and_a_distractor():
    # Angles: A1 0, A2 10, B1 90, B2 100, C1 40, C2 210, D 300 (D has one page: a distractor only).
    # Rankings by angular distance (others only):
    #   A1: A2 10, C1 40, B1 90, ...                -> top1 hit, AP 1
    #   A2: A1 10, ...                             -> top1 hit, AP 1
    #   B1: B2 10, ...                             -> top1 hit, AP 1
    #   B2: B1 10, ...                             -> top1 hit, AP 1
    #   C1: A2 30, A1 40, B1 50, B2 60, D 100, C2 170 -> C2 at rank 6: top1 0, top5 0, AP 1/6
    #   C2: D 90, B2 110, B1 120, A1 150, A2 160, C1 170 -> C1 at rank 6: top1 0, top5 0, AP 1/6
    # Macro over writers A, B, C (D is no query): top1 = top5 = (1+1+0)/3, mAP = (1+1+1/6)/3.
    desc = np.array([unit(a) for a in (0, 10, 90, 100, 40, 210, 300)])
    writers = np.array(["A", "A", "B", "B", "C", "C", "D"])
    got = metrics.retrieval_metrics(desc, writers)
    assert got["top1"] == pytest.approx(2 / 3)
    assert got["top5"] == pytest.approx(2 / 3)
    assert got["map"] == pytest.approx(13 / 18)


def test_top5_counts_a_hit_at_rank_five():
    # Query A1 at 0: B pages at 1.5, 2, 3, 3.5 degrees, A2 at 5 -> A2 is 5th: top1 0, top5 1.
    # A2 at 5: the B pages come first, A1 is 5th -> same. Each B page has a B page 0.5 degrees
    # away and everything else farther: top1 1. Macro top1 (0 + 1) / 2.
    desc = np.array([unit(a) for a in (0, 5, 1.5, 2, 3, 3.5)])
    writers = np.array(["A", "A", "B", "B", "B", "B"])
    got = metrics.retrieval_metrics(desc, writers)
    assert got["top1"] == pytest.approx(0.5)
    assert got["top5"] == pytest.approx(1.0)
    assert got["map"] < 1.0


def test_duplicate_of_another_writer_is_not_taken_for_self():
    # B1 and A1 are identical. Query A1 ranks B1 (similarity 1) before A2 (similarity 0): top1 0,
    # AP 1/2. Query A2 ties B1 and A1 at 0; the stable order puts B1 (index 0) first: AP 1/2.
    # B1 has no other B page, so it is no query. Dropping "the first position" instead of the
    # query itself would remove B1 from A1's ranking and count A1 as its own hit.
    desc = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    writers = np.array(["B", "A", "A"])
    got = metrics.retrieval_metrics(desc, writers)
    assert got["top1"] == 0.0
    assert got["map"] == pytest.approx(0.5)


def test_macro_average_over_writers_with_unequal_page_counts():
    # A: three pages at 0, 5, 10 degrees, each finds another A page first (top1 1 each).
    # B: pages at 60 and 120; the single-page writer C at 90 is nearer to both (30 degrees):
    # top1 0 each. Macro: (1 + 0) / 2 = 0.5, whereas a mean over the 5 queries would give 0.6.
    desc = np.array([unit(a) for a in (0, 5, 10, 60, 120, 90)])
    writers = np.array(["A", "A", "A", "B", "B", "C"])
    assert metrics.retrieval_metrics(desc, writers)["top1"] == pytest.approx(0.5)


def test_perfect_retrieval_and_nan_without_queries():
    desc = np.array([unit(a) for a in (0, 1, 90, 91, 180, 181)])
    writers = np.array([0, 0, 1, 1, 2, 2])
    assert metrics.retrieval_metrics(desc, writers) == {"top1": 1.0, "top5": 1.0, "map": 1.0}
    lonely = metrics.retrieval_metrics(desc, np.arange(6))  # every writer has one page
    assert all(math.isnan(v) for v in lonely.values())
    assert all(math.isnan(v) for v in metrics.retrieval_metrics(desc[:1], writers[:1]).values())


def test_average_precision_by_hand():
    assert metrics.average_precision(np.array([True, False, False])) == 1.0
    assert metrics.average_precision(np.array([True, True, False, False])) == 1.0
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert metrics.average_precision(np.array([True, False, True, False])) == pytest.approx(5 / 6)
    # Worst ranking, hits at ranks 4 and 5: (1/4 + 2/5) / 2.
    assert metrics.average_precision(np.array([0, 0, 0, 1, 1])) == pytest.approx(0.325)
    assert math.isnan(metrics.average_precision(np.zeros(4, dtype=bool)))


def test_average_precision_matches_sklearn_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        relevance = rng.random(n) < rng.uniform(0.05, 0.9)
        relevance[rng.integers(n)] = True  # at least one relevant item
        scores = rng.permutation(n).astype(float)  # distinct scores: no ties
        ranked = relevance[np.argsort(-scores)]
        assert metrics.average_precision(ranked) == pytest.approx(
            average_precision_score(relevance, scores))


def test_page_descriptors_average_normalised_lines():
    # Page 7 has a long and a short line pointing at 0 and 90 degrees: normalising lines first
    # gives them equal weight, so the descriptor points at 45 degrees.
    emb = np.array([[10.0, 0.0], [0.0, 0.1], [3.0, 4.0]])
    ids, desc = metrics.page_descriptors(emb, np.array([7, 7, 2]))
    assert ids.tolist() == [2, 7]
    np.testing.assert_allclose(desc, [[0.6, 0.8], unit(45)], atol=1e-12)


def test_classification_metrics_by_hand():
    # Page 0 (writer 0): line logits [5,0], [0,.5], [0,.5] -> line predictions 0,1,1 (1 of 3
    # right). Mean softmax: (0.9933 + 2 * 0.3775) / 3 = 0.583 for writer 0, so the page is right
    # although a majority vote of its lines would be wrong. Page 1 (writer 1): [0,1] -> right.
    logits = np.array([[5.0, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 1.0]])
    got = metrics.classification_metrics(logits, np.array([0, 0, 0, 1]), np.array([0, 0, 0, 1]))
    assert got == {"line_acc": 0.5, "page_cls_acc": 1.0}
    with pytest.raises(ValueError):
        metrics.classification_metrics(logits, np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1]))


def test_evaluate_embeddings_combines_both():
    rng = np.random.default_rng(1)
    page_ids = np.repeat(np.arange(6), 3)  # 6 pages of 3 lines, writers 0,0,1,1,2,2
    labels = page_ids // 2
    centres = np.eye(3)[labels]
    emb = centres + 0.05 * rng.normal(size=(18, 3))
    got = metrics.evaluate_embeddings(emb, 4 * centres, labels, page_ids)
    assert got == {"page_top1": 1.0, "page_top5": 1.0, "page_map": 1.0, "line_acc": 1.0,
                   "page_cls_acc": 1.0}
