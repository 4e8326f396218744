"""Fitted heads: PCA and the DFKDE head (PCA -> scaling -> Gaussian KDE), and the DFM head.

Fitting is numpy in float64. Scoring is torch on the scoring device (the actor's GPU, or its CPU), float32 by default
and float64 with ``exact``: the features never leave the device and only the scores (and DFM's pooled maps) come back.
Inputs are numpy arrays or torch tensors. Nothing mutates its inputs. Sign convention as scikit-learn:
``score_samples`` returns the log-density (higher = more normal); the jobs write ``anomaly_score = -score_samples``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from rayanom.config import UserError, min_rows

logger = logging.getLogger(__name__)

# anomalib's KDEClassifier.compute_probabilities constants: s = 1 / (1 + exp(0.05 (log p - 12))).
ANOMALIB_STEEPNESS = 0.05
ANOMALIB_OFFSET = 12.0
# The batch contract (README "Determinism"): the same rows in the same batches, on the same hardware, library versions
# and precision, score bit-identically. A row scored in another batch may differ in its last bits (matrix kernels pick
# their summation order by shape and by a row's position in the product: OpenBLAS's Haswell and Zen kernels, used on
# AMD CPUs, do; the backbone's convolutions do for a batch of one); in fp32 it agrees within
# BATCH_RTOL * (1 + |score|), a bound with margin over the differences seen.
BATCH_RTOL = 1e-5
# The float32 heads against float64 (``exact``): |a - b| <= DEVICE_RTOL * (1 + |b|) on the scores, for queries among
# the training data and somewhat beyond (tests/test_heads.py, tests/test_dfm.py: features of a decaying spectrum, as CNN
# features have). Far queries keep the same relative accuracy of their (large) distance term.
DEVICE_RTOL = 1e-5
_ROW_CHUNK = 65536  # KDE feature rows projected at a time when scoring (bounds the device copies of the input)
_DFM_ROW_CHUNK = 1024  # DFM rows are wide (C * h' * w' features: 16,384 for resnet50 layer3 at 256^2 pooled by 4)


def anomaly_probability(log_density: np.ndarray) -> np.ndarray:
    """anomalib's ``pred_score`` for a KDE head, computed stably in float64 (never exactly 1 from underflow)."""
    t = ANOMALIB_STEEPNESS * (np.asarray(log_density, dtype=np.float64) - ANOMALIB_OFFSET)
    with np.errstate(invalid="ignore"):  # NaN in (a failed row), NaN out, no warning per batch
        return np.exp(-np.logaddexp(0.0, t))


def _not_fitted(obj: object) -> RuntimeError:
    return RuntimeError(f"{type(obj).__name__} is not fitted; call fit() first")


def _dtype(exact: bool):
    import torch

    return torch.float64 if exact else torch.float32


def _as_tensor(x, exact: bool, device):
    """``x`` (numpy or torch) as a tensor of the scoring dtype on ``device``; a tensor already there is not copied."""
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=_dtype(exact))


def _on_device(obj: object, exact: bool, device, arrays: dict) -> dict:
    """``arrays`` (name -> float64 numpy array, computed once) as tensors of the scoring dtype on ``device``.

    They are cached on ``obj`` per (dtype, device), so an actor moves its head to the device once, not once a batch."""
    key = (exact, str(device))
    cache = obj.__dict__.setdefault("_device_arrays", {})
    if key not in cache:
        cache[key] = {name: _as_tensor(a, exact, device) for name, a in arrays.items()}
    return cache[key]


