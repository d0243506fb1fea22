"""Load, override and validate a YAML run config against gpuml.train.schema.

The result is a plain nested dict with every default filled in (the "resolved config"), which is
what the trainer reads, what runs save as config.yaml, and what --resume compares.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gpuml.errors import ConfigError
from gpuml.train.schema import LAYERS, REQUIRED, ROOT, Field


class ConfigSource(str):
    """The config file's name (it is a str, so it prints as one) plus which keys came from the
    command line, so that an error about a key blames what set it: `--set trainer.epochs: ...`,
    `--device: ...` or `FILE: trainer.epochs: ...`. Errors found after loading (a layer that does
    not fit its input) use `blame` with the same source."""

    overridden: dict[str, str]  # dotted key -> the option that set it ("--set", "--device")

    def __new__(cls, source: str, overridden: Mapping[str, str] | None = None) -> ConfigSource:
        self = super().__new__(cls, source)
        self.overridden = dict(overridden or {})
        return self

    def blame(self, path: str, message: str) -> str:
        """`message` about dotted key `path`, prefixed by whoever set that key or a key below
        it (an unknown section `trainr` is the fault of `--set trainr.epochs=1`)."""
        for key, option in self.overridden.items():
            if path == key or path.startswith(key + "."):
                return f"{option}: {message}" if option != "--set" else f"--set {path}: {message}"
        for key, option in self.overridden.items():
            if key.startswith(path + "."):
                who = f"--set {key}" if option == "--set" else option
                return f"{who}: {path}: {message}"
        return f"{self}: {path}: {message}"

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.blame(path, message))


def blame(source: str, path: str, message: str) -> str:
    """`source: path: message`, or the command-line option that set `path` when `source` is a
    ConfigSource (build errors use this: they only see the resolved config)."""
    if isinstance(source, ConfigSource):
        return source.blame(path, message)
    return f"{source}: {path}: {message}"


# Common names for a choice that difflib would not map to the right one (`gpu` is closer to
# `cpu` than to `cuda` by spelling).
_ALIASES = {
    "gpu": "cuda", "nvidia": "cuda",
    "host": "cpu", "numpy": "cpu",
    "fp32": "float32", "float": "float32", "single": "float32",
    "fp64": "float64", "double": "float64",
    "cross_entropy": "softmax_cross_entropy", "crossentropy": "softmax_cross_entropy",
    "ce": "softmax_cross_entropy", "xent": "softmax_cross_entropy", "l2": "mse",
    "sgdm": "momentum", "nag": "nesterov",
}


def _alias(value: str) -> str | None:
    """The name `value` is a common alias of (`gpu1` -> `cuda:1`), or None."""
    numbered = re.fullmatch(r"(?:cuda|gpu)[:_-]?(\d+)", value.lower())
    return f"cuda:{numbered[1]}" if numbered else _ALIASES.get(value.lower())


def _matches_pattern(value: str, field: Field) -> bool:
    return field.pattern is not None and re.fullmatch(field.pattern, value) is not None


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `optimizer:` section would quietly replace the first). The whole
    document is checked before it is built, in file order: PyYAML builds nested mappings
    last, so checking while building reported a later duplicate before an earlier one."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique_keys(node, set())
        return super().construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: already checked (and may be recursive)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                self._check_unique_keys(child, seen)
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    before = first.get(key)
                except TypeError:  # unhashable: the base class reports it
                    before = None
                else:
                    first.setdefault(key, line)
                if before is not None:
                    where = f"lines {before} and {line}" if before != line else f"twice on line {line}"
                    raise _DuplicateKey(f"duplicate key {key!r} ({where})")
            self._check_unique_keys(value_node, seen)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known keys: " + ", ".join(sorted(options))


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _coerce(value: Any, field: Field, path: str, ctx: ConfigSource) -> Any:
    """Return the value converted to one of the field's types, or raise."""
    for t in field.types:
        ok, v = _try_type(value, t)
        if ok:
            _check_value(v, field, path, ctx)
            return v
    if field.types == ("list[dict]",) and isinstance(value, list):
        # name the item, not the whole list (a whole model's layers in one line)
        i = next(i for i, item in enumerate(value) if not isinstance(item, dict))
        got = "null" if value[i] is None else f"{_type_name(value[i])} {value[i]!r}"
        raise ctx.fail(f"{path}.{i}", f"expected a mapping such as {{type: dense, units: 10}}, got {got}")
    want = " or ".join(field.types)
    raise ctx.fail(path, f"expected {want}, got {_type_name(value)} {value!r}")


