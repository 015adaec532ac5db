"""Building blocks of the LMForge API models.

Every CR field is declared once, on a pydantic model. The same models generate
the CRDs (`lmforge.api.crds`), validate files locally (`lmforge.api.validation`)
and feed the operator's renderers and the trainer's run config.

Cross-field rules are declared as `Rule`s: a CEL expression the API server
evaluates (`x-kubernetes-validations`) next to the Python predicate that local
validation evaluates. The invalid-CR catalogue in the tests runs every rule
through both, so the two sides cannot drift apart silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

GROUP = "lmforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule, enforced by the API server and locally.

    `cel` is evaluated with `self` bound to the model's object; `check` gets the
    parsed model and returns True when the object is valid. `field` is the
    offending field relative to the model (camelCase, dotted), named in errors.
    Transition rules (`oldSelf`) have no `check`: they only exist on update.
    """

    cel: str
    message: str
    field: str = ""
    check: Callable[[Any], bool] | None = None


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        if cls.rules:
            target["x-kubernetes-validations"] = [_cel_entry(r) for r in cls.rules]
        return json_schema

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase keys, unset fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _cel_entry(rule: Rule) -> dict[str, str]:
    entry = {"rule": rule.cel, "message": rule.message}
    if rule.field:
        entry["fieldPath"] = "." + rule.field
    return entry


# A Kubernetes resource quantity ("500m", "16Gi", 4); int-or-string in the schema.
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i?|[mkMGTPE])?$"


def field_(description: str, default: Any = ..., **kwargs: Any) -> Any:
    """`pydantic.Field` with a mandatory description (every CRD field has one)."""
    if "default_factory" in kwargs:
        # Show the factory's value as the schema default (the API server applies it).
        value = kwargs["default_factory"]()
        if value:
            kwargs.setdefault("json_schema_extra", {"default": value})
        return Field(description=description, **kwargs)
    return Field(default, description=description, **kwargs)


def object_field(model: type[BaseModel], description: str) -> Any:
    """A nested object that may be omitted: it defaults to the model's own defaults.

    The schema default is spelled out in full (not `{}`): the API server checks
    defaults against the CEL rules without applying nested defaults first.
    """
    default = model().model_dump(by_alias=True, exclude_none=True, mode="json")
    return Field(
        default_factory=model, description=description, json_schema_extra={"default": default}
    )
