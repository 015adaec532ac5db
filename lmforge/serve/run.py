"""`lmforge serve`: serve an InferenceService YAML here, or run a pod's replica.

Locally (`lmforge serve FILE.yaml`) the service is validated like `lmforge run` validates
jobs, model and adapter locations resolve the same way (file:// and relative paths against
the YAML file, `fromJob` to ./lmforge-runs/<kind>/<name>/final), and the desired adapter set
is re-resolved whenever the YAML file changes. In a pod (`lmforge serve --config FILE`)
everything is resolved already: the operator mounts the serving config and keeps the
desired adapter set in a ConfigMap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from lmforge.api.kinds import InferenceService
from lmforge.api.servingconfig import (
    AdapterSet,
    DesiredAdapter,
    ServingConfig,
    resolve_serving_config,
)
from lmforge.api.validation import InvalidObject, load_file
from lmforge.local import DEFAULT_RUNS, LocalRunError, job_output_dir, resolve_local_model
from lmforge.serve.supervisor import KubeReporter, Supervisor, cpu_problem

log = logging.getLogger("lmforge.serve")

REPO = Path(__file__).resolve().parents[2]
ENGINE_PYTHON_ENV = "LMFORGE_ENGINE_PYTHON"


def engine_python() -> str:
    """The Python that has the engine: $LMFORGE_ENGINE_PYTHON, the checkout's .venv-serve
    (`make install` creates it), or this one (the inferencer image has one environment)."""
    if explicit := os.environ.get(ENGINE_PYTHON_ENV):
        return explicit
    local = REPO / ".venv-serve" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def load_service(path: Path) -> InferenceService:
    objects = [o for o in load_file(path) if isinstance(o, InferenceService)]
    if len(objects) != 1:
        raise LocalRunError(f"{path}: expected exactly one InferenceService, found {len(objects)}")
    return objects[0]


def local_model_path(service: InferenceService, base: Path, runs: Path) -> str:
    """spec.model as a local directory; a fromJob adapter output serves its merged/ copy."""
    model = service.spec.model
    path = Path(resolve_local_model(model, base, runs, "spec.model"))
    if model.from_job is not None and (path / "adapter_config.json").exists():
        merged = path.parent / "merged"
        if not (merged / "config.json").exists():
            raise LocalRunError(
                f"spec.model.fromJob: {model.from_job.name} produced an adapter, not a model; "
                "serve its base model with the adapter in spec.adapters, or set "
                "method.mergeOnExport on the job"
            )
        return str(merged)
    return str(path)


def local_adapter_set(
    service: InferenceService, base: Path, runs: Path, quiet: bool = False
) -> AdapterSet:
    """The adapters that exist locally; fromJob ones whose job has not finished are left out
    (pending) and get picked up when the YAML file is touched again or the job finishes."""
    desired = []
    for i, adapter in enumerate(service.spec.adapters):
        field = f"spec.adapters[{i}]"
        if adapter.from_job is not None:
            final = job_output_dir(adapter.from_job.kind, adapter.from_job.name, runs) / "final"
            if not (final.parent / "metrics.json").exists():
                if not quiet:
                    log.info("%s (%s): pending until %s exists", field, adapter.name, final)
                continue
        path = resolve_local_model(adapter, base, runs, field)
        desired.append(DesiredAdapter(name=adapter.name, path=path, uri=adapter.source or path))
    return AdapterSet(adapters=desired)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def local_config(
    file: Path, workdir: Path | None, host: str, port: int, runs: Path
) -> tuple[ServingConfig, InferenceService]:
    service = load_service(file)
    base = file.resolve().parent
    workdir = (workdir or job_output_dir("InferenceService", service.name, runs)).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    speculative = service.spec.serving.speculative
    draft = (
        resolve_local_model(speculative.draft_model, base, runs, "spec.serving.speculative")
        if speculative is not None
        else None
    )
    config = resolve_serving_config(
        service,
        model=local_model_path(service, base, runs),
        draft_model=draft,
        adapters_file=str(workdir / "adapters.json"),
        state_file=str(workdir / "state.json"),
        port=port,
        host=host,
    )
    _write_if_changed(Path(config.adapters_file), local_adapter_set(service, base, runs).dumps())
    config.dump(workdir / "serving.json")
    return config, service


def watch_yaml(file: Path, adapters_file: Path, runs: Path, stop: threading.Event) -> None:
    """Re-resolve the desired adapters every few seconds (YAML edits, finished jobs)."""
    base = file.resolve().parent
    while not stop.wait(3):
        try:
            service = load_service(file)
            text = local_adapter_set(service, base, runs, quiet=True).dumps()
        except (InvalidObject, LocalRunError) as err:
            log.error("%s", err)
            continue
        _write_if_changed(adapters_file, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge serve", description=__doc__)
    parser.add_argument("file", nargs="?", help="InferenceService YAML to serve on this machine")
    parser.add_argument("--config", help="resolved serving config (in a pod)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (local runs)")
    parser.add_argument("--port", type=int, default=8000, help="API port (local runs)")
    parser.add_argument(
        "--workdir", help="state folder (default ./lmforge-runs/inferenceservice/NAME)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if (args.file is None) == (args.config is None):
        print("error: give an InferenceService YAML file or --config", file=sys.stderr)
        return 2
    stop_watch = threading.Event()
    reporter = None
    if args.config:
        config = ServingConfig.load(Path(args.config))
        workdir = Path(config.state_file).parent
        if config.report is not None:
            reporter = KubeReporter(config.report, os.environ.get("POD_NAME", "replica"))
    else:
        try:
            config, service = local_config(
                Path(args.file),
                Path(args.workdir) if args.workdir else None,
                args.host,
                args.port,
                DEFAULT_RUNS,
            )
        except InvalidObject as err:
            print(err.render(), file=sys.stderr)
            return 1
        except LocalRunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        workdir = Path(config.state_file).parent
        if config.engine.device == "cpu" and (problem := cpu_problem(Path(config.model))):
            print(f"error: {problem}", file=sys.stderr)
            return 1
        threading.Thread(
            target=watch_yaml,
            args=(Path(args.file), Path(config.adapters_file), DEFAULT_RUNS, stop_watch),
            daemon=True,
        ).start()
        print(
            f"serving {service.name} on http://{config.host}:{config.port}/v1 "
            f"(adapters: {config.adapters_file}; state: {config.state_file})",
            flush=True,
        )
    try:
        return Supervisor(config, engine_python(), workdir, reporter).run()
    finally:
        stop_watch.set()
