"""Trial configs: YAML files, shipped presets and `--set key=value` overrides -> TrialSpec.

Reading files happens here, never in trials/: a trial depends only on its spec
(ARCHITECTURE.md, "Layers"). A config may start from a preset (`preset: NAME`) and
override any of its keys; `model:` and `dataset:` accept a bare name as shorthand for
`{name: ...}`.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from trials.core.errors import ConfigError, check
from trials.spec import TrialSpec, field_paths, from_dict

PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


class StrictLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a mapping that repeats a key (YAML says keys are unique;
    PyYAML would keep the last silently: `train: {lr: -5, lr: 0.001}` trained)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """Parse YAML text strictly (StrictLoader): one mapping key once."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path, key: str = "config") -> dict:
    path = Path(path)
    try:
        data = load_yaml(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(key, str(path), f"a readable YAML file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(key, str(path), f"a UTF-8 text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(key, str(path), f"valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(key, str(path), "a YAML mapping of trial-spec keys")
    return data


def preset(name: str) -> dict:
    if not isinstance(name, str) or name not in preset_names():
        raise ConfigError("preset", name, f"known presets: {', '.join(preset_names())}")
    return read_yaml(PRESETS_DIR / f"{name}.yaml", "preset")


def expand(data: dict, key: str = "config") -> dict:
    """Resolve `preset:` and the model/dataset shorthand into one plain nested dict."""
    check(isinstance(data, dict), key, data, "a mapping of trial-spec keys (or {preset: NAME, ...})")
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
        value = load_yaml(raw) if raw.strip() else None
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"--set {key.strip()}", raw, f"valid YAML ({_yaml_problem(e)})") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; every user means the number
    return key.strip(), value


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what went wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}" if mark else problem


def set_path(data: dict, key: str, value, known: dict) -> None:
    """Set `a.b.c` in nested `data`; the path must name a spec field, or a layer in
    `prune.layer_rates.LAYER` (layer names may hold dots: prune.layer_rates.hidden.0)."""
    rates = "prune.layer_rates."
    if key.startswith(rates) and len(key) > len(rates):
        layer_rates = data.setdefault("prune", {}).setdefault("layer_rates", {})
        layer_rates[key[len(rates):]] = value
        return
    # a section (--set 'stability={copies: 2}') is merged into; model/dataset also take a name
    section = key not in known and key not in ("model", "dataset") and any(k.startswith(key + ".") for k in known)
    if section:
        check(isinstance(value, dict), key, value, f"a mapping of its keys, e.g. {key}={{{_first_leaf(known, key)}: ...}}")
    elif key not in known and key not in ("model", "dataset"):
        raise ConfigError(key, value, unknown_key(key, known))
    *parents, last = key.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = merge(node[last], value) if section and isinstance(node.get(last), dict) else value


def unknown_key(key: str, known) -> str:
    """What to say of a path no spec field has: the keys where it points (the section's,
    or the top level's), the closest names first."""
    import difflib

    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in known:
            return f"unknown key: {head} takes a value, not keys under it"
        under = sorted({k[len(head) + 1:].split(".")[0] for k in known if k.startswith(head + ".")})
        if under:
            break
    else:
        head, under = "", sorted({k.split(".")[0] for k in known})
    close = difflib.get_close_matches(key[len(head) + 1:] if head else key, under, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown key; {hint}known keys{' under ' + head if head else ''}: {', '.join(under)}"


def _first_leaf(known: dict, section: str) -> str:
    return next(k for k in known if k.startswith(section + "."))[len(section) + 1:]


def apply_overrides(data: dict, overrides) -> dict:
    data = _long_form(copy.deepcopy(data))
    known = field_paths()
    for text in overrides:
        key, value = parse_override(text)
        set_path(data, key, value, known)
    return _long_form(data)


def spec_at(base: dict, values: dict) -> TrialSpec:
    """The TrialSpec of `base` (a spec mapping) with each spec path in `values` set to its
    value as it is (a sweep's typed values: no text on the way), validated."""
    data = _long_form(copy.deepcopy(base))
    known = field_paths()
    for path, value in values.items():
        set_path(data, path, value, known)
    return from_dict(_long_form(data))


def trial_spec(config=None, preset_name: str | None = None, overrides=()) -> TrialSpec:
    """The TrialSpec of a config file and/or preset plus overrides (validated)."""
    data = {"preset": preset_name} if preset_name else {}
    if config is not None:
        data = merge(expand(data), expand(read_yaml(config)))
    return from_dict(apply_overrides(expand(data), overrides))