def _try_type(value: Any, t: str) -> tuple[bool, Any]:
    if t == "null":
        return value is None, None
    if t == "bool":
        return isinstance(value, bool), value
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if t == "float":
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if t == "str":
        return isinstance(value, str), value
    if t in ("list[int]", "pair"):
        if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            if t == "pair" and len(value) != 2:
                return False, None
            return True, list(value)
        return False, None
    if t == "list[str]":
        return isinstance(value, list) and all(isinstance(i, str) for i in value), value
    if t == "list[dict]":
        return isinstance(value, list) and all(isinstance(i, dict) for i in value), value
    raise AssertionError(t)


def _check_value(v: Any, field: Field, path: str, ctx: ConfigSource) -> None:
    extra_ok = isinstance(v, str) and _matches_pattern(v, field)
    if field.choices is not None and v not in field.choices and not extra_ok:
        names = [str(c) for c in field.choices if c is not None]
        hint = _suggest(str(v), names) if isinstance(v, str) else ""
        alias = _alias(v) if isinstance(v, str) else None
        if alias is not None and (alias in names or _matches_pattern(alias, field)):
            hint = f"did you mean '{alias}'?"
        hint = f" ({hint})" if hint.startswith("did") else ""
        raise ctx.fail(path, f"{v!r} is not one of {', '.join(names)}{hint}")
    if field.minimum is not None or field.maximum is not None:
        nums = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else (
            v if isinstance(v, list) else [])
        for n in nums:
            if not isinstance(n, (int, float)):
                continue
            if isinstance(n, float) and not math.isfinite(n):  # .nan passes every comparison
                raise ctx.fail(path, f"must be a finite number, got {n}")
            if field.minimum is not None and (n < field.minimum or (field.exclusive_min and n == field.minimum)):
                rel = ">" if field.exclusive_min else ">="
                raise ctx.fail(path, f"must be {rel} {field.minimum:g}, got {n!r}")
            if field.maximum is not None and (n > field.maximum or (field.exclusive_max and n == field.maximum)):
                rel = "<" if field.exclusive_max else "<="
                raise ctx.fail(path, f"must be {rel} {field.maximum:g}, got {n!r}")


def _validate_section(raw: Any, spec: dict[str, Any], path: str, ctx: ConfigSource) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.fail(path or "(top level)", f"expected a mapping of keys, got {_type_name(raw)} {raw!r}")
    for key in raw:
        if key not in spec:
            where = f"{path}.{key}" if path else str(key)
            raise ctx.fail(where, f"unknown key ({_suggest(str(key), list(spec))})")
    out: dict[str, Any] = {}
    for key, field in spec.items():
        where = f"{path}.{key}" if path else key
        if isinstance(field, dict):
            out[key] = _validate_section(raw.get(key), field, where, ctx)
        elif key in raw:
            out[key] = _coerce(raw[key], field, where, ctx)
        elif field.default is REQUIRED:
            raise ctx.fail(where, "is required")
        else:
            out[key] = copy.deepcopy(field.default)
    return out


def _validate_layers(layers: list[dict[str, Any]], ctx: ConfigSource) -> list[dict[str, Any]]:
    if not layers:
        raise ctx.fail("model.layers", "needs at least one layer")
    out = []
    for i, raw in enumerate(layers):
        path = f"model.layers.{i}"
        kind = raw.get("type")
        if kind is None:
            raise ctx.fail(f"{path}.type", f"is required (one of {', '.join(LAYERS)})")
        if kind not in LAYERS:
            raise ctx.fail(f"{path}.type", f"unknown layer type {kind!r} ({_suggest(str(kind), list(LAYERS))})")
        body = {k: v for k, v in raw.items() if k != "type"}
        layer = _validate_section(body, LAYERS[kind], path, ctx)
        out.append({"type": kind, **layer})
    return out


def _normalise_shorthands(raw: dict[str, Any]) -> None:
    """`loss: mse` and `optimizer: sgd` are accepted as {name: ...}."""
    for key in ("loss", "optimizer", "schedule"):
        if isinstance(raw.get(key), str):
            raw[key] = {"name": raw[key]}


