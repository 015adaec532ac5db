"""Generate CustomResourceDefinitions from the API models (`make crds`).

pydantic's JSON schema is turned into a Kubernetes *structural* OpenAPI v3
schema: references inlined, optional fields unwrapped (no nulls), int-or-string
quantities marked, titles dropped, every field described, CEL rules attached.

Defaults are the models' and the operator's, not the API server's: the schema
carries no `default`, so the server stores a job as it was written (a defaulted
FinetuneJob was ten times larger, and each write of it cost the server twice the
CPU). Each field's description names its default, for `kubectl explain`. The CEL
rules are written against the defaulted object, as the Python checks see it;
`_absent_safe` rewrites every field they read that may be absent into a read
with the model's default, e.g. `(has(self.d) && has(self.d.nodes) ? self.d.nodes : 1)`.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lmforge.api.base import GROUP, VERSION
from lmforge.api.kinds import KINDS, KubernetesObject

CATEGORY = "lmforge"
_DROP = {"title", "$defs", "additionalProperties", "discriminator"}


def crd_file_name(cls: type[KubernetesObject]) -> str:
    """File name of a kind's CRD, as controller-gen names them."""
    return f"{GROUP}_{cls.plural}.yaml"


def structural_schema(cls: type[KubernetesObject]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a kind, ready for a CRD version."""
    raw = cls.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = _convert(raw, defs, path=cls.kind_name)
    props = schema["properties"]
    # The API server owns metadata's schema; only name may be constrained by rules.
    props["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string", "description": "Object name."}},
    }
    props["apiVersion"] = {"type": "string", "description": props["apiVersion"]["description"]}
    props["kind"] = {"type": "string", "description": props["kind"]["description"]}
    schema["required"] = ["spec"]
    _move_defaults_to_descriptions(schema)
    return schema


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _unwrap_any_of(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out["properties"] = {
                name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema's numeric form -> OpenAPI v3.0's bound plus boolean flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = copy.deepcopy(value)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" not in node:
        if extra:
            out["additionalProperties"] = _convert(extra, defs, f"{path}{{}}")
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    elif "type" not in out:
        raise ValueError(f"{path}: no structural type in {node}")
    if "description" not in out and not path.endswith(("[]", "{}")):
        raise ValueError(f"{path}: every field needs a description")
    for entry in out.get("x-kubernetes-validations", []):
        entry["rule"] = _absent_safe(entry["rule"], out)
    return out


def _move_defaults_to_descriptions(node: dict[str, Any]) -> None:
    """Drop every `default`; a scalar's or list's is named in its description instead
    (an object's defaults are its fields')."""
    default = node.pop("default", None)
    if default is not None and node.get("type") != "object" and "description" in node:
        node["description"] = f"{node['description'].rstrip()} Default: {json.dumps(default)}."
    for sub in node.get("properties", {}).values():
        _move_defaults_to_descriptions(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _move_defaults_to_descriptions(node[key])


# a field chain (`self.a.b`, `oldSelf.a`, a macro's variable `s.format`), maybe inside has()
_CHAIN = re.compile(r"(?<![\w.?])(has\()?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\))?")
_MACRO = re.compile(r"([A-Za-z_][\w.]*)\.(?:all|exists|exists_one|filter|map)\((\w+)\s*,")
_STRING = re.compile(r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


def _absent_safe(rule: str, schema: dict[str, Any]) -> str:
    """A CEL rule over the defaulted object, rewritten to hold when defaulted fields are
    absent: a scalar field with a default that may be absent reads as
    `(has(self.a) && has(self.a.b) ? self.a.b : default)`, and `has()` of a field whose
    parent may be absent checks the parent first. `has()` keeps its meaning (the field was
    written); fields without a default, and objects, are read as written: rules read them
    only under a `has()` guard. (CEL's optional form, `self.?a.?b.orValue(1)`, would say
    the same, but the API server's cost estimate cannot bound it.)"""
    scopes: dict[str, dict[str, Any]] = {"self": schema, "oldSelf": schema}
    for chain, var in _MACRO.findall(rule):  # a list macro's variable is the list's item
        fields, rest = _fields(chain.split("."), scopes)
        if fields and not rest and "items" in fields[-1].schema:
            scopes[var] = fields[-1].schema["items"]

    def rewrite(match: re.Match[str]) -> str:
        in_has = bool(match.group(1) and match.group(3))
        names = match.group(2).split(".")
        fields, rest = _fields(names, scopes)
        if not fields:
            return match.group(0)
        path = ".".join(names[: len(fields) + 1])
        if in_has and not rest:
            return _present(names[0], fields) if len(fields) > 1 else match.group(0)
        leaf = fields[-1]
        may_be_absent = not all(f.required for f in fields)
        if leaf.default is None or not may_be_absent or leaf.schema.get("type") in SUBTREES:
            return match.group(0)
        value = f"({_present(names[0], fields)} ? {path} : {_cel_literal(leaf)})"
        tail = "".join(f".{r}" for r in rest)
        return (match.group(1) or "") + value + tail + (match.group(3) or "")

    # string literals are left alone
    parts = _STRING.split(rule)
    return "".join(p if i % 2 else _CHAIN.sub(rewrite, p) for i, p in enumerate(parts))


def _present(root: str, fields: list[SchemaField]) -> str:
    """CEL that is true when every field of the chain is present (a required field is,
    when its parent is)."""
    paths = [".".join([root, *(f.name for f in fields[: i + 1])]) for i in range(len(fields))]
    checks = [f"has({p})" for p, f in zip(paths, fields, strict=True) if not f.required]
    return f"({' && '.join(checks)})" if len(checks) > 1 else (checks or ["true"])[0]


class SchemaField(NamedTuple):
    name: str
    schema: dict[str, Any]
    required: bool
    default: Any  # its own, or the one its parent's default object gives it


SUBTREES = ("object", "array")


def _fields(
    names: list[str], scopes: dict[str, dict[str, Any]]
) -> tuple[list[SchemaField], list[str]]:
    """The schema fields a chain (`self.a.b`) reads, and the rest (methods, unknown)."""
    node = scopes.get(names[0])
    if node is None:
        return [], names[1:]
    fields: list[SchemaField] = []
    inherited: Any = None
    for i, name in enumerate(names[1:], 1):
        props = node.get("properties", {})
        if name not in props:
            return fields, names[i:]
        sub = props[name]
        inherited = inherited.get(name) if isinstance(inherited, dict) else None
        default = sub.get("default", inherited)
        fields.append(SchemaField(name, sub, name in node.get("required", []), default))
        inherited, node = default, sub
    return fields, []


def _cel_literal(field: SchemaField) -> str:
    if field.schema.get("type") == "number" and isinstance(field.default, int | float):
        return repr(float(field.default))  # CEL has no int-to-double promotion
    return json.dumps(field.default)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref (keeping sibling keys such as description and default)."""
    if "$ref" not in node:
        return node
    target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    if "description" in siblings and "description" in target:
        target.pop("description")
    target.update(siblings)
    return target


def _unwrap_any_of(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Optional[X] -> X; int | str (quantities) -> int-or-string."""
    options = [_resolve(o, defs) for o in node["anyOf"] if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if node.get("x-kubernetes-int-or-string"):
        return rest
    if len(options) != 1:
        raise ValueError(f"{path}: unions other than Optional are not structural: {options}")
    merged = dict(options[0])
    if "description" in rest:
        merged.pop("description", None)
    merged.update(rest)
    return merged


def render_crd(cls: type[KubernetesObject]) -> dict[str, Any]:
    """The CustomResourceDefinition object of a kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{cls.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": cls.kind_name,
                "listKind": f"{cls.kind_name}List",
                "plural": cls.plural,
                "singular": cls.kind_name.lower(),
                "shortNames": list(cls.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(cls.printer_columns),
                    "schema": {"openAPIV3Schema": structural_schema(cls)},
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from lmforge.api; do not edit.\n"


def render_crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    return {
        crd_file_name(cls): HEADER + yaml.safe_dump(render_crd(cls), sort_keys=False, width=100)
        for cls in KINDS.values()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", action="append", required=True, help="folder to write into")
    args = parser.parse_args(argv)
    for out in args.out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in render_crd_files().items():
            (folder / name).write_text(text)
            print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
