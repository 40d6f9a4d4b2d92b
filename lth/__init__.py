"""The `lth` command line: the top layer, above trials, orchestrator and analysis."""
