"""Every model a spec refers to, found in one place.

A job's base model, an AlignmentJob's reference and reward models, an
InferenceService's adapters and draft model are all `ModelSource`s. The
operator (wait for `fromJob`, mount, fetch), `lmforge run` (resolve against
local outputs) and the run config (where the trainer finds each one) all go
through `model_references`, so a new model field needs no new plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmforge.api.common import ModelSource


@dataclass(frozen=True)
class ModelReference:
    """One model reference: where in the spec it is written, and what it says."""

    field: str  # spec path as the user writes it: model, method.rewards[0].model, adapters[1]
    source: ModelSource


def model_references(spec: BaseModel, prefix: str = "") -> list[ModelReference]:
    """All model references in `spec`, in field order (the base model first)."""
    found: list[ModelReference] = []
    for name, info in type(spec).model_fields.items():
        found += _walk(getattr(spec, name), f"{prefix}{info.alias or name}")
    return found


def _walk(value: Any, path: str) -> list[ModelReference]:
    if isinstance(value, ModelSource):
        return [ModelReference(path, value)]
    if isinstance(value, BaseModel):
        return model_references(value, f"{path}.")
    if isinstance(value, list):
        return [ref for i, item in enumerate(value) for ref in _walk(item, f"{path}[{i}]")]
    return []


def reference_slug(field: str) -> str:
    """A file/volume-name-safe form of a reference's field path (method.rewards[0].model ->
    method-rewards-0-model)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in field)
    return "-".join(part for part in out.split("-") if part)