class PCA:
    """Principal components in float64; the input is never mutated (anomalib's PCA centres it in place).

    ``n_components`` is an integer k (exactly k components) or a fraction in (0, 1): the smallest k whose cumulative
    explained variance reaches it (scikit-learn's rule; anomalib's DFM keeps one component fewer). Tall data (n > d)
    is decomposed through the d x d scatter matrix, accumulated in float64 over row chunks; wide data through a
    float64 thin SVD (whose n x n factor is then smaller than d x d). Never a full-matrices SVD, never an n x n matrix
    when n > d.
    """

    def __init__(self, n_components: int | float = 16) -> None:
        self.n_components = n_components

    def fit(self, x: np.ndarray) -> PCA:
        """Fit on ``x`` of shape (n_samples, n_features)."""
        x = np.asarray(x)
        n, d = x.shape
        self.mean_ = x.mean(axis=0, dtype=np.float64)
        if n > d:
            # Scatter matrix accumulated over row chunks in float64: memory is the input plus one d x d matrix.
            scatter = np.zeros((d, d))
            for start in range(0, n, 4096):
                chunk = x[start:start + 4096].astype(np.float64) - self.mean_
                scatter += chunk.T @ chunk
            evals, evecs = np.linalg.eigh(scatter)
            order = np.argsort(evals)[::-1]
            variances = np.clip(evals[order], 0.0, None)
            vt = evecs[:, order].T
        else:
            _, s, vt = np.linalg.svd(x.astype(np.float64) - self.mean_, full_matrices=False)
            variances = s**2
        total = variances.sum()
        ratios = variances / total if total > 0 else np.zeros_like(variances)
        k = self._n_kept(ratios)
        self.components_ = vt[:k]  # (k, n_features)
        self.explained_variance_ratio_ = ratios[:k]
        self.explained_variance_ = variances[:k] / max(n - 1, 1)
        return self

    def _n_kept(self, ratios: np.ndarray) -> int:
        nc = self.n_components
        if isinstance(nc, float) and 0 < nc < 1:
            return int(min(np.searchsorted(np.cumsum(ratios), nc) + 1, len(ratios)))
        return min(int(nc), len(ratios))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, n_features) -> (n, k) projections of the centred data."""
        if not hasattr(self, "components_"):
            raise _not_fitted(self)
        return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.components_.T


class GaussianKDE:
    """``scipy.stats.gaussian_kde`` semantics: Scott factor n^(-1/(d+4)) times the full unbiased data covariance.

    No centring of the support points (anomalib centres them but not the queries, which is wrong for ``norm``
    scaling); log-densities by a shifted log-sum-exp (anomalib's float32 density underflows to 0 far from the
    support, so its log-density is -inf and far queries tie), in tiles of queries x support points on torch
    (anomalib loops over the queries in Python); the bandwidth is Cholesky-factorised in float64 with a jitter only if
    needed (anomalib inverts it in float32, which fails or loses accuracy on a near-singular covariance).

    Scoring whitens the queries (identity bandwidth), then sums exp(-|y - b|^2 / 2 - c) over tiles of the support
    with one matrix product per tile (the squared distance expanded, in coordinates centred on the support mean),
    the shift c per query being the largest exponent within the first tile: every tile's terms are then at most
    e^88 times its largest one and at least the first tile's is 1, so float32 neither overflows nor underflows
    where it matters; terms below e^-87 relative to c are dropped (relative error < n e^-87). A row whose sum still
    overflows (its nearest support point lies far outside the first tile) is recomputed with the exact maximum.
    ``exact=True`` runs the same in float64 (parity with scipy to ~1e-12). The float32 default is faster on CPU
    and what anomalib computes in (without its underflow); its log-density error is about 1e-7 times the
    squared whitened distance of the query from the support mean: within 1e-4 for queries among the training data.
    """

    def fit(self, z: np.ndarray) -> GaussianKDE:
        """Fit on support points ``z`` of shape (n, d), n > d."""
        z = np.asarray(z, dtype=np.float64)
        n, d = z.shape
        factor = n ** (-1.0 / (d + 4))
        cov = np.cov(z, rowvar=False, bias=False).reshape(d, d) * factor**2
        chol = _cholesky_with_jitter(cov)
        self.inv_chol_ = np.linalg.inv(chol)  # whitening: y = z @ inv_chol_.T has identity bandwidth
        self.support_ = z @ self.inv_chol_.T
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        self.log_norm_ = -0.5 * (d * math.log(2 * math.pi) + log_det) - math.log(n)
        self.__dict__.pop("_tiles", None)  # scoring tiles of an earlier fit
        return self

    def score_samples(self, q, exact: bool = False, device: str = "cpu") -> np.ndarray:
        """Log-density at queries ``q`` (m, d) -> (m,); ``exact``: float64 throughout; ``device``: a torch device."""
        import torch

        if not hasattr(self, "support_"):
            raise _not_fitted(self)
        with torch.inference_mode():
            return self.log_density(_as_tensor(q, exact, device), exact).cpu().numpy()

    def log_density(self, q, exact: bool):
        """``score_samples`` on a tensor ``q`` of the scoring dtype, on its device; a float64 tensor back."""
        t = self._support_tiles(exact, q.device)
        y = q @ t["inv_chol_t"] - t["centre"]
        return _log_kernel_sums(y, t["tiles"], exact) + self.log_norm_

    def _support_tiles(self, exact: bool, device) -> dict:
        """The whitening, the support mean, and the centred support as augmented (d + 2, tile) matrices.

        The matrices are [b; -|b|^2/2; 1], on the device in the scoring dtype, and cached (an actor moves them once)."""
        key = (exact, str(device))
        cache = self.__dict__.setdefault("_tiles", {})
        if key not in cache:
            centre = self.support_.mean(axis=0)
            b = self.support_ - centre
            aug = np.concatenate([b, -0.5 * np.einsum("ij,ij->i", b, b)[:, None], np.ones((len(b), 1))], axis=1).T
            t = _as_tensor(aug, exact, device)
            tiles = [t[:, s:s + SUPPORT_TILE].contiguous() for s in range(0, t.shape[1], SUPPORT_TILE)]
            cache[key] = {"inv_chol_t": _as_tensor(self.inv_chol_.T, exact, device),
                          "centre": _as_tensor(centre, exact, device), "tiles": tiles}
        return cache[key]


SUPPORT_TILE = 4096  # support points per tile
QUERY_TILE = 256  # queries per tile: 256 x 4096 float32 = 4 MiB


def _log_kernel_sums(y, tiles: list, exact: bool):
    """log sum_j exp(-|y_i - b_j|^2 / 2) for centred whitened queries ``y`` (m, d) -> (m,) float64 tensor.

    ``y`` is a tensor on the tiles' device, and so is the result. One host sync a query tile (the overflow check), none
    for the results."""
    import torch

    dtype, device = tiles[0].dtype, tiles[0].device
    low, high = (-700.0, 700.0) if exact else (-87.0, 88.0)
    half_sq = -0.5 * (y.double() ** 2).sum(dim=1)  # float64: its rounding in ``aug`` cancels in the last line
    out = torch.empty(len(y), dtype=torch.float64, device=device)

    def sum_exp(e):  # in place: clamped (no overflow, no slow denormal exps), exponentiated, summed per row
        return e.clamp_(low, high).exp_().sum(dim=1).double()

    with torch.inference_mode():
        buf = torch.empty(min(QUERY_TILE, len(y)), tiles[0].shape[1], dtype=dtype, device=device)
        for s in range(0, len(y), QUERY_TILE):
            yb, hb = y[s:s + QUERY_TILE], half_sq[s:s + QUERY_TILE]
            aug = torch.cat([yb, torch.ones(len(yb), 1, dtype=dtype, device=device), hb[:, None].to(dtype)], 1)
            # Shift: the largest exponent among the first tile's support points; that tile's product is reused.
            e = torch.mm(aug, tiles[0], out=buf[:len(yb), :tiles[0].shape[1]])
            shift = e.max(dim=1).values
            aug[:, -1] -= shift
            acc = sum_exp(e.sub_(shift[:, None]))
            for tile in tiles[1:]:  # into one reused buffer: a fresh 16 MiB tensor per tile costs page faults
                acc += sum_exp(torch.mm(aug, tile, out=buf[:len(yb), :tile.shape[1]]))
            bad = ~torch.isfinite(acc) | (acc >= math.exp(high))
            if bad.any():  # nearest support point far outside the first tile: shift by the exact maximum
                rows = aug[bad]
                rows[:, -1] += shift[bad]
                top = torch.stack([(rows @ tile).max(dim=1).values for tile in tiles]).max(dim=0).values
                rows[:, -1] -= top
                acc[bad] = sum(sum_exp(rows @ tile) for tile in tiles)
                aug[bad] = rows
            # The exponents were y.b - |b|^2/2 + aug[:, -1], and -|y - b|^2/2 = that - aug[:, -1] - |y|^2/2.
            out[s:s + len(yb)] = acc.log() - aug[:, -1].double() + hb
    return out


def _cholesky_with_jitter(cov: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        pass
    scale = max(float(np.trace(cov)) / cov.shape[0], np.finfo(float).tiny)
    for exponent in range(-12, -3):
        jitter = scale * 10.0**exponent
        try:
            chol = np.linalg.cholesky(cov + jitter * np.eye(cov.shape[0]))
        except np.linalg.LinAlgError:
            continue
        logger.warning("KDE bandwidth covariance is singular; added a jitter of %.3g to its diagonal", jitter)
        return chol
    msg = "KDE bandwidth covariance is not positive definite even with jitter: the training features are degenerate"
    raise UserError(msg)


class KdeHead:
    """DFKDE/RKDE head: PCA (k components) -> scaling -> Gaussian KDE.

    ``feature_scaling="scale"`` divides by the largest training projection norm (stored); ``"norm"`` makes each
    projection a unit vector.
    """

    ARRAYS = {"pca_mean": 1, "pca_components": 2, "max_norm": 1, "kde_inv_chol": 2, "kde_support": 2,
             "kde_log_norm": 1}  # the arrays of to_arrays, and their ranks

    def __init__(self, n_components: int = 16, feature_scaling: str = "scale") -> None:
        self.n_components = n_components
        self.feature_scaling = feature_scaling

    def fit(self, x: np.ndarray) -> KdeHead:
        """Fit on features ``x`` of shape (n_samples, n_features); needs n_samples > n_components."""
        import torch

        self.__dict__.pop("_device_arrays", None)  # scoring tensors of an earlier fit
        x = np.asarray(x)
        if x.ndim != 2:
            msg = f"features must be 2-D (n_samples, n_features), got shape {x.shape}"
            raise UserError(msg)
        n, d = x.shape
        if n < min_rows(self.n_components):
            msg = (f"the KDE head needs more training rows than n_pca_components={self.n_components}, got {n}; "
                   "add normal training images or lower n_pca_components")
            raise UserError(msg)
        if self.n_components > d:
            msg = f"n_pca_components={self.n_components} exceeds the feature dimension {d}"
            raise UserError(msg)
        if not np.isfinite(x).all():
            msg = "training features contain NaN or inf"
            raise UserError(msg)
        self.pca_ = PCA(self.n_components).fit(x)
        p = self.pca_.transform(x)
        norms = np.linalg.norm(p, axis=1)
        self.max_norm_ = float(norms.max()) if norms.size else 1.0
        if self.max_norm_ == 0.0:
            msg = "all training features are identical: nothing to model (constant images?)"
            raise UserError(msg)
        self.kde_ = GaussianKDE().fit(self._scale(torch.from_numpy(p)).numpy())
        return self

    def score_samples(self, x, exact: bool = False, device: str = "cpu") -> np.ndarray:
        """Log-density of features ``x`` (m, n_features), numpy or a tensor -> (m,) float64; higher = more normal.

        PCA projection, scaling, whitening and kernel sums run in torch on ``device``: float32 by default (within
        ``DEVICE_RTOL`` of ``exact=True``, float64 throughout, for queries among the training data), in row chunks."""
        import torch

        if not hasattr(self, "kde_"):
            raise _not_fitted(self)
        if len(x) == 0:
            return np.zeros(0)
        t = _on_device(self, exact, device, {"mean": self.pca_.mean_, "components_t": self.pca_.components_.T})
        with torch.inference_mode():
            out = [self.kde_.log_density(self._scale((_as_tensor(x[s:s + _ROW_CHUNK], exact, device) - t["mean"])
                                                       @ t["components_t"]), exact)
                   for s in range(0, len(x), _ROW_CHUNK)]
            return torch.cat(out).cpu().numpy()

    def _scale(self, p):
        """Projections (a tensor) scaled as ``feature_scaling`` says: by the largest training norm, or to unit norm."""
        if self.feature_scaling == "scale":
            return p / self.max_norm_
        norms = p.norm(dim=1, keepdim=True)
        return (p / norms).where(norms > 0, p.new_zeros(()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays that define the fitted head (for safetensors)."""
        if not hasattr(self, "kde_"):
            raise _not_fitted(self)
        return {
            "pca_mean": self.pca_.mean_,
            "pca_components": self.pca_.components_,
            "max_norm": np.array([self.max_norm_]),
            "kde_inv_chol": self.kde_.inv_chol_,
            "kde_support": self.kde_.support_,
            "kde_log_norm": np.array([self.kde_.log_norm_]),
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> KdeHead:
        """This head, fitted from :meth:`to_arrays` arrays (names and ranks in ``ARRAYS``): bit-identical scores."""
        self.__dict__.pop("_device_arrays", None)
        self.pca_ = PCA(self.n_components)
        self.pca_.mean_ = arrays["pca_mean"]
        self.pca_.components_ = arrays["pca_components"]
        self.max_norm_ = float(arrays["max_norm"][0])
        kde = GaussianKDE()
        kde.inv_chol_ = arrays["kde_inv_chol"]
        kde.support_ = arrays["kde_support"]
        kde.log_norm_ = float(arrays["kde_log_norm"][0])
        self.kde_ = kde
        return self

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_components: int, feature_scaling: str) -> KdeHead:
        return cls(n_components, feature_scaling).load_arrays(arrays)


