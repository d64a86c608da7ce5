"""The absolute-embedding regressor: from an average's rotation-invariant features to its place.

The common-line embedding is relative: adding averages changes the matrix and hence the axes. To
place new averages (a new bootstrap replicate, a subset, a new run) into an existing landscape
without recomputing it, a small multilayer perceptron is trained to map each average's
rotation-invariant features (:mod:`spiscape.embed.features`) to its embedding coordinates, as in
Zhuang, Ayyer et al. (IUCrJ 2022): hidden layers 512-128-64-32 with ReLU, Adam, a seeded 80/20
split of the averages, early stopping on the validation loss (the best weights are kept).
Features and coordinates are standardised with the training set's mean and spread.

The model file (``embedding_model.pt``, plain tensors and numbers only, readable with
``torch.load(weights_only=True)``) holds the weights, the layer sizes, the feature parameters, the
standardisation, the component count and embedding method, the clusters' centroids (so new
averages get the nearest cluster) and the validation metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from spiscape.embed.features import FeatureParams, rotation_invariant_features
from spiscape.errors import InputError
from spiscape.io.weights import load_plain, plain

log = logging.getLogger(__name__)

HIDDEN = (512, 128, 64, 32)


@dataclass
class TrainParams:
    hidden: tuple[int, ...] = HIDDEN
    epochs: int = 3000
    patience: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    validation_fraction: float = 0.2
    seed: int = 1
    threads: int | None = None  # torch CPU threads; None: 1 for small problems, else torch's


def _threads(params: TrainParams, work: int) -> int:
    """One thread unless the problem is big: a small MLP only loses time synchronising threads."""
    if params.threads:
        return int(params.threads)
    return 1 if work < 5_000_000 else torch.get_num_threads()


def mlp(inputs: int, outputs: int, hidden=HIDDEN) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation indices; at least one of each when there are two or more."""
    order = np.random.default_rng([seed, 4711]).permutation(count)
    n_val = int(round(fraction * count))
    n_val = min(max(n_val, 1 if count >= 2 else 0), count - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


@dataclass
class AbsoluteEmbedding:
    """A trained regressor with everything needed to apply it to new averages."""

    network: nn.Sequential
    feature_params: FeatureParams
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    hidden: tuple[int, ...] = HIDDEN
    method: str = "pca"
    centroids: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    validation_index: np.ndarray | None = None  # set by training, not saved
    training_prediction: np.ndarray | None = None  # coordinates predicted for the training set

    @property
    def components(self) -> int:
        return int(self.y_mean.size)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, dtype=np.float64) - self.x_mean) / self.x_std
        self.network.eval()
        with torch.no_grad():
            y = self.network(torch.as_tensor(x, dtype=torch.float32)).numpy()
        return y.astype(np.float64) * self.y_std + self.y_mean

    def predict(self, intens: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
        """Embedding coordinates ``(A, k)`` of averages ``intens (A, S, S)``."""
        features, _ = rotation_invariant_features(intens, support, self.feature_params)
        return self.predict_features(features)

    def state(self) -> dict:
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
        return {
            "format": "spiscape-absolute-embedding-1",
            "state_dict": self.network.state_dict(),
            "hidden": list(self.hidden),
            "inputs": int(self.x_mean.size),
            "components": self.components,
            "method": self.method,
            "feature_params": self.feature_params.to_dict(),
            "x_mean": as_t(self.x_mean), "x_std": as_t(self.x_std),
            "y_mean": as_t(self.y_mean), "y_std": as_t(self.y_std),
            "centroids": as_t(self.centroids if self.centroids is not None
                              else np.zeros((0, self.components))),
            "metrics": self.metrics,
        }

    def save(self, path) -> None:
        torch.save(plain(self.state()), path)

    @classmethod
    def load(cls, path) -> AbsoluteEmbedding:
        state = load_plain(path, "embedding model")
        try:
            network = mlp(int(state["inputs"]), int(state["components"]), tuple(state["hidden"]))
            network.load_state_dict(state["state_dict"])
            return cls(
                network=network,
                feature_params=FeatureParams.from_dict(state["feature_params"]),
                x_mean=state["x_mean"].numpy(), x_std=state["x_std"].numpy(),
                y_mean=state["y_mean"].numpy(), y_std=state["y_std"].numpy(),
                hidden=tuple(state["hidden"]), method=str(state["method"]),
                centroids=state["centroids"].numpy(), metrics=dict(state["metrics"]),
            )
        except Exception as exc:  # a wrong layout, missing keys ...
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(path, f"not a spiscape embedding model ({line})") from None


def train(features: np.ndarray, coords: np.ndarray, params: TrainParams | None = None,
          progress: bool = True) -> tuple[nn.Sequential, dict]:
    """Fit the MLP on standardised data; returns the best network and its validation metrics."""
    params = params or TrainParams()
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(coords, dtype=np.float64)
    train_idx, val_idx = split(x.shape[0], params.validation_fraction, params.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_threads(params, x.size))
    try:
        return _fit(x, y, train_idx, val_idx, params, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(x, y, train_idx, val_idx, params: TrainParams, progress: bool):
    x_mean, x_std = _standardise(x[train_idx])
    y_mean, y_std = _standardise(y[train_idx])
    xt = torch.as_tensor((x - x_mean) / x_std, dtype=torch.float32)
    yt = torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32)
    torch.manual_seed(params.seed)
    network = mlp(x.shape[1], y.shape[1], params.hidden)
    optimiser = torch.optim.Adam(network.parameters(), lr=params.learning_rate,
                                 weight_decay=params.weight_decay)
    loss_fn = nn.MSELoss()
    watch = val_idx if val_idx.size else train_idx
    best = (np.inf, 0, {k: v.clone() for k, v in network.state_dict().items()})
    # disable=None: a bar on a terminal only, never carriage returns in a log file
    bar = tqdm(range(params.epochs), desc="regressor", disable=None if progress else True,
               leave=False)
    for epoch in bar:
        network.train()
        optimiser.zero_grad()
        loss = loss_fn(network(xt[train_idx]), yt[train_idx])
        loss.backward()
        optimiser.step()
        network.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(network(xt[watch]), yt[watch]))
        if val_loss < best[0] - 1e-7:
            best = (val_loss, epoch, {k: v.clone() for k, v in network.state_dict().items()})
        elif epoch - best[1] >= params.patience:
            break
        if epoch % 50 == 0:
            bar.set_postfix(train=f"{loss.item():.3g}", val=f"{val_loss:.3g}")
    bar.close()
    network.load_state_dict(best[2])
    network.eval()
    with torch.no_grad():
        pred = network(xt).numpy().astype(np.float64) * y_std + y_mean
    metrics = regression_metrics(y, pred, train_idx, val_idx)
    metrics.update(best_epoch=int(best[1]), epochs_run=int(epoch + 1),
                   train_size=int(train_idx.size), validation_size=int(val_idx.size))
    extra = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std,
             "validation_index": val_idx, "prediction": pred}
    return network, {**metrics, "_extra": extra}


