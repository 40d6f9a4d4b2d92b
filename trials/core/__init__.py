"""The core wing: errors, registries and typed coercion, which every other wing uses."""
