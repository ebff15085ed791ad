"""Linear read-outs of what the latents keep: ridge probes (R²), logistic probes (accuracy) and event AUCs.

Every probe is fitted on one split of the *clips* and scored on the other, so frames of one clip never sit on both
sides. Features are standardised with the training split's mean and std; the ridge fit is closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler


def split_clips(num_clips: int, seed: int, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of clip indices into (train, test); both sides get at least one clip."""
    if num_clips < 2:
        raise ValueError(f"a probe needs at least 2 clips to split into fit and test sets, got {num_clips}")
    order = np.random.default_rng(seed).permutation(num_clips)
    num_test = min(max(1, round(num_clips * test_fraction)), num_clips - 1)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


@dataclass
class RidgeProbe:
    """A fitted linear map from standardised features to targets."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    weight: np.ndarray  # [F, S]
    bias: np.ndarray  # [S]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x: [n, F] -> [n, S]."""
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> RidgeProbe:
    """Closed-form ridge regression on standardised features.

    x: [n, F] features; y: [n, S] targets; ridge: the L2 penalty (scaled by n so it does not depend on the number
    of samples). Solves (Xs^T Xs + ridge * n * I) W = Xs^T (y - mean y) in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_ridge needs x [n, F] and y [n, S] with equal n, got {x.shape} and {y.shape}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features stay zero after centring
    xs = (x - mean) / std
    y_mean = y.mean(axis=0)
    gram = xs.T @ xs + ridge * len(x) * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xs.T @ (y - y_mean))
    return RidgeProbe(mean=mean, std=std, weight=weight, bias=y_mean)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column. y_true, y_pred: [n, S] -> [S]; NaN for a constant column."""
    y_true = np.asarray(y_true, dtype=np.float64)
    residual = ((y_true - y_pred) ** 2).sum(axis=0)
    total = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 1e-12, 1.0 - residual / np.maximum(total, 1e-12), np.nan)


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
