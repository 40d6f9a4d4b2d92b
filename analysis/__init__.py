"""MLflow -> pandas -> tables and plots (filled in by the analysis issue)."""
