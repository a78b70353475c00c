"""The autotuner: a sympy cost model, a timed search within an error budget, and a JSON cache."""