class DfmHead:
    """DFM head: PCA keeping ``n_components`` (fraction or count) -> FRE or Gaussian NLL.

    FRE (feature reconstruction error) = squared norm of the residual of the PCA reconstruction, the textbook formula
    (equal to anomalib's). NLL = Gaussian negative log-likelihood in PCA space, centred on the training mean
    (anomalib subtracts the mean twice, so it measures the uncentred projection x V_k), without the constant
    k log 2 pi and the 1/2 factor, as anomalib:
    sum((z_i / sigma_i)^2) + 2 sum(log sigma_i), with sigma_i^2 = s_i^2 / n (anomalib's biased variance).
    """

    ARRAYS = {"pca_mean": 1, "pca_components": 2, "sigma": 1}  # the arrays of to_arrays, and their ranks

    def __init__(self, n_components: int | float = 0.97, score_type: str = "fre") -> None:
        self.n_components = n_components
        self.score_type = score_type

    def fit(self, x: np.ndarray) -> DfmHead:
        """Fit on features ``x`` of shape (n_samples, n_features)."""
        self.__dict__.pop("_device_arrays", None)  # scoring tensors of an earlier fit
        x = np.asarray(x)
        if x.ndim != 2 or len(x) < min_rows(0.5):
            msg = f"DFM needs at least {min_rows(0.5)} training rows of 2-D features, got shape {x.shape}"
            raise UserError(msg)
        if not np.isfinite(x).all():
            msg = "training features contain NaN or inf"
            raise UserError(msg)
        n, d = x.shape
        if isinstance(self.n_components, int) and (n < min_rows(self.n_components) or self.n_components >= d):
            msg = (f"pca_level={self.n_components} components need more than {self.n_components} training rows "
                   f"and features; got {n} rows of {d} features (rank <= {min(n - 1, d)})")
            raise UserError(msg)
        self.pca_ = PCA(self.n_components).fit(x)
        variances = self.pca_.explained_variance_ * (n - 1) / n  # biased, divisor n, as anomalib's Gaussian
        if not (variances > 0).any() or variances[0] <= 0:
            msg = "all training features are identical: nothing to model (constant images?)"
            raise UserError(msg)
        keep = variances > variances[0] * 1e-12
        if not keep.all():
            # Components of (numerically) zero variance carry no information and would make the NLL infinite.
            logger.warning("DFM: dropping %d PCA components of zero variance (rank-deficient training features)",
                           int((~keep).sum()))
            self.pca_.components_ = self.pca_.components_[keep]
            variances = variances[keep]
        self.sigma_ = np.sqrt(variances)
        return self

    def score_with_maps(self, x, exact: bool = False, device: str = "cpu",
                        map_shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(m, n_features) features -> FRE or NLL (m,) float64, higher = more anomalous, and FRE's anomaly maps.

        The features are numpy or a tensor. For FRE with ``map_shape`` = (C, h, w) the anomaly maps (m, h * w) float32
        are the squared residuals summed over channels.

        In torch on ``device``, float32 by default (within ``DEVICE_RTOL`` of ``exact=True``, float64 throughout, for
        queries among the training data): only the scores and the pooled maps leave the device."""
        import torch

        if not hasattr(self, "sigma_"):
            raise _not_fitted(self)
        t = _on_device(self, exact, device, {"mean": self.pca_.mean_, "components": self.pca_.components_,
                                             "sigma": self.sigma_})
        scores, maps = [], []
        with torch.inference_mode():
            for s in range(0, len(x), _DFM_ROW_CHUNK):
                xc = _as_tensor(x[s:s + _DFM_ROW_CHUNK], exact, device) - t["mean"]
                z = xc @ t["components"].T
                if self.score_type == "fre":
                    r = (xc - z @ t["components"]).square_()
                    scores.append(r.sum(dim=1, dtype=torch.float64))
                    if map_shape is not None:
                        maps.append(r.reshape(len(r), *map_shape).sum(dim=1).reshape(len(r), -1).float())
                else:
                    nll = (z / t["sigma"]).square_().sum(dim=1, dtype=torch.float64)
                    scores.append(nll + 2.0 * float(np.log(self.sigma_).sum()))
            score = torch.cat(scores).cpu().numpy() if scores else np.zeros(0)
            if map_shape is None or self.score_type != "fre":
                return score, None
            return score, (torch.cat(maps).cpu().numpy() if maps else np.zeros((0, map_shape[1] * map_shape[2]),
                                                                                np.float32))

    def residuals(self, x: np.ndarray) -> np.ndarray:
        """Squared reconstruction residuals per feature, (m, n_features), float64 numpy.

        This is the FRE map before pooling over channels, for tests and analysis; scoring uses
        :meth:`score_with_maps`."""
        if not hasattr(self, "sigma_"):
            raise _not_fitted(self)
        xc = np.asarray(x, dtype=np.float64) - self.pca_.mean_
        return (xc - (xc @ self.pca_.components_.T) @ self.pca_.components_) ** 2

    def anomaly_scores(self, x, exact: bool = False, device: str = "cpu") -> np.ndarray:
        """(m, n_features) -> (m,) FRE or NLL; higher = more anomalous (see :meth:`score_with_maps`)."""
        return self.score_with_maps(x, exact, device)[0]

    def score_samples(self, x, exact: bool = False, device: str = "cpu") -> np.ndarray:
        """-FRE or -NLL, higher = more normal (scikit-learn's sign)."""
        return -self.anomaly_scores(x, exact, device)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "sigma_"):
            raise _not_fitted(self)
        return {"pca_mean": self.pca_.mean_, "pca_components": self.pca_.components_, "sigma": self.sigma_}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> DfmHead:
        """This head, fitted from :meth:`to_arrays` arrays (names and ranks in ``ARRAYS``)."""
        self.__dict__.pop("_device_arrays", None)
        self.pca_ = PCA(self.n_components)
        self.pca_.mean_ = arrays["pca_mean"]
        self.pca_.components_ = arrays["pca_components"]
        self.sigma_ = arrays["sigma"]
        return self

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_components: int | float, score_type: str) -> DfmHead:
        return cls(n_components, score_type).load_arrays(arrays)
