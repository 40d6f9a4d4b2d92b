"""The nets wing: model families, datasets, masks and the networks as ops (paths)."""
