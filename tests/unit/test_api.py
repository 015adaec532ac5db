"""The API models: CRD generation, local validation, examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.api import KINDS, FinetuneJob
from lmforge.api.crds import render_crd, render_crd_files
from lmforge.api.validation import InvalidObject, load_file, parse_object
from tests.catalogue import BASE, CASES, Case

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_committed_crds_are_fresh() -> None:
    """`make crds` output is committed: crds/ and the chart's copy match the models."""
    for folder in (ROOT / "crds", ROOT / "charts" / "lmforge" / "crds"):
        for name, text in render_crd_files().items():
            path = folder / name
            assert path.exists(), f"{path} missing: run `make crds`"
            assert path.read_text() == text, f"{path} is stale: run `make crds`"


def _walk(schema: dict, path: str):  # type: ignore[no-untyped-def]
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural_and_described(kind: str) -> None:
    crd = render_crd(KINDS[kind])
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["lmforge"]
    assert crd["spec"]["names"]["shortNames"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Age"} <= columns
    for path, node in _walk(version["schema"]["openAPIV3Schema"], kind):
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        assert "$ref" not in node and "nullable" not in node, path
        if not path.endswith(("[]", "{}")) and path != f"{kind}.metadata":
            assert node.get("description"), f"{path} has no description"


def test_cel_rules_are_attached() -> None:
    schema = render_crd(FinetuneJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = {
        rule["rule"]: path
        for path, node in _walk(schema, "FinetuneJob")
        for rule in node.get("x-kubernetes-validations", [])
    }
    # written against the defaulted object; an absent field reads as the model's default
    qlora = "(has(self.type) ? self.type : \"lora\") == 'qlora' ? has(self.quantization) : true"
    assert rules[qlora] == "FinetuneJob.spec.method"
    immutable = (
        "has(self.model) == has(oldSelf.model) && (!has(self.model) || self.model == oldSelf.model)"
    )
    assert rules[immutable] == "FinetuneJob.spec"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_server_stores_no_defaults(kind: str) -> None:
    """Defaults are the models': none in the schema, each named in its description."""
    schema = render_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = dict(_walk(schema, kind))
    assert not [path for path, node in nodes.items() if "default" in node]
    if kind == "FinetuneJob":
        assert nodes["FinetuneJob.spec.distributed.gpusPerNode"]["description"].endswith(
            "Default: 1."
        )


def test_rules_read_absent_fields_as_their_defaults() -> None:
    from lmforge.api.crds import _absent_safe

    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {"type": "object", "properties": {"n": {"type": "integer", "default": 2}}},
            "b": {
                "type": "object",
                "default": {"x": 0.5},
                "properties": {"x": {"type": "number"}, "y": {"type": "string"}},
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"f": {"type": "string", "default": "auto"}},
                },
            },
        },
    }
    assert _absent_safe("self.a.n > 1", schema) == "(has(self.a.n) ? self.a.n : 2) > 1"
    # a default inherited from the parent object's; has() still means "written"
    assert _absent_safe("self.b.x < 1.0 && !has(self.b.y)", schema) == (
        "((has(self.b) && has(self.b.x)) ? self.b.x : 0.5) < 1.0 && !(has(self.b) && has(self.b.y))"
    )
    assert _absent_safe("self.items.all(i, i.f == 'x.y')", schema) == (
        "self.items.all(i, (has(i.f) ? i.f : \"auto\") == 'x.y')"
    )
    assert _absent_safe("has(self.b) && self.b == oldSelf.b", schema) == (
        "has(self.b) && self.b == oldSelf.b"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate(path: Path) -> None:
    assert load_file(path)


def test_defaults_match_the_api_server() -> None:
    job = parse_object(BASE["FinetuneJob"])
    assert isinstance(job, FinetuneJob)
    assert job.spec.method.type == "lora"
    assert job.spec.distributed.processes == 1
    assert job.spec.method.lora.target_modules == ["all-linear"]
    assert job.spec.dataset.sources[0].format == "auto"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue_rejected_locally(case: Case) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(case.build())
    paths = [p.path for p in err.value.problems]
    assert any(p == case.field or p.startswith(case.field) for p in paths), (case.field, paths)


def test_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    doc = BASE["FinetuneJob"] | {
        "spec": {**BASE["FinetuneJob"]["spec"], "method": {"type": "qlora", "lora": {"rank": -2}}}
    }
    good = BASE["InferenceService"]
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([good, doc], sort_keys=False))
    with pytest.raises(InvalidObject) as err:
        load_file(path)
    text = err.value.render()
    lines = path.read_text().splitlines()
    rank_line = next(i for i, line in enumerate(lines, 1) if "rank: -2" in line)
    assert f"{path}:{rank_line}: spec.method.lora.rank: Invalid value: -2" in text


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: lmforge.io/v1alpha1\nkind: FinetuneJob\nspec: [a\n")
    with pytest.raises(InvalidObject) as err:
        load_file(path)
    assert f"{path}:" in err.value.render() and "not valid YAML" in err.value.render()


def test_unknown_kind_is_named() -> None:
    with pytest.raises(InvalidObject, match="kind: Unsupported value: 'TrainJob'"):
        parse_object({"apiVersion": "lmforge.io/v1alpha1", "kind": "TrainJob"})