def validate(raw: Any, source: str = "<config>") -> dict[str, Any]:
    """Validate a raw config mapping; return the resolved config (defaults filled). Errors
    name `source` (a ConfigSource also knows which keys the command line set)."""
    ctx = source if isinstance(source, ConfigSource) else ConfigSource(source)
    if not isinstance(raw, dict):
        raise ctx.fail("(top level)", f"a config must be a mapping of sections, got {_type_name(raw)}")
    raw = copy.deepcopy(raw)
    _normalise_shorthands(raw)
    cfg = _validate_section(raw, ROOT, "", ctx)
    cfg["model"]["layers"] = _validate_layers(cfg["model"]["layers"], ctx)
    shape = cfg["model"]["input_shape"]
    if shape is not None and (len(shape) not in (1, 3) or min(shape) < 1):
        raise ctx.fail("model.input_shape",
                       f"expected [features] or [channels, height, width] of positive ints, got {shape}")
    val = cfg["data"]["val_split"]
    if isinstance(val, float) and not 0.0 <= val < 1.0:
        raise ctx.fail("data.val_split", f"a fraction must be in [0, 1), got {val}")
    _check_data_source(cfg["data"], ctx)
    _absolute_paths(cfg)
    return cfg


def _absolute_paths(cfg: dict[str, Any]) -> None:
    """data.root, data.path, data.paths and model.init_from made absolute (relative ones are
    read from the current directory): the run saves this config, and `eval`, `predict`,
    `export` or `train --resume` run from another directory must find the same files."""
    def absolute(p: str | None) -> str | None:
        return None if p is None else os.path.abspath(os.path.expanduser(p))

    data = cfg["data"]
    data["root"], data["path"] = absolute(data["root"]), absolute(data["path"])
    data["paths"] = {k: absolute(v) for k, v in data["paths"].items()}
    cfg["model"]["init_from"] = absolute(cfg["model"]["init_from"])


def _check_data_source(data: dict[str, Any], ctx: ConfigSource) -> None:
    """data.path goes with npz, data.paths with idx, data.classes with either."""
    kind = data["dataset"]
    given_paths = [k for k, v in data["paths"].items() if v is not None]
    if kind == "npz" and data["path"] is None:
        raise ctx.fail("data.path", "is required with data.dataset npz (a .npz file holding "
                       "x_train, y_train, x_test, y_test)")
    if kind == "idx":
        missing = [k for k in data["paths"] if k not in given_paths]
        if missing:
            raise ctx.fail(f"data.paths.{missing[0]}", "is required with data.dataset idx "
                           f"(missing: {', '.join(missing)})")
    if kind != "npz" and data["path"] is not None:
        raise ctx.fail("data.path", f"is only read with data.dataset npz, not {kind!r}")
    if kind != "idx" and given_paths:
        raise ctx.fail(f"data.paths.{given_paths[0]}", f"is only read with data.dataset idx, not {kind!r}")
    if kind not in ("npz", "idx") and data["classes"] is not None:
        raise ctx.fail("data.classes", f"is only read with data.dataset npz or idx; {kind!r} has its own")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'trainer.epochs=3' -> (['trainer', 'epochs'], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value, e.g. --set trainer.epochs=3")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: empty key")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except _DuplicateKey as exc:
        raise ConfigError(f"--set {text}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), parsed


def apply_override(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            idx = _list_index(node, part, parts[: i + 1])
            node = node[idx]
            continue
        if not isinstance(node.get(part), (dict, list)):  # shorthands were expanded before overrides
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, path: list[str]) -> int:
    dotted = ".".join(path)
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {dotted}: {part!r} is not an index into a list of {len(node)} items")
    return int(part)


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply --set overrides, validate.

    `options` maps other command-line options to the override they stand for, e.g.
    {"--device": "device=cpu"}; they are applied last and errors about them name the option."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror})") from None
    try:
        raw = _load_yaml(text)
    except _DuplicateKey as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}:{where}: invalid YAML ({problem})") from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        _normalise_shorthands(raw)
    if isinstance(raw, dict):
        for _, item in _labelled(overrides, options):
            apply_override(raw, *parse_override(item))
    return validate(raw, command_line_source(p, overrides, options))


def _labelled(overrides: list[str] | None, options: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [("--set", item) for item in overrides or []] + list((options or {}).items())


def command_line_source(path: str | Path, overrides: list[str] | None = None,
                        options: Mapping[str, str] | None = None) -> ConfigSource:
    """`path` as a ConfigSource that knows which keys `overrides` (--set) and `options` (see
    load_config) set: pass it as the `source` of Trainer/build_model so that their errors
    blame the command line when it set the key."""
    keys = {".".join(parse_override(item)[0]): option for option, item in _labelled(overrides, options)}
    return ConfigSource(str(path), keys)


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = list(dict.fromkeys([*a.keys(), *b.keys()]))
    out: list[str] = []
    for k in keys:
        path = f"{prefix}.{k}" if prefix else str(k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, path)
        elif isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb) and all(
                isinstance(x, dict) for x in va + vb):
            for i, (xa, xb) in enumerate(zip(va, vb)):
                out += config_diff(xa, xb, f"{path}.{i}")
        elif va != vb:
            out.append(path)
    return out
