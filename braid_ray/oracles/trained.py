"""An oracle CNN trained on D_ora, for tasks with no exact or pretrained oracle.

Trained once per run directory and cached; its Pearson on held-out D_ora rows is reported with it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from braid_ray.config import OracleConfig
from braid_ray.data.encoding import one_hot
from braid_ray.eval.stats import pearson
from braid_ray.models import SequenceCNN
from braid_ray.seeding import seeded

log = logging.getLogger(__name__)


def _build(length: int, cfg: OracleConfig) -> SequenceCNN:
    return SequenceCNN(length, cfg.channels, cfg.layers, cfg.kernel_size, cfg.hidden, cfg.pool, cfg.dropout)


def _predict(model: SequenceCNN, codes: np.ndarray, batch: int = 2048) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(one_hot(codes[i:i + batch]))) for i in range(0, len(codes), batch)]
    return torch.cat(out).double().numpy()


class TrainedCNNOracle:
    name = "trained_cnn"

    def __init__(self, model: SequenceCNN, y_mean: float, y_std: float, info: dict):
        self.model, self.y_mean, self.y_std, self.info = model, y_mean, y_std, info

    def score(self, codes: np.ndarray) -> np.ndarray:
        return _predict(self.model, np.asarray(codes)) * self.y_std + self.y_mean

    @classmethod
    def fit(cls, codes: np.ndarray, y: np.ndarray, cfg: OracleConfig, seed: int) -> TrainedCNNOracle:
        """Train on (codes, y) with a held-out share for early stopping and the reported Pearson."""
        if len(codes) < 20:
            raise ValueError(f"D_ora has {len(codes)} rows; a trained oracle needs at least 20 "
                             "(raise data.oracle_fraction)")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(codes))
        n_val = max(1, int(round(cfg.val_fraction * len(codes))))
        val, tr = perm[:n_val], perm[n_val:]
        y_mean, y_std = float(y[tr].mean()), float(y[tr].std() or 1.0)
        x_tr = torch.from_numpy(one_hot(codes[tr]))
        z_tr = torch.from_numpy(((y[tr] - y_mean) / y_std).astype(np.float32))
        best, best_state, stale = -np.inf, None, 0
        with seeded(seed):  # the initial weights and the dropout masks
            model = _build(codes.shape[1], cfg)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            for epoch in range(cfg.epochs):
                model.train()
                order = torch.from_numpy(rng.permutation(len(tr)))
                for i in range(0, len(tr), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    loss = torch.nn.functional.mse_loss(model(x_tr[idx]), z_tr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                r = pearson(_predict(model, codes[val]), y[val])
                log.info("oracle epoch %d/%d: held-out Pearson %.4f", epoch + 1, cfg.epochs, r)
                if r > best:
                    best, best_state, stale = r, {k: v.clone() for k, v in model.state_dict().items()}, 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        model.load_state_dict(best_state)
        info = {"kind": cls.name, "exact": False, "heldout_pearson": best, "heldout_rows": int(n_val),
                "y_mean": y_mean, "y_std": y_std,
                "train_rows": int(len(tr)), "epochs_run": epoch + 1,
                "note": "CNN trained on D_ora only; the method never sees D_ora"}
        return cls(model.eval(), y_mean, y_std, info)

    def to_bytes(self) -> bytes:
        return save_safetensors(self.model.state_dict())

    @classmethod
    def from_bytes(cls, data: bytes, length: int, cfg: OracleConfig, info: dict) -> TrainedCNNOracle:
        """Rebuild from ``to_bytes`` output and the ``info`` dict saved beside it."""
        model = _build(length, cfg)
        model.load_state_dict(load_safetensors(data))
        return cls(model.eval(), info["y_mean"], info["y_std"], info)
