"""The plateau rule stops a run once the objective has confidently stopped improving, not on a noisy slow start."""

from __future__ import annotations

import numpy as np

from braid_ray.finetune.loop import plateaued


def _first_stop(objective: np.ndarray, window: int, tol: float) -> int | None:
    history = [{"objective": float(v)} for v in objective]
    return next((n for n in range(1, len(history) + 1) if plateaued(history[:n], window, tol)), None)


def test_a_slow_noisy_rise_is_not_a_plateau_and_a_noisy_flat_run_is() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(300)
    rising = 0.002 * steps + rng.normal(0, 0.05, 300)  # +0.05 z per 25 steps under 0.05 z of noise per step
    assert _first_stop(rising, 25, 0.005) is None
    # the rule without the standard error would have stopped this run early at least once in these seeds
    naive = [next((n for n in range(50, 301) if (lambda h: h[-25:].mean() - h[-50:-25].mean() < 0.005)(
        0.002 * np.arange(n) + np.random.default_rng(s).normal(0, 0.05, n))), None) for s in range(20)]
    assert any(n is not None for n in naive)
    flat = np.concatenate([0.01 * steps[:100], np.full(200, 1.0) + rng.normal(0, 0.05, 200)])
    stop = _first_stop(flat, 25, 0.005)
    assert stop is not None and 150 <= stop <= 300  # after the rise ends, once the flat part outweighs the noise
