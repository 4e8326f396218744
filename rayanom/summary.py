"""A scoring run's summary: row accounting and, where the index had labels, image AUROC (scikit-learn).

The summary is the few numbers every scoring run logs and returns; ``report`` is the evaluation written to files
(metrics.json, the figure, pictures) when asked for. The score columns are read through ``scores``; ``Histograms`` is
shared with the report stage.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc

from rayanom.columns import ERROR_COL, LABEL_COL
from rayanom.scores import BATCH_ROWS, count_rows, open_scores, read_score_columns, stream_score_columns

logger = logging.getLogger(__name__)


# Up to this many rows the summary and the report hold the score columns on the driver and compute exactly; above it
# they stream the parts twice and work on histograms of HIST_BINS quantile bins per class, whose AUROC error is
# bounded and reported (``Histograms``).
EXACT_ROWS = 5_000_000
HIST_BINS = 1 << 16
_SAMPLE = 1 << 20  # scores sampled (every k-th row) in the first pass to place the quantile bin edges


def summarize(output: str, exact_rows: int = EXACT_ROWS) -> dict:
    """Counts of scored and failed rows, and the image AUROC on raw scores of all scored rows.

    Failed rows are also counted per kind (``failure_kinds``). The AUROC is None without labels or without both classes;
    rows with a non-finite score are left out of it.

    Up to ``exact_rows`` rows the AUROC is exact (scikit-learn) and ``auroc_error_bound`` is 0; above, it comes from
    ``Histograms`` with the bound on its error, and the driver holds O(``HIST_BINS``) numbers, never a column.
    """
    if count_rows(open_scores(output)) > exact_rows:
        h = Histograms.from_scores(output, require_labels=False)
        summary = {"output": output, "rows": h.rows, "scored": h.scored, "failed": h.rows - h.scored, "auroc": None,
                   "failed_by_kind": failure_kinds(output)}
        if h.labelled:
            n0, n1 = h.counts[:, 0].sum(), h.counts[:, 1].sum()
            auroc, bound = h.auroc()
            if auroc is not None:
                summary.update(auroc=auroc, auroc_error_bound=bound, n_normal=int(n0), n_anomalous=int(n1))
        return summary
    cols = read_score_columns(output, require_labels=False)
    ok, labels = cols["ok"], cols["labels"]
    summary = {"output": output, "rows": int(ok.size), "scored": int(ok.sum()), "failed": int((~ok).sum()),
               "auroc": None, "failed_by_kind": failure_kinds(output)}
    if labels is not None:
        use = ok & np.isfinite(cols["scores"])
        labels, scores = labels[use], cols["scores"][use]
        if np.any(labels == 0) and np.any(labels == 1):
            from sklearn.metrics import roc_auc_score  # imported only here: it is slow to import

            summary["auroc"] = float(roc_auc_score(labels, scores))
            summary["auroc_error_bound"] = 0.0
            summary["n_normal"], summary["n_anomalous"] = int((labels == 0).sum()), int((labels == 1).sum())
    return summary


def failure_kinds(output: str) -> dict[str, int]:
    """Failed rows per kind: the exception type that opens each ``error``, streamed over the failed rows only.

    Kinds are such as ``FileNotFoundError``, ``ValueError``, ``RetriesExhausted``."""
    dataset = open_scores(output)
    if ERROR_COL not in dataset.schema.names:
        return {}
    kinds: dict[str, int] = {}
    for batch in dataset.to_batches(columns=[ERROR_COL], filter=pc.field(ERROR_COL).is_valid(),
                                    batch_size=BATCH_ROWS):
        heads = pc.list_element(pc.split_pattern(batch.column(ERROR_COL), ":", max_splits=1), 0)
        for item in pc.value_counts(heads).to_pylist():
            kinds[item["values"]] = kinds.get(item["values"], 0) + item["counts"]
    return dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


class Histograms:
    """Mergeable per-class score histograms of a scores dataset, built in two streaming passes.

    ``counts[b, label, is_validation]`` counts over bins ``[edges[b], edges[b + 1])`` (the first and last bins
    open-ended).

    Pass 1 reads the score and error columns, counting rows and taking every k-th score (about 2^20 in all, the same
    rows in every run); the bin edges are that sample's quantiles, so each bin holds about 1 / ``bins`` of the scores
    whatever their range. Pass 2 reads score, label, error and split and counts. What it gives:

    * AUROC with ties inside a bin counted as half, and a bound on its error: a pair (normal, anomalous) in the same
      bin contributes 1/2 where the truth is 0, 1/2 or 1, so |AUROC - exact| <= sum_b n0_b n1_b / (2 N0 N1).
    * Counts at a threshold equal to a bin edge are exact (predicted anomalous iff score >= edge), so F1, precision
      and recall at an edge are exact; only the search for the best threshold is restricted to edges.
    """

    def __init__(self, edges: np.ndarray, counts: np.ndarray, rows: int, scored: int, finite: int,
                 labelled: bool) -> None:
        self.edges, self.counts, self.labelled = edges, counts, labelled
        self.rows, self.scored, self.finite = rows, scored, finite  # all rows; scored; scored with a finite score

    @classmethod
    def from_scores(cls, scores_uri: str, require_labels: bool = True, bins: int = HIST_BINS,
                    sample: int = _SAMPLE) -> Histograms:
        dataset = open_scores(scores_uri)
        names = dataset.schema.names
        n = count_rows(dataset)
        stride = max(1, -(-n // sample))
        picked, start = [], 0
        for batch in stream_score_columns(dataset, with_labels=False):
            s, ok = batch["scores"], batch["ok"]
            take = np.arange((-start) % stride, len(s), stride)
            picked.append(s[take][ok[take] & np.isfinite(s[take])])
            start += len(s)
        values = np.concatenate(picked) if picked else np.zeros(0)
        edges = (np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])) if values.size
                 else np.zeros(0))
        counts = np.zeros((edges.size + 1, 2, 2), dtype=np.int64)
        rows = scored = finite = 0
        labelled = LABEL_COL in names
        for batch in stream_score_columns(dataset, with_labels=labelled):
            ok = batch["ok"] & np.isfinite(batch["scores"])
            rows += len(ok)
            scored += int(batch["ok"].sum())
            finite += int(ok.sum())
            if not labelled:
                continue
            labels = batch["labels"]
            bad = ok & (labels != 0) & (labels != 1)
            if bad.any():
                if require_labels:
                    msg = (f"{scores_uri!r}: column 'label' holds {np.unique(labels[bad])[:5].tolist()} on scored "
                           "rows (null shown as -1); allowed values are 0 and 1")
                    raise ValueError(msg)
                labelled = False
                continue
            b = np.searchsorted(edges, batch["scores"][ok], side="right")
            np.add.at(counts, (b, labels[ok], batch["val"][ok].astype(np.int64)), 1)
        if require_labels and not labelled:
            msg = f"evaluation needs a {LABEL_COL!r} column; {scores_uri!r} has columns {names}"
            raise ValueError(msg)
        return cls(edges, counts if labelled else np.zeros_like(counts), rows, scored, finite, labelled)

    def select(self, validation: bool | None) -> np.ndarray:
        """(bins, 2) counts per label of the validation rows, the other rows, or (None) all rows."""
        return self.counts.sum(axis=2) if validation is None else self.counts[:, :, int(validation)]

    def auroc(self, validation: bool | None = None) -> tuple[float | None, float]:
        """AUROC of the selected rows and the bound on its error (None, 0 without both classes)."""
        c = self.select(validation).astype(np.float64)
        n0, n1 = c[:, 0].sum(), c[:, 1].sum()
        if not n0 or not n1:
            return None, 0.0
        below = np.cumsum(c[:, 0]) - c[:, 0]  # normals in lower bins
        auc = float((c[:, 1] * (below + 0.5 * c[:, 0])).sum() / (n0 * n1))
        return auc, float((c[:, 0] * c[:, 1]).sum() / (2 * n0 * n1))

    def at_edges(self, validation: bool | None = None) -> dict[str, np.ndarray]:
        """Exact true/false positives and negatives when predicting anomalous iff score >= ``edges[i]``."""
        c = self.select(validation)
        tp = np.cumsum(c[::-1, 1])[::-1][1:]  # rows in bins above edge i
        fp = np.cumsum(c[::-1, 0])[::-1][1:]
        return {"threshold": self.edges, "tp": tp, "fp": fp, "fn": c[:, 1].sum() - tp, "tn": c[:, 0].sum() - fp}
