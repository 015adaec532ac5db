"""Each image's entrypoint names a command that exists (a typo would only show on a cluster)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.serve.run import build_parser as serve_parser

IMAGES = Path(__file__).resolve().parents[2] / "images"


def _instruction(dockerfile: Path, name: str) -> list[str]:
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", dockerfile.read_text(), re.MULTILINE)
    return list(json.loads(found[-1])) if found else []


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices or ())


@pytest.mark.parametrize("dockerfile", sorted(IMAGES.glob("*.Dockerfile")), ids=lambda p: p.stem)
def test_entrypoint_names_a_real_command(dockerfile: Path) -> None:
    argv = _instruction(dockerfile, "ENTRYPOINT") + _instruction(dockerfile, "CMD")
    assert argv, f"{dockerfile.name} has no exec-form ENTRYPOINT"
    if argv[0] == "lmforge":
        assert argv[1] in _subcommands(), f"{dockerfile.name}: `lmforge {argv[1]}` does not exist"
        if argv[1] == "serve":
            args = serve_parser().parse_args(argv[2:])
            assert args.config or args.file
    else:
        assert argv[:2] in (["python", "-m"], ["python3", "-m"]), argv
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"


def test_inferencer_pods_run_the_image_entrypoint() -> None:
    from lmforge.operator.serving.render import ServingTarget, render_children

    from lmforge.api.validation import load_file

    (service,) = load_file(Path(__file__).resolve().parents[2] / "examples/inferenceservice.yaml")
    target = ServingTarget(
        service,  # type: ignore[arg-type]
        "ns",
        "uid",
        {"model": "pvc://models/llama", "adapters[0]": "", "adapters[1]": ""},
    )
    (deployment,) = render_children(target).of_kind("Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    dockerfile = IMAGES / "inferencer.Dockerfile"
    assert command == _instruction(dockerfile, "ENTRYPOINT") + _instruction(dockerfile, "CMD")
