"""Tracking and tickets on MLflow: the only place that imports mlflow (in store.py).
See ARCHITECTURE.md, "Tracking"."""
