"""Tuning HyperAttention: the device tuner (`search`, ``python -m hyper_backend.autotune --seq ...``), the per-model
calibration (`calibrate`, ``... --model ...``), and the tuning cache they write and the backend reads (`store`).
See docs/autotune.md."""
