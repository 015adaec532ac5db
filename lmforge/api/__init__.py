"""The LMForge API (group lmforge.io, version v1alpha1): one model per concept,
shared by the CRDs, local validation, the operator and the trainer."""

from lmforge.api.base import API_VERSION, GROUP, VERSION
from lmforge.api.kinds import KINDS, AlignmentJob, FinetuneJob, InferenceService, KubernetesObject

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "AlignmentJob",
    "FinetuneJob",
    "InferenceService",
    "KubernetesObject",
]