def regression_metrics(y, pred, train_idx, val_idx) -> dict:
    """MSE per component on the validation and training sets, and validation R^2."""
    def mse(idx):
        return ((pred[idx] - y[idx]) ** 2).mean(axis=0) if idx.size else np.full(y.shape[1],
                                                                                   np.nan)

    val = mse(val_idx)
    variance = y[val_idx].var(axis=0) if val_idx.size > 1 else np.full(y.shape[1], np.nan)
    r2 = 1.0 - np.divide(val, variance, out=np.full_like(val, np.nan), where=variance > 0)
    return {"validation_mse": val.tolist(), "train_mse": mse(train_idx).tolist(),
            "validation_r2": r2.tolist(), "validation_variance": variance.tolist()}


def fit_absolute_embedding(intens, support, coords, params: TrainParams | None = None,
                           method: str = "pca", centroids=None,
                           progress: bool = True) -> AbsoluteEmbedding:
    """Features of the averages, then the regressor to their embedding coordinates."""
    features, feature_params = rotation_invariant_features(intens, support)
    log.info("regressor: %d averages x %d rotation-invariant features (%d rings)",
             features.shape[0], features.shape[1], len(feature_params.radii))
    network, metrics = train(features, coords, params, progress)
    extra = metrics.pop("_extra")
    model = AbsoluteEmbedding(network, feature_params, extra["x_mean"], extra["x_std"],
                              extra["y_mean"], extra["y_std"],
                              hidden=tuple((params or TrainParams()).hidden), method=method,
                              centroids=centroids, metrics=metrics,
                              validation_index=extra["validation_index"],
                              training_prediction=extra["prediction"])
    return model
