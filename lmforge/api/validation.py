"""Local validation of LMForge objects with API-server-style messages.

`lmforge validate FILE.yaml` and `lmforge run` use this: the same pydantic
models and the same cross-field rules as the CRDs, with each problem reported as
`FILE:LINE: spec.path.to.field: what is wrong`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.api.base import API_VERSION, ApiModel
from lmforge.api.kinds import KINDS, KubernetesObject


@dataclass(frozen=True)
class Problem:
    """One validation failure, located by field path (and line, when read from a file)."""

    path: str
    message: str
    line: int | None = None

    def render(self, file: str | None = None) -> str:
        where = f"{file}:{self.line}: " if file and self.line else (f"{file}: " if file else "")
        return f"{where}{self.path}: {self.message}"


class InvalidObject(Exception):
    """Raised with every problem found in one object."""

    def __init__(self, problems: list[Problem], file: str | None = None, kind: str = "") -> None:
        self.problems = problems
        self.file = file
        self.kind = kind
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.kind} is invalid:" if self.kind else "invalid object:"
        return "\n".join([head, *("  " + p.render(self.file) for p in self.problems)])


def parse_object(data: Any) -> KubernetesObject:
    """Validate one decoded object; raise InvalidObject listing every problem."""
    if not isinstance(data, dict):
        raise InvalidObject([Problem("<root>", "expected a mapping with apiVersion and kind")])
    kind = data.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        supported = ", ".join(sorted(KINDS))
        raise InvalidObject(
            [Problem("kind", f"Unsupported value: {kind!r}: supported: {supported}")]
        )
    if data.get("apiVersion") != API_VERSION:
        raise InvalidObject(
            [
                Problem(
                    "apiVersion",
                    f"Unsupported value: {data.get('apiVersion')!r}: supported: {API_VERSION!r}",
                )
            ],
            kind=cls.kind_name,
        )
    try:
        obj = cls.model_validate(data)
    except ValidationError as err:
        raise InvalidObject([_from_pydantic(e) for e in err.errors()], kind=cls.kind_name) from None
    problems = list(rule_problems(obj))
    if problems:
        raise InvalidObject(problems, kind=cls.kind_name)
    return obj


def rule_problems(model: BaseModel, path: str = "") -> Iterator[Problem]:
    """Evaluate every cross-field rule in the object tree, outermost first."""
    if isinstance(model, ApiModel):
        for rule in model.rules:
            if rule.check is not None and not rule.check(model):
                field = ".".join(p for p in (path, rule.field) if p)
                yield Problem(field or "<root>", f"Invalid value: {rule.message}")
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = info.alias or name
        sub = f"{path}.{key}" if path else key
        if isinstance(value, BaseModel):
            yield from rule_problems(value, sub)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from rule_problems(item, f"{sub}[{i}]")


_UNION_BRANCHES = {"int", "str", "float", "bool"}


def _format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_BRANCHES or "[" in str(part):
            continue  # pydantic's union branch tags (int, function-after[...]) are no field
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _from_pydantic(error: Any) -> Problem:
    path = _format_path(tuple(error["loc"]))
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "missing":
        return Problem(path, "Required value")
    if kind == "extra_forbidden":
        return Problem(path, "field not declared in schema (unknown field)")
    if kind in ("literal_error", "enum"):
        expected = error.get("ctx", {}).get("expected", "")
        return Problem(path, f"Unsupported value: {value!r}: supported values: {expected}")
    return Problem(path, f"Invalid value: {value!r}: {msg}")


# ---------------------------------------------------------------- files


def _node_line(root: yaml.Node | None, path: str) -> int | None:
    """1-based line of the deepest node along a field path in a composed YAML document."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in _split_path(path):
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, val in node.value:
                if key.value == part:
                    nxt, line = val, key.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and len(node.value) > part
        ):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.replace("[", ".[").split("."):
        if not chunk:
            continue
        parts.append(int(chunk[1:-1]) if chunk.startswith("[") else chunk)
    return parts


def load_file(path: str | Path) -> list[KubernetesObject]:
    """Read and validate every LMForge document in a YAML file.

    Raises InvalidObject whose problems carry the file name and line numbers.
    """
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InvalidObject([Problem("<file>", f"cannot read: {err.strerror}")], file) from None
    try:
        nodes = list(yaml.compose_all(text))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InvalidObject([Problem("<yaml>", f"not valid YAML: {err}", line)], file) from None
    objects, problems, kinds = [], [], []
    for node, doc in zip(nodes, docs, strict=True):
        if doc is None:
            continue
        try:
            objects.append(parse_object(doc))
        except InvalidObject as err:
            kinds.append(err.kind)
            problems += [Problem(p.path, p.message, _node_line(node, p.path)) for p in err.problems]
    if problems:
        raise InvalidObject(problems, file, kind=", ".join(k for k in kinds if k))
    if not objects:
        raise InvalidObject([Problem("<file>", "no LMForge object found")], file)
    return objects
