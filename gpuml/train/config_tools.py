"""`gpuml config show CONFIG [--set ...]` (the resolved config as YAML) and `gpuml config schema`
(a JSON Schema, draft 2020-12, generated from gpuml.train.schema with its doc strings as
descriptions, for editors and CI linters)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gpuml.train.schema import LAYERS, REQUIRED, ROOT, Field

DRAFT = "https://json-schema.org/draft/2020-12/schema"
#: PyYAML reads 1e-3 (no dot) as a string; the config loader accepts it as a float, so does this.
FLOAT_STRING = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
#: Sections that may also be given as just their `name` (`optimizer: sgd`).
SHORTHANDS = ("loss", "optimizer", "schedule")


def _number_bounds(field: Field) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if field.minimum is not None:
        out["exclusiveMinimum" if field.exclusive_min else "minimum"] = field.minimum
    if field.maximum is not None:
        out["exclusiveMaximum" if field.exclusive_max else "maximum"] = field.maximum
    return out


def _type_schema(t: str, field: Field) -> dict[str, Any]:
    bounds = _number_bounds(field)
    if t == "int":
        return {"type": "integer", **bounds}
    if t == "float":
        return {"anyOf": [{"type": "number", **bounds}, {"type": "string", "pattern": FLOAT_STRING}]}
    if t == "bool":
        return {"type": "boolean"}
    if t == "str":
        return {"type": "string"}
    if t == "null":
        return {"type": "null"}
    if t == "list[int]":
        return {"type": "array", "items": {"type": "integer", **bounds}}
    if t == "list[str]":
        return {"type": "array", "items": {"type": "string"}}
    if t == "pair":
        return {"type": "array", "items": {"type": "integer", **bounds}, "minItems": 2, "maxItems": 2}
    if t == "list[dict]":
        return {"type": "array", "items": {"type": "object"}}
    return {}  # a type this generator does not know yet: accept anything rather than lie


def field_schema(field: Field) -> dict[str, Any]:
    options = [_type_schema(t, field) for t in field.types]
    out: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if field.choices is not None:
        out = {"enum": list(field.choices)}
        if getattr(field, "pattern", None):
            out = {"anyOf": [out, {"type": "string", "pattern": f"^(?:{field.pattern})$"}]}
    if field.doc:
        out["description"] = field.doc
    if field.default is not REQUIRED:
        out["default"] = field.default
    return out


def section_schema(spec: dict[str, Any], nullable: bool = True) -> dict[str, Any]:
    props = {k: section_schema(v) if isinstance(v, dict) else field_schema(v) for k, v in spec.items()}
    required = [k for k, v in spec.items() if isinstance(v, Field) and v.default is REQUIRED]
    out: dict[str, Any] = {"type": ["object", "null"] if nullable else "object", "properties": props,
                           "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def config_json_schema() -> dict[str, Any]:
    """The whole config as a JSON Schema (draft 2020-12)."""
    root = section_schema(ROOT, nullable=False)
    props = root["properties"]
    for key in SHORTHANDS:
        names = ROOT[key]["name"].choices
        props[key] = {"anyOf": [{"type": "string", "enum": list(names)}, props[key]]}
    layers = []
    for kind, spec in LAYERS.items():
        s = section_schema(spec, nullable=False)
        s["properties"] = {"type": {"const": kind}, **s["properties"]}
        s["required"] = ["type", *s.get("required", [])]
        layers.append(s)
    model = props["model"]["properties"]
    model["layers"] = {"type": "array", "minItems": 1, "items": {"oneOf": layers},
                       "description": model["layers"].get("description", "the layers, in order")}
    return {"$schema": DRAFT, "title": "gpuml run config", **root}


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show a resolved config, or the config's JSON Schema")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print CONFIG with every default filled in and --set applied (YAML)")
    show.add_argument("config", help="YAML config, a seed config's name (mlp, cnn, ...) or a run folder")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable)")
    show.set_defaults(func=cmd_config_show)
    schema = csub.add_parser("schema", help="print the config's JSON Schema (draft 2020-12)")
    schema.set_defaults(func=cmd_config_schema)


def cmd_config_show(args: argparse.Namespace) -> int:
    from gpuml.cli import resolve_config
    from gpuml.errors import ConfigError
    from gpuml.train.config import dump_config, load_config

    path = Path(args.config)
    if path.is_dir():  # a run folder: the config it was trained with
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: a folder without config.yaml (not a run folder); give a YAML config")
        path = path / "config.yaml"
    sys.stdout.write(dump_config(load_config(resolve_config(str(path)), args.overrides)))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(), indent=2))
    return 0
