"""The runner wing: running a pack's levels (levels.py) and sharing units across trials
(shared.py)."""
