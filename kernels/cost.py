"""Cost models of the kernels that decide at run time (pure functions of shapes; the tuner's measured model of
whole calls is `hyper_backend.autotune.cost`).

- `band_cost`: the CPU band schedule of ``hyper::window_attention`` (`cpu.window.window_schedule` compares it
  with one dense fused call).
"""

from __future__ import annotations

import math

BAND_TILES = (32, 64, 128, 256, 512, 1024)
BAND_MARGIN = 0.8  # tiles are used only when the model predicts them at least 1/0.8 = 1.25x cheaper
# the band schedule's fixed cost (its gathers, masks and scatters: ~2 ms on the busy 2 cores) in the same units,
# (query, key) pairs of one head at d = 64: at H = 1 it keeps n = 1024-2048 on the dense call, where tiles measured
# 0.8-1.0x SDPA (bench/attention.py --window 128 512 --heads 1)
BAND_OVERHEAD = 3e5


def band_cost(Nq: int, band, tile: int) -> float:
    """Modelled cost of `cpu.band.band_forward` in (query, key) pairs of one dense fused call: every tile computes
    all of its ``tile + a + b`` slots, and a tile of t rows runs at about ``1 / (1 + 64 / t)`` of the dense kernel's
    rate (aten's CPU kernel splits a tile below 192 rows into 32-row blocks; per-tile overhead).

    Measured (2 shared cores, load 3.1-3.8, H=8, d=64, fp32, forward; dense schedule time / band time, the
    model's prediction in brackets; ``*`` = the tile `cpu.window.window_schedule` picks, ``-`` = it picks dense):
      n=256  causal w=128: T64 0.42 [0.67] -   symmetric w=128: T64 0.88 [0.40] -
      n=512  causal w=128: T64 1.88 [1.34] *   symmetric w=128: T128 0.72 [0.89] -
      n=1024 causal w=128: T64 3.02 [2.68] *   symmetric w=128: T128 2.17 [1.78] *
      n=1024 causal w=512: T256 1.53 [1.07] -  symmetric w=512: T256 0.66 [0.64] -
      n=2048 causal w=128: T64 5.96 [5.36] *   symmetric w=128: T128 4.11 [3.56] *
      n=2048 causal w=512: T128 2.06 [2.14] *  symmetric w=512: T256 1.45 [1.28] *
    So the crossover is at n ~ 512 for w = 128 and n ~ 1024-2048 for w = 512; below it the dense schedule (one
    fused call with the band as a bias, which costs what SDPA with the dense mask costs) is the faster one, and
    the model errs on the side of dense (it never picks tiles that measured slower)."""
    a, b = band
    t = max(1, min(tile, Nq))
    return math.ceil(Nq / t) * t * (t + a + b) * (1.0 + 64.0 / t)
