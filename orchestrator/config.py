"""Trial configs: YAML files, shipped presets and `--set key=value` overrides -> TrialSpec.

Reading files happens here, never in trials/: a trial depends only on its spec
(ARCHITECTURE.md, "Layers"). A config may start from a preset (`preset: NAME`) and
override any of its keys; `model:` and `dataset:` accept a bare name as shorthand for
`{name: ...}`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from trials.errors import ConfigError
from trials.spec import TrialSpec, field_paths, from_dict

PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path, key: str = "config") -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(key, str(path), f"a readable YAML file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(key, str(path), f"valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(key, str(path), "a YAML mapping of trial-spec keys")
    return data


def preset(name: str) -> dict:
    if name not in preset_names():
        raise ConfigError("preset", name, f"known presets: {', '.join(preset_names())}")
    return read_yaml(PRESETS_DIR / f"{name}.yaml", "preset")


def expand(data: dict) -> dict:
    """Resolve `preset:` and the model/dataset shorthand into one plain nested dict."""
    data = copy.deepcopy(data)
    base = preset(data.pop("preset")) if "preset" in data else {}
    return merge(_long_form(base), _long_form(data))


def _long_form(data: dict) -> dict:
    for k in ("model", "dataset"):
        if isinstance(data.get(k), str):
            data[k] = {"name": data[k]}
    return data


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "layer_rates":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError("--set", text, "expected key=value, e.g. prune.rate=0.3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_path(data: dict, key: str, value, known: dict) -> None:
    """Set `a.b.c` in nested `data`; the path must name a spec field, or a layer in
    `prune.layer_rates.LAYER` (layer names may hold dots: prune.layer_rates.hidden.0)."""
    rates = "prune.layer_rates."
    if key.startswith(rates) and len(key) > len(rates):
        layer_rates = data.setdefault("prune", {}).setdefault("layer_rates", {})
        layer_rates[key[len(rates):]] = value
        return
    if key not in known and key not in ("model", "dataset"):
        raise ConfigError(key, value, f"unknown key; known keys: {', '.join(known)}")
    *parents, last = key.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def apply_overrides(data: dict, overrides) -> dict:
    data = _long_form(copy.deepcopy(data))
    known = field_paths()
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value, known)
    return _long_form(data)


def trial_spec(config=None, preset_name: str | None = None, overrides=()) -> TrialSpec:
    """The TrialSpec of a config file and/or preset plus overrides (validated)."""
    data = {"preset": preset_name} if preset_name else {}
    if config is not None:
        data = merge(expand(data), expand(read_yaml(config)))
    return from_dict(apply_overrides(expand(data), overrides))
