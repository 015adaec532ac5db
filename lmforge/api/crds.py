"""Generate CustomResourceDefinitions from the API models (`make crds`).

pydantic's JSON schema is turned into a Kubernetes *structural* OpenAPI v3
schema: references inlined, optional fields unwrapped (no nulls), int-or-string
quantities marked, titles dropped, every field described, CEL rules attached.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

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
    return out


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
