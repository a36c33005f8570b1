"""Page-level writer retrieval and classification metrics (pure numpy).

Retrieval follows the writer-identification literature: each page is described by the mean of
its lines' L2-normalised embeddings, pages are ranked by cosine similarity, and every page whose
writer has another page is a query against all other pages (leave-one-out).
"""
from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def page_descriptors(line_embeddings: np.ndarray, line_page_ids: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique page ids, [P,E] mean of each page's L2-normalised lines, re-normalised)."""
    emb = _l2_normalise(line_embeddings)
    page_ids, inverse = np.unique(np.asarray(line_page_ids), return_inverse=True)
    sums = np.zeros((len(page_ids), emb.shape[1]))
    np.add.at(sums, inverse.ravel(), emb)
    # The sum points the same way as the mean; normalising it gives the mean's direction.
    return page_ids, _l2_normalise(sums)


def average_precision(relevant_in_rank_order: np.ndarray) -> float:
    """AP of one ranking (bool, best first): mean precision at each relevant rank; NaN if none."""
    rel = np.asarray(relevant_in_rank_order, dtype=bool)
    hits = np.flatnonzero(rel)
    if hits.size == 0:
        return float("nan")
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))


def _rankings(descriptors: np.ndarray) -> np.ndarray:
    """[P, P-1] gallery indices per query, most similar first, the query itself left out."""
    d = _l2_normalise(descriptors)
    sim = d @ d.T
    # Stable sort: equal similarities keep gallery order, so results are deterministic.
    order = np.argsort(-sim, axis=1, kind="stable")
    # Leave the query out by identity, wherever it sorted (a duplicate page may tie with it).
    not_self = order != np.arange(len(d))[:, None]
    return order[not_self].reshape(len(d), len(d) - 1)


def _macro_mean(values: np.ndarray, writers: np.ndarray) -> float:
    """Mean over each writer's queries, then over writers (a prolific writer counts once)."""
    per_writer = [values[writers == w].mean() for w in np.unique(writers)]
    return float(np.mean(per_writer)) if per_writer else float("nan")


def retrieval_queries(descriptors: np.ndarray, page_writers: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out page retrieval per query: (query page indices, their writers, top-1 hit
    0/1, top-5 hit 0/1, average precision) - empty when no page has another of its writer."""
    writers = np.asarray(page_writers)
    if len(writers) != len(descriptors):
        raise ValueError(f"{len(descriptors)} page descriptors but {len(writers)} page writers")
    if len(writers) < 2:
        empty = np.zeros(0)
        return np.zeros(0, dtype=int), writers[:0], empty, empty, empty
    ranked = _rankings(descriptors)
    relevant = writers[ranked] == writers[:, None]
    queries = np.flatnonzero(relevant.any(axis=1))
    rel = relevant[queries]
    ap = np.array([average_precision(r) for r in rel], dtype=float)
    return (queries, writers[queries], rel[:, 0].astype(float),
            rel[:, :5].any(axis=1).astype(float), ap)


def retrieval_metrics(descriptors: np.ndarray, page_writers: np.ndarray) -> dict[str, float]:
    """Leave-one-out page retrieval {"top1", "top5", "map"}, macro-averaged over writers.

    Queries whose writer has no other page are left out (they stay in the gallery as
    distractors); NaN when no query is left.
    """
    _, qw, top1, top5, ap = retrieval_queries(descriptors, page_writers)
    if len(qw) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "map": float("nan")}
    return {"top1": _macro_mean(top1, qw), "top5": _macro_mean(top5, qw),
            "map": _macro_mean(ap, qw)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # avoid overflow in exp
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(line_logits: np.ndarray, line_labels: np.ndarray,
                           line_page_ids: np.ndarray) -> dict[str, float]:
    """{"line_acc", "page_cls_acc"}: a page predicts the argmax of its lines' mean softmax."""
    logits = np.asarray(line_logits, dtype=np.float64)
    labels = np.asarray(line_labels)
    if len(labels) == 0:
        return {"line_acc": float("nan"), "page_cls_acc": float("nan")}
    line_acc = float(np.mean(logits.argmax(axis=1) == labels))
    _, inverse, counts = np.unique(np.asarray(line_page_ids), return_inverse=True,
                                   return_counts=True)
    inverse = inverse.ravel()
    probs = np.zeros((len(counts), logits.shape[1]))
    np.add.at(probs, inverse, _softmax(logits))
    page_labels = np.empty(len(counts), dtype=labels.dtype)
    page_labels[inverse] = labels
    if np.any(page_labels[inverse] != labels):
        raise ValueError("lines of one page carry different writer labels")
    # The sum over lines has the same argmax as the mean.
    page_acc = float(np.mean(probs.argmax(axis=1) == page_labels))
    return {"line_acc": line_acc, "page_cls_acc": page_acc}


def evaluate_embeddings(line_embeddings: np.ndarray, line_logits: np.ndarray,
                        line_labels: np.ndarray, line_page_ids: np.ndarray,
                        queries: dict | None = None) -> dict[str, float]:
    """All validation metrics of one pass: page retrieval from embeddings plus classification.
    `queries`, when given, receives the per-query figures ("page_ids", "writers", "top1", "ap")
    that the trial value's interval resamples."""
    page_ids, descriptors = page_descriptors(line_embeddings, line_page_ids)
    labels = np.asarray(line_labels)
    # np.unique's sorted order matches page_descriptors': take each page's label from any line.
    _, first_line = np.unique(np.asarray(line_page_ids), return_index=True)
    idx, qw, top1, top5, ap = retrieval_queries(descriptors, labels[first_line])
    if queries is not None:
        queries.update(page_ids=page_ids[idx], writers=qw, top1=top1, ap=ap)
    nan = float("nan")
    retrieval = ({"page_top1": _macro_mean(top1, qw), "page_top5": _macro_mean(top5, qw),
                  "page_map": _macro_mean(ap, qw)} if len(qw) else
                 {"page_top1": nan, "page_top5": nan, "page_map": nan})
    return {**retrieval, **classification_metrics(line_logits, line_labels, line_page_ids)}
