"""`lmforge run`: the same YAML as on a cluster, run on this machine.

Validation and the run config are the cluster's (`lmforge.api`); only the
locations differ: file:// and relative paths are resolved against the YAML
file, `fromJob` against earlier local outputs in ./lmforge-runs, and the
training processes are started here (torchrun when more than one is asked for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.api.common import ModelSource
from lmforge.api.kinds import KubernetesObject, TrainingJob
from lmforge.api.references import model_references
from lmforge.api.runconfig import RunConfig, resolve_run_config
from lmforge.api.validation import load_file

DEFAULT_RUNS = Path("lmforge-runs")


class LocalRunError(Exception):
    """A job cannot run on this machine as written; the message says why and what to do."""


def job_output_dir(kind: str, name: str, runs: Path = DEFAULT_RUNS) -> Path:
    """Where a local job writes: ./lmforge-runs/<kind>/<name>/."""
    return runs / kind.lower() / name


def resolve_local_uri(uri: str, base: Path, field: str) -> str:
    """Absolute local path for file:// and relative paths; hf:// stays; cluster schemes fail."""
    if uri.startswith("hf://"):
        return uri
    if uri.startswith(("pvc://", "s3://")):
        scheme = uri.split("://", 1)[0]
        raise LocalRunError(
            f"{field}: {scheme}:// locations are mounted by the operator on a cluster; "
            f"for `lmforge run` use a local path or file:// (got {uri})"
        )
    path = Path(uri.removeprefix("file://"))
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_local_model(source: ModelSource, base: Path, runs: Path, field: str) -> str:
    if source.from_job is not None:
        ref = source.from_job
        final = job_output_dir(ref.kind, ref.name, runs) / "final"
        if not (final.parent / "metrics.json").exists():
            raise LocalRunError(
                f"{field}.fromJob: {ref.kind} {ref.name} has no finished local output at "
                f"{final}; run it first with `lmforge run`"
            )
        return str(final.resolve())
    assert source.source is not None  # the API requires source or fromJob
    path = resolve_local_uri(source.source, base, f"{field}.source")
    if not source.source.startswith("hf://") and not Path(path).exists():
        raise LocalRunError(
            f"{field}.source: no model at {path} (from {source.source}, relative to the "
            "YAML file's folder)"
        )
    return path


def local_run_config(
    job: TrainingJob,
    yaml_path: Path,
    output: Path | None,
    runs: Path,
    metrics_port: int | None = None,
) -> RunConfig:
    """The run config `lmforge run` hands to the trainer."""
    base = yaml_path.resolve().parent
    out = (output or job_output_dir(job.kind, job.name, runs)).resolve()
    models = {
        ref.field: resolve_local_model(ref.source, base, runs, f"spec.{ref.field}")
        for ref in model_references(job.spec)
    }
    return resolve_run_config(
        job,
        models=models,
        output=str(out),
        data=str(base),
        resolve_data_uri=lambda uri: resolve_local_uri(uri, base, "spec.dataset.sources[].uri"),
        metrics_port=metrics_port,
    )


def run_job(
    obj: KubernetesObject,
    yaml_path: Path,
    output: Path | None,
    runs: Path,
    metrics_port: int | None = None,
) -> Path:
    """Run one job to completion here; returns its output folder."""
    if not isinstance(obj, TrainingJob):
        raise LocalRunError(
            f"{obj.kind} {obj.name}: `lmforge run` runs FinetuneJobs and AlignmentJobs; "
            "serve an InferenceService with `lmforge serve`"
        )
    config = local_run_config(obj, yaml_path, output, runs, metrics_port)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.output_dir / "run.json"
    config.dump(config_path)
    print(f"{obj.kind}/{obj.name}: {config.processes} process(es), output {config.output_dir}")
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = subprocess.call(
        [sys.executable, "-m", "lmforge.trainer", "run", "--config", str(config_path)], env=env
    )
    if code != 0:
        raise LocalRunError(f"{obj.kind}/{obj.name} failed (exit code {code})")
    return config.output_dir


def run_file(
    path: Path,
    output: Path | None = None,
    runs: Path = DEFAULT_RUNS,
    metrics_port: int | None = None,
) -> list[Path]:
    """Validate a YAML file and run every job in it, in order."""
    objects = load_file(path)
    if output is not None and len(objects) > 1:
        raise LocalRunError("--output needs a file with a single job")
    return [run_job(obj, path, output, runs, metrics_port) for obj in objects]


def read_metrics(output: Path) -> dict[str, object]:
    return dict(json.loads((output / "metrics.json").read_text()))
