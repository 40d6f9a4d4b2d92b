"""Running sweeps on Ray Tune: the only place that imports ray (and optuna, in search.py).
See ARCHITECTURE.md, "The sweep runner"."""
