"""Linear read-outs of what the latents keep: ridge probes (R²), logistic probes (accuracy) and event AUCs.

Every probe is fitted on one split of the *clips* and scored on the other, so frames of one clip never sit on both
sides. Features are standardised with the training split's mean and std; the probes are scikit-learn's.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score as sk_r2_score
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


def split_clips(num_clips: int, seed: int, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of clip indices into (train, test); both sides get at least one clip."""
    if num_clips < 2:
        raise ValueError(f"a probe needs at least 2 clips to split into fit and test sets, got {num_clips}")
    order = np.random.default_rng(seed).permutation(num_clips)
    num_test = min(max(1, round(num_clips * test_fraction)), num_clips - 1)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> Pipeline:
    """A ridge probe on standardised features: scikit-learn's StandardScaler then Ridge.

    x: [n, F] features; y: [n, S] targets; ridge: the L2 penalty, scaled by n (alpha = ridge * n) so that it does not
    depend on the number of samples. Returns the fitted pipeline (`.predict(x [m, F]) -> [m, S]`), in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_ridge needs x [n, F] and y [n, S] with equal n, got {x.shape} and {y.shape}")
    return make_pipeline(StandardScaler(), Ridge(alpha=ridge * len(x))).fit(x, y)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column (scikit-learn's). y_true, y_pred: [n, S] -> [S]; NaN for a column
    that is constant in y_true (nothing to explain)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    constant = y_true.var(axis=0) <= 1e-12 / max(1, len(y_true))
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = sk_r2_score(y_true, np.asarray(y_pred, dtype=np.float64), multioutput="raw_values", force_finite=False)
    return np.where(constant, np.nan, r2)


def ridge_r2(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, ridge: float) -> np.ndarray:
    """Fit a ridge probe on (x_fit, y_fit) and return its R² per target column on (x_test, y_test): [S]."""
    return r2_score(y_test, fit_ridge(x_fit, y_fit, ridge).predict(np.asarray(x_test, dtype=np.float64)))


def logistic_accuracy(
    x_fit: np.ndarray, labels_fit: np.ndarray, x_test: np.ndarray, labels_test: np.ndarray
) -> float | None:
    """Accuracy of a multinomial logistic-regression probe on standardised features; None if the fit split has
    a single class (nothing to learn)."""
    if len(np.unique(labels_fit)) < 2:
        return None
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(max_iter=500).fit(scaler.transform(x_fit), labels_fit)
    return float((clf.predict(scaler.transform(x_test)) == labels_test).mean())


def auc(scores: np.ndarray, flags: np.ndarray) -> float | None:
    """ROC AUC of `scores` [n] as a detector of binary `flags` [n]; None when only one class is present."""
    flags = np.asarray(flags) > 0.5
    if flags.all() or not flags.any():
        return None
    return float(roc_auc_score(flags, np.asarray(scores, dtype=np.float64)))


def logistic_auc(x_fit: np.ndarray, flags_fit: np.ndarray, x_test: np.ndarray, flags_test: np.ndarray) -> float | None:
    """Held-out ROC AUC of a logistic-regression detector of binary flags from features; None when either split
    has a single class."""
    flags_fit = np.asarray(flags_fit) > 0.5
    if flags_fit.all() or not flags_fit.any():
        return None
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(max_iter=500).fit(scaler.transform(x_fit), flags_fit)
    return auc(clf.predict_proba(scaler.transform(x_test))[:, 1], flags_test)


def nan_to_none(values: np.ndarray | list[float]) -> list[float | None]:
    """A JSON-ready list: NaN becomes None."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64).ravel()]
