"""Two scoring runs compared: how far a new model, new weights or next month's data moved the decisions.

Given two scores directories, ``compare_runs`` reports

* **per image** (the images both runs scored, joined on ``row_index`` when both come from the same index, that is
  their manifests' index fingerprints agree, else on ``path``): Spearman's rank correlation of the two
  ``anomaly_score`` columns, the decisions flipped (``is_anomalous`` differs, both ways counted) and the flipped images
  that moved most (by the change of ``normalized_score``, else of the score's rank);
* **per defect type** (each run's scored rows, joined or not, so it also measures drift between production batches
  of different images): the shift of the ``normalized_score`` distribution (``anomaly_score`` where a run has no
  threshold) as the two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``) and the change of
  the median.

Memory stays bounded whatever the number of rows: the parts are streamed (a million rows at a time; the row_index join
reads the same row range of both runs), flips are counted exactly over every joined row, the most-moved flips are a
bounded heap, and Spearman and KS use a uniform sample of at most ``SAMPLE`` rows per run (every k-th row, the same
rows in every run; exact below that size). The sampling error of Spearman's rho is about 1 / sqrt(sample) and that of
a KS statistic about 1.36 / sqrt(rows of the type in the sample) at 95 %, both stated in the output. A ``path`` join
holds both runs' paths and scores (up to ``summary.EXACT_ROWS`` rows; more is refused, naming the limit).
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from rayanom.columns import DECISION_COL, DEFECT_COL, ERROR_COL, NORMALIZED_COL, PATH_COL, ROW_COL, SCORE_COL
from rayanom.config import UserError
from rayanom.parts import read_manifest
from rayanom.report import png_bytes
from rayanom.scores import count_rows, open_scores, score_values
from rayanom.storage import read_bytes, resolve_filesystem
from rayanom.summary import EXACT_ROWS

logger = logging.getLogger(__name__)

SAMPLE = 1 << 20  # rows per run sampled for Spearman and KS
CHUNK = 1 << 20  # rows read at a time
COMPARE_FILE, FIGURE_FILE = "compare.json", "compare.png"
_COLUMNS = (ROW_COL, PATH_COL, SCORE_COL, ERROR_COL, DECISION_COL, NORMALIZED_COL, DEFECT_COL)


def _read(dataset, lo: int | None = None, hi: int | None = None) -> dict[str, np.ndarray]:
    """The comparison's columns as numpy, sorted by ``row_index`` (rows ``lo <= row_index < hi`` when given).

    The columns: score (NaN where null or failed), decision (-1 where null), normalized (NaN where null), path, defect
    (None where null)."""
    names = dataset.schema.names
    cols = [c for c in _COLUMNS if c in names]
    where = None if lo is None else (pc.field(ROW_COL) >= lo) & (pc.field(ROW_COL) < hi)
    t = dataset.to_table(columns=cols, filter=where)
    if ROW_COL in names:
        t = t.sort_by(ROW_COL)
    score = score_values(t).copy()
    if ERROR_COL in names:
        score[t.column(ERROR_COL).is_valid().to_numpy(zero_copy_only=False)] = np.nan
    score[~np.isfinite(score)] = np.nan

    def column(name, fill, dtype):
        if name not in names:
            return np.full(t.num_rows, fill, dtype=dtype)
        return pc.fill_null(t.column(name).cast(dtype), fill).to_numpy(zero_copy_only=False)

    return {"row": column(ROW_COL, -1, "int64"), "score": score, "decision": column(DECISION_COL, -1, "int8"),
            "normalized": column(NORMALIZED_COL, np.nan, "float64"),
            "path": np.asarray(t.column(PATH_COL).to_pylist(), dtype=object),
            "defect": np.asarray(t.column(DEFECT_COL).cast("string").to_pylist() if DEFECT_COL in names
                                 else [None] * t.num_rows, dtype=object)}


def _index_fingerprint(uri: str) -> str | None:
    try:
        return read_manifest(uri).get("index")
    except UserError:
        return None


class _Paired:
    """The per-image comparison, accumulated over aligned chunks of the two runs (the same images, in order)."""

    def __init__(self, stride: int, top: int) -> None:
        self.stride, self.top, self.seq = stride, top, 0
        self.counts = {"joined": 0, "scored_in_both": 0, "decided_in_both": 0, "to_anomalous": 0, "to_normal": 0}
        self.heap: list = []
        self.sample: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, a: dict, b: dict, position: np.ndarray) -> None:
        ok = np.isfinite(a["score"]) & np.isfinite(b["score"])
        decided = ok & (a["decision"] >= 0) & (b["decision"] >= 0)
        up, down = decided & (a["decision"] == 0) & (b["decision"] == 1), decided & (a["decision"] == 1) & (
            b["decision"] == 0)
        for key, n in (("joined", ok.size), ("scored_in_both", ok.sum()), ("decided_in_both", decided.sum()),
                       ("to_anomalous", up.sum()), ("to_normal", down.sum())):
            self.counts[key] += int(n)
        moved = np.abs(b["normalized"] - a["normalized"])
        moved = np.where(np.isfinite(moved), moved, np.abs(b["score"] - a["score"]))
        for i in np.flatnonzero(up | down):
            item = {"row_index": int(a["row"][i]), "path": a["path"][i], "defect_type": a["defect"][i],
                    "a": _side(a, i), "b": _side(b, i), "moved": float(moved[i])}
            self.seq += 1
            entry = (item["moved"], -self.seq, item)
            heapq.heappush(self.heap, entry) if len(self.heap) < self.top else heapq.heappushpop(self.heap, entry)
        take = ok & (position % self.stride == 0)
        self.sample.append((a["score"][take], b["score"][take]))

    def result(self) -> dict:
        from scipy.stats import spearmanr

        sa = np.concatenate([s for s, _ in self.sample]) if self.sample else np.zeros(0)
        sb = np.concatenate([s for _, s in self.sample]) if self.sample else np.zeros(0)
        rho = float(spearmanr(sa, sb).statistic) if sa.size > 2 else None
        flips = self.counts["to_anomalous"] + self.counts["to_normal"]
        decided = self.counts["decided_in_both"]
        return {**self.counts, "flipped": flips, "flipped_fraction": flips / decided if decided else None,
                "spearman": rho, "spearman_rows": int(sa.size), "spearman_exact": self.stride == 1,
                "spearman_sampling_error": None if self.stride == 1 or not sa.size else 1 / math.sqrt(sa.size),
                "top_flips": [e[2] for e in sorted(self.heap, key=lambda e: (-e[0], -e[1]))],
                "_sample": (sa, sb)}


def _side(run: dict, i: int) -> dict:
    norm = run["normalized"][i]
    return {"score": float(run["score"][i]), "normalized": None if not np.isfinite(norm) else float(norm),
            "is_anomalous": bool(run["decision"][i])}


def _paired(da, db, join: str, top: int) -> dict:
    """Stream the joined rows of both runs into ``_Paired``."""
    if join == ROW_COL:
        n = max(count_rows(da), count_rows(db))
        acc = _Paired(max(1, -(-n // SAMPLE)), top)
        for lo in range(0, n, CHUNK):
            a, b = _read(da, lo, lo + CHUNK), _read(db, lo, lo + CHUNK)
            if not np.array_equal(a["row"], b["row"]):
                msg = (f"the two runs do not hold the same rows in row_index [{lo}, {lo + CHUNK}) although their "
                       "manifests name the same index (an incomplete run? finish it first)")
                raise UserError(msg)
            acc.add(a, b, a["row"])
        return acc.result()
    for rows in (count_rows(da), count_rows(db)):
        if rows > EXACT_ROWS:
            msg = (f"joining on path holds both runs on the driver, up to {EXACT_ROWS} rows; a run has {rows}: "
                   "compare runs of the same index (joined on row_index, streamed) or split the comparison")
            raise UserError(msg)
    a, b = _read(da), _read(db)
    for name, run in (("first", a), ("second", b)):
        if len(set(run["path"])) != run["path"].size:
            msg = f"the {name} run holds the same path more than once: it cannot be joined on path"
            raise UserError(msg)
    ia = pa.table({PATH_COL: a["path"].tolist(), "i": np.arange(a["path"].size)})
    ib = pa.table({PATH_COL: b["path"].tolist(), "j": np.arange(b["path"].size)})
    joined = ia.join(ib, PATH_COL, join_type="inner").sort_by("i")
    i, j = joined.column("i").to_numpy(), joined.column("j").to_numpy()
    acc = _Paired(max(1, -(-i.size // SAMPLE)), top)
    acc.add({k: v[i] for k, v in a.items()}, {k: v[j] for k, v in b.items()}, np.arange(i.size))
    return acc.result()


def _distribution(dataset) -> dict[str, np.ndarray]:
    """A uniform sample (every k-th row, at most ``SAMPLE``) of one run's scored rows: score, normalized, defect."""
    n = count_rows(dataset)
    stride, start, out = max(1, -(-n // SAMPLE)), 0, []
    names = dataset.schema.names
    for batch in dataset.to_batches(columns=[c for c in (SCORE_COL, ERROR_COL, NORMALIZED_COL, DEFECT_COL)
                                             if c in names], batch_size=CHUNK):
        take = np.arange((-start) % stride, batch.num_rows, stride)
        start += batch.num_rows
        t = pa.Table.from_batches([batch]).take(pa.array(take))
        run = {"score": score_values(t)}
        if ERROR_COL in names:
            run["score"] = np.where(t.column(ERROR_COL).is_valid().to_numpy(zero_copy_only=False), np.nan, run["score"])
        run["normalized"] = (pc.fill_null(t.column(NORMALIZED_COL).cast("float64"), np.nan).to_numpy(
            zero_copy_only=False) if NORMALIZED_COL in names else np.full(t.num_rows, np.nan))
        run["defect"] = np.asarray(t.column(DEFECT_COL).cast("string").to_pylist() if DEFECT_COL in names
                                   else [None] * t.num_rows, dtype=object)
        ok = np.isfinite(run["score"])
        out.append({k: v[ok] for k, v in run.items()})
    return {k: np.concatenate([o[k] for o in out]) if out else np.zeros(0) for k in ("score", "normalized", "defect")}


def _shifts(a: dict, b: dict) -> tuple[str, dict]:
    """KS statistic, p-value and median change of the normalised scores per defect type (and ``(all)``).

    Raw scores are compared where a run has no threshold."""
    from scipy.stats import ks_2samp

    use = NORMALIZED_COL if (a["normalized"].size and b["normalized"].size and np.isfinite(a["normalized"]).all()
                             and np.isfinite(b["normalized"]).all()) else SCORE_COL
    key = "normalized" if use == NORMALIZED_COL else "score"
    out = {}
    types = ["(all)"] + sorted({str(t) for t in np.concatenate([a["defect"], b["defect"]]) if t is not None})
    for t in types:
        va, vb = ((a[key], b[key]) if t == "(all)" else (a[key][a["defect"] == t], b[key][b["defect"] == t]))
        if not va.size or not vb.size:
            out[t] = {"rows_a": int(va.size), "rows_b": int(vb.size), "ks_statistic": None, "ks_pvalue": None}
            continue
        ks = ks_2samp(va, vb)
        out[t] = {"rows_a": int(va.size), "rows_b": int(vb.size), "ks_statistic": float(ks.statistic),
                  "ks_pvalue": float(ks.pvalue), "median_a": float(np.median(va)), "median_b": float(np.median(vb)),
                  "median_change": float(np.median(vb) - np.median(va)),
                  "sampling_error_95": 1.36 * math.sqrt(1 / va.size + 1 / vb.size)}
    return use, out


def compare_runs(a_uri: str, b_uri: str, out_dir: str | None = None, top: int = 16) -> dict:
    """Compare scores directories ``a_uri`` (before) and ``b_uri`` (after).

    Writes ``compare.json`` and ``compare.png`` into ``out_dir`` when given. See the module docstring for what is
    compared and how."""
    da, db = open_scores(a_uri, checked=True), open_scores(b_uri, checked=True)
    fa, fb = _index_fingerprint(a_uri), _index_fingerprint(b_uri)
    join = ROW_COL if fa is not None and fa == fb and ROW_COL in da.schema.names and ROW_COL in db.schema.names \
        else PATH_COL
    logger.info("compare: %s vs %s, joined on %s", a_uri, b_uri, join)
    paired = _paired(da, db, join, top)
    dist_a, dist_b = _distribution(da), _distribution(db)
    value, shifts = _shifts(dist_a, dist_b)
    sample = paired.pop("_sample")
    result = {"a": a_uri, "b": b_uri, "rows_a": count_rows(da), "rows_b": count_rows(db), "joined_on": join,
              "per_image": paired, "distribution_of": value, "per_defect_type": shifts}
    if out_dir is not None:
        fs, path = resolve_filesystem(out_dir)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{COMPARE_FILE}") as f:
            f.write(json.dumps(result, indent=2).encode() + b"\n")
        with fs.open_output_stream(f"{path}/{FIGURE_FILE}") as f:
            f.write(_figure(result, sample, dist_a, dist_b))
    return result


def _figure(result: dict, sample: tuple[np.ndarray, np.ndarray], dist_a: dict, dist_b: dict) -> bytes:
    """Draw the comparison on one page.

    The page: scores a vs b (the sample), the value's distribution per defect type (ECDFs, the most shifted types), the
    KS statistic per type, and thumbnails of the flipped images that moved most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flips = result["per_image"]["top_flips"][:8]
    fig = plt.figure(figsize=(14, 9 if flips else 5))
    grid = fig.add_gridspec(2 if flips else 1, max(8, 3), height_ratios=[3, 1.4] if flips else [1])
    try:
        ax = fig.add_subplot(grid[0, :3])
        sa, sb = sample
        keep = np.linspace(0, sa.size - 1, min(sa.size, 20000)).astype(int) if sa.size else np.zeros(0, int)
        ax.scatter(sa[keep], sb[keep], s=4, alpha=0.5)
        rho = result["per_image"]["spearman"]
        ax.set(title=f"anomaly_score, a vs b (Spearman {rho:.4f})" if rho is not None else "anomaly_score, a vs b",
               xlabel="a", ylabel="b")
        shifts = {k: v for k, v in result["per_defect_type"].items() if v["ks_statistic"] is not None}
        worst = sorted(shifts, key=lambda k: -shifts[k]["ks_statistic"])[:4]
        ax = fig.add_subplot(grid[0, 3:6])
        key = "normalized" if result["distribution_of"] == NORMALIZED_COL else "score"
        for i, t in enumerate(worst):
            for run, style in ((dist_a, "-"), (dist_b, "--")):
                v = np.sort(run[key] if t == "(all)" else run[key][run["defect"] == t])
                ax.step(v, np.arange(1, v.size + 1) / v.size, style, color=f"C{i}", where="post",
                        label=f"{t} {'a' if run is dist_a else 'b'}")
        ax.set(title=f"{result['distribution_of']} per defect type (a solid, b dashed)", ylabel="fraction")
        ax.legend(fontsize="x-small")
        ax = fig.add_subplot(grid[0, 6:])
        names = sorted(shifts)
        ax.barh(names, [shifts[n]["ks_statistic"] for n in names])
        ax.set(title="KS statistic, a vs b", xlim=(0, 1))
        for i, item in enumerate(flips):
            _thumbnail(fig.add_subplot(grid[1, i]), item)
    except BaseException:
        plt.close(fig)
        raise
    return png_bytes(fig, 80)


def _thumbnail(ax, item: dict) -> None:
    ax.axis("off")
    arrow = "normal -> anomalous" if item["b"]["is_anomalous"] else "anomalous -> normal"
    ax.set_title(f"{arrow}\n{item.get('defect_type') or ''} moved {item['moved']:.3g}", fontsize="x-small")
    try:
        with Image.open(io.BytesIO(read_bytes(item["path"]))) as im:
            im.thumbnail((128, 128))
            ax.imshow(np.asarray(im.convert("RGB")))
    except Exception as e:  # noqa: BLE001 - a thumbnail that cannot be read is named, the page still drawn
        ax.text(0.5, 0.5, f"unreadable:\n{type(e).__name__}", ha="center", va="center", fontsize="x-small")
