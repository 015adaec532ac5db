"""Cluster-wide settings of the operator (from its flags / Helm values)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorSettings:
    """What every renderer may need besides the object itself."""

    trainer_image: str = "ghcr.io/lmforge/trainer:0.1.0"
    inferencer_image: str = "ghcr.io/lmforge/inferencer:0.1.0"
    master_port: int = 29500
    metrics_port: int = 9090
    serving_port: int = 8000
    cache_size: str = "100Gi"
    default_output_size: str = "50Gi"
    run_as_user: int = 1000
