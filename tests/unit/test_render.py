"""The operator's renderers: a training job's spec in, the Kubernetes objects it owns out.

Pure functions, no cluster: every test renders the example jobs users start from and
checks what the cluster (and the trainer inside the pods) will rely on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from lmforge.operator.training.render import (
    COMPLETION_INDEX,
    Children,
    TrainingTarget,
    output_uri,
    plan_mounts,
    render_children,
    render_service,
    render_trainer_access,
)

from lmforge.api.base import API_VERSION
from lmforge.api.kinds import AlignmentJob, FinetuneJob, TrainingJob
from lmforge.api.runconfig import EXIT_BAD_CONFIG, EXIT_BAD_DATA, RunConfig
from lmforge.api.validation import load_file, parse_object

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The examples that run on a cluster (tiny reads local files: `lmforge run` only).
CLUSTER_EXAMPLES = ("lora", "multinode", "qlora", "queued")
NAMESPACE = "ns"
UID = "uid-1"

Obj = dict[str, Any]


# ---------------------------------------------------------------- building targets


def example_job(name: str, change: Callable[[Obj], None] | None = None) -> FinetuneJob:
    """examples/finetunejob-<name>.yaml, validated like `kubectl apply` would, optionally edited."""
    path = EXAMPLES / f"finetunejob-{name}.yaml"
    if change is None:
        (job,) = load_file(path)
    else:
        data = yaml.safe_load(path.read_text())
        change(data)
        job = parse_object(data)
    assert isinstance(job, FinetuneJob)
    return job


def target_of(job: TrainingJob, attempt: int = 0, model_uri: str | None = None) -> TrainingTarget:
    uri = job.spec.model.source if model_uri is None else model_uri
    assert uri is not None
    return TrainingTarget(
        job, namespace=NAMESPACE, uid=UID, model_uris={"model": uri}, attempt=attempt
    )


def render_example(
    name: str, *, workload_suspended: bool | None = None, attempt: int = 0
) -> Children:
    """Render an example; `workload_suspended`: the existing Job's spec.suspend (None: no Job)."""
    target = target_of(example_job(name), attempt)
    return render_children(target, workload_suspended=workload_suspended)


# ---------------------------------------------------------------- reading rendered objects


def the(children: Children, kind: str) -> Obj:
    (obj,) = children.of_kind(kind)
    return obj


def run_config(children: Children) -> RunConfig:
    """The run config exactly as the trainer reads it from the mounted ConfigMap."""
    return RunConfig.model_validate(json.loads(run_config_map(children)["data"]["run.json"]))


def run_config_map(children: Children) -> Obj:
    (found,) = [o for o in children.of_kind("ConfigMap") if "run.json" in o.get("data", {})]
    return found


def pod_spec(children: Children) -> Obj:
    spec: Obj = the(children, "Job")["spec"]["template"]["spec"]
    return spec


def trainer(children: Children) -> Obj:
    (container,) = [c for c in pod_spec(children)["containers"] if c["name"] == "trainer"]
    found: Obj = container
    return found


def all_containers(children: Children) -> list[Obj]:
    spec = pod_spec(children)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container["env"]}


def volume(children: Children, name: str) -> Obj:
    (vol,) = [v for v in pod_spec(children)["volumes"] if v["name"] == name]
    found: Obj = vol
    return found


def mount_at(container: Obj, path: str) -> Obj:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    found: Obj = mount
    return found


def mount_holding(container: Obj, path: str) -> Obj:
    """The deepest volume mount of the container that contains `path`."""
    holding = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert holding, f"{path} is not inside any volume mounted into {container['name']}"
    return max(holding, key=lambda m: len(m["mountPath"]))


def claim_of_mount(children: Children, mount: Obj) -> Obj:
    """The persistentVolumeClaim source behind a volume mount."""
    source: Obj = volume(children, mount["name"])["persistentVolumeClaim"]
    return source


def claims(children: Children) -> dict[str, Obj]:
    return {c["metadata"]["name"]: c for c in children.of_kind("PersistentVolumeClaim")}


def fetches(children: Children) -> dict[str, str]:
    """uri -> destination of every init container that fetches an input."""
    out = {}
    for container in pod_spec(children).get("initContainers", []):
        command = container["command"]
        out[command[command.index("--uri") + 1]] = command[command.index("--dest") + 1]
    return out


# ---------------------------------------------------------------- multi-node (2 x 8 GPUs, ZeRO-3)


@pytest.fixture(scope="module")
def multinode() -> Children:
    return render_example("multinode")


def test_multinode_job_is_indexed_one_pod_per_node(multinode: Children) -> None:
    job = the(multinode, "Job")
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    # Any failed pod ends the attempt; the operator decides about restarting all ranks.
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 172800
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_multinode_trainer_gets_its_gpus_and_tolerates_gpu_nodes(multinode: Children) -> None:
    resources = trainer(multinode)["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "8"
    assert str(resources["limits"]["nvidia.com/gpu"]) == "8"
    assert resources["requests"]["cpu"] == "32"
    assert resources["requests"]["memory"] == "512Gi"
    spec = pod_spec(multinode)
    gpu_tolerations = [t for t in spec["tolerations"] if t.get("key") == "nvidia.com/gpu"]
    assert gpu_tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_multinode_scheduling_is_copied(multinode: Children) -> None:
    scheduling = example_job("multinode").spec.scheduling
    spec = pod_spec(multinode)
    assert spec["nodeSelector"] == scheduling.node_selector
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["priorityClassName"] == scheduling.priority_class_name == "training-high"


def test_multinode_ranks_find_rank_zero_through_the_headless_service(multinode: Children) -> None:
    job, service = the(multinode, "Job"), the(multinode, "Service")
    spec = pod_spec(multinode)
    # Indexed Job pods are named <job>-<index> as hosts; subdomain makes <host>.<service> resolve.
    assert spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # rendezvous before readiness
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    env = env_of(trainer(multinode))
    assert (
        env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    )
    rendezvous = {p["name"]: p["port"] for p in service["spec"]["ports"]}["rendezvous"]
    assert env["MASTER_PORT"]["value"] == str(rendezvous)
    assert {"name": "rendezvous", "containerPort": rendezvous} in trainer(multinode)["ports"]
    assert env["NNODES"]["value"] == "2"
    assert env["NODE_RANK"]["valueFrom"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    assert COMPLETION_INDEX == ("metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["NPROC_PER_NODE"]["value"] == "8"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "value" not in env["HF_TOKEN"]  # the token never lands in the pod spec


def test_multinode_shared_memory_is_a_sized_memory_volume(multinode: Children) -> None:
    shm = mount_at(trainer(multinode), "/dev/shm")
    assert volume(multinode, shm["name"])["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_multinode_output_claim_follows_spec_output_create(multinode: Children) -> None:
    out = mount_at(trainer(multinode), "/mnt/output")
    claim_name = claim_of_mount(multinode, out)["claimName"]
    claim = claims(multinode)[claim_name]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert out.get("readOnly") is not True


def test_multinode_run_config_is_resolved_for_the_pods(multinode: Children) -> None:
    config = run_config(multinode)
    assert config.name == "llama3-70b-full"
    assert config.namespace == NAMESPACE
    assert config.processes == 16
    assert config.gradient_accumulation_steps == 128 // (1 * 16) == 8
    assert config.spec.distributed.strategy == "zero3"
    assert [s.uri for s in config.spec.dataset.sources] == [
        "/mnt/pvc/datasets/belle/train_0.5M_CN.json",
        "/mnt/pvc/datasets/openhermes",
    ]
    container = trainer(multinode)
    for source in config.spec.dataset.sources:
        mount = mount_holding(container, source.uri)
        assert mount["mountPath"] == "/mnt/pvc/datasets"
        assert mount["readOnly"] is True
        pvc = claim_of_mount(multinode, mount)
        assert pvc == {"claimName": "datasets", "readOnly": True}
    assert "datasets" not in claims(multinode)  # an input claim is the user's, never ours


# ---------------------------------------------------------------- every example


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_pods_meet_the_restricted_pod_security_standard(example: str) -> None:
    children = render_example(example)
    security = pod_spec(children)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = all_containers(children)
    assert containers
    for container in containers:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"]
        assert context.get("privileged") is not True


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_pod_failure_policy_fails_fast_on_bad_input_and_ignores_disruptions(example: str) -> None:
    children = render_example(example)
    rules = the(children, "Job")["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail_job) == 1
    on_exit = fail_job[0]["onExitCodes"]
    assert on_exit["containerName"] == trainer(children)["name"]
    assert on_exit["operator"] == "In"
    assert sorted(on_exit["values"]) == sorted([EXIT_BAD_CONFIG, EXIT_BAD_DATA]) == [2, 3]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_trainer_can_open_every_location_of_its_run_config(example: str) -> None:
    """Model, data and output paths all lie inside volumes mounted into the trainer."""
    children = render_example(example)
    config = run_config(children)
    container = trainer(children)
    assert mount_at(container, "/etc/lmforge")["readOnly"] is True
    assert volume(children, mount_at(container, "/etc/lmforge")["name"])["configMap"] == {
        "name": run_config_map(children)["metadata"]["name"]
    }
    assert container["command"][-2:] == ["--config", "/etc/lmforge/run.json"]
    locations = [config.paths.model, config.paths.output]
    locations += [s.uri for s in config.spec.dataset.sources if not s.uri.startswith("hf://")]
    for location in locations:
        assert location.startswith("/"), location
        mount_holding(container, location)
    output_mount = mount_holding(container, config.paths.output)
    assert output_mount.get("readOnly") is not True


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_output_uri_names_where_the_trainer_writes(example: str) -> None:
    """status.output.uri (what fromJob and InferenceService read) matches the pod's output."""
    target = target_of(example_job(example))
    children = render_children(target)
    config = run_config(children)
    mount = mount_holding(trainer(children), config.paths.output)
    claim = claim_of_mount(children, mount)["claimName"]
    relative = config.paths.output.removeprefix(mount["mountPath"]).strip("/")
    assert output_uri(target) == f"pvc://{claim}/{relative}/final"


# ---------------------------------------------------------------- QLoRA: hub model, S3 data


def test_qlora_inputs_are_fetched_into_the_cache_volume() -> None:
    children = render_example("qlora")
    got = fetches(children)
    assert set(got) == {"hf://Qwen/Qwen2.5-7B-Instruct", "s3://corp-data/support-chats/"}
    model_dest, data_dest = (
        got["hf://Qwen/Qwen2.5-7B-Instruct"],
        got["s3://corp-data/support-chats/"],
    )
    assert model_dest != data_dest

    config = run_config(children)
    assert config.paths.model == model_dest
    assert [s.uri for s in config.spec.dataset.sources] == [data_dest]

    # The init containers write where the trainer reads: one cache volume, a PVC we own.
    cache_mount = mount_holding(trainer(children), model_dest)
    assert mount_holding(trainer(children), data_dest) == cache_mount
    for init in pod_spec(children)["initContainers"]:
        assert cache_mount in init["volumeMounts"]
        assert init["image"] == trainer(children)["image"]
    cache_claim = claim_of_mount(children, cache_mount)["claimName"]
    assert cache_claim in claims(children)
    assert cache_mount.get("readOnly") is not True


def test_inputs_already_on_volumes_need_no_cache_claim() -> None:
    children = render_example("queued")
    assert "initContainers" not in pod_spec(children)
    assert not [name for name in claims(children) if name.endswith("-cache")]
    assert "emptyDir" in volume(children, mount_at(trainer(children), "/mnt/cache")["name"])


# ---------------------------------------------------------------- Kueue, existing claim, suspend


def test_queued_job_is_labelled_for_kueue_and_created_suspended() -> None:
    job = the(render_example("queued", workload_suspended=None), "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert job["spec"]["suspend"] is True  # Kueue admits it by unsuspending


def test_queued_job_leaves_suspend_to_kueue_once_it_exists() -> None:
    """Applying again must neither re-suspend an admitted Job nor start a waiting one."""
    admitted = the(render_example("queued", workload_suspended=False), "Job")
    assert admitted["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert admitted["spec"].get("suspend", False) is False  # left out: the live value stays
    waiting = the(render_example("queued", workload_suspended=True), "Job")
    assert waiting["spec"].get("suspend", True) is True


def _suspend(data: Obj) -> None:
    data["spec"].setdefault("runPolicy", {})["suspend"] = True


@pytest.mark.parametrize(
    ("example", "user_suspends", "workload_suspended", "expected"),
    [
        ("queued", False, None, True),  # created suspended: Kueue admits it
        ("queued", False, True, True),  # still waiting for admission
        ("queued", False, False, False),  # admitted: left running
        ("queued", True, None, True),
        ("queued", True, False, True),  # the user's suspend wins
        ("multinode", False, None, False),
        ("multinode", False, True, False),  # resumed after the user unsuspends
        ("multinode", True, None, True),
        ("multinode", True, False, True),
    ],
)
def test_job_suspension(
    example: str, user_suspends: bool, workload_suspended: bool | None, expected: bool
) -> None:
    job = example_job(example, _suspend if user_suspends else None)
    assert job.spec.run_policy.suspend is user_suspends
    target = target_of(job)
    rendered = the(render_children(target, workload_suspended=workload_suspended), "Job")
    # Server-side apply: a field left out keeps the live Job's value (false on creation).
    after_apply = rendered["spec"].get("suspend", bool(workload_suspended))
    assert after_apply is expected


def test_existing_output_claim_is_mounted_not_created() -> None:
    children = render_example("queued")
    assert claims(children) == {}
    out = mount_at(trainer(children), "/mnt/output")
    assert claim_of_mount(children, out)["claimName"] == "research-outputs"
    assert out.get("readOnly") is not True
    assert run_config(children).paths.output.startswith("/mnt/output/")


def test_queued_model_and_data_claims_are_mounted_read_only() -> None:
    children = render_example("queued")
    config = run_config(children)
    assert config.paths.model == "/mnt/pvc/models/mistral-7b-v0.3"
    assert [s.uri for s in config.spec.dataset.sources] == ["/mnt/pvc/datasets/legal-corpus"]
    container = trainer(children)
    for path, claim in (
        (config.paths.model, "models"),
        (config.spec.dataset.sources[0].uri, "datasets"),
    ):
        mount = mount_holding(container, path)
        assert mount["readOnly"] is True
        assert claim_of_mount(children, mount) == {"claimName": claim, "readOnly": True}
    user_toleration = {
        "key": "dedicated",
        "operator": "Equal",
        "value": "research",
        "effect": "NoSchedule",
    }
    assert user_toleration in pod_spec(children)["tolerations"]


# ---------------------------------------------------------------- ownership, labels, attempts


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_every_child_is_owned_by_and_labelled_with_its_job(example: str) -> None:
    job = example_job(example)
    children = render_children(target_of(job))
    kinds = {o["kind"] for o in children.objects}
    assert {"ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding", "Job"} <= kinds
    for obj in children.objects:
        meta = obj["metadata"]
        assert meta["namespace"] == NAMESPACE
        assert meta["ownerReferences"] == [
            {
                "apiVersion": API_VERSION,
                "kind": "FinetuneJob",
                "name": job.name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], f"{obj['kind']} {meta['name']}"
        assert meta["labels"]["lmforge.io/job-kind"] == "FinetuneJob"
        assert meta["labels"]["lmforge.io/job-name"] == job.name
    names = [(o["kind"], o["metadata"]["name"]) for o in children.objects]
    assert len(names) == len(set(names))


def _label(data: Obj) -> None:
    data["metadata"]["labels"] = {
        "team": "nlp",
        "cost-center": "4711",
        "lmforge.io/job-name": "someone-else",  # cannot hijack the identifying labels
    }


def test_job_labels_are_propagated_to_children_and_pods() -> None:
    job = example_job("multinode", _label)
    children = render_children(target_of(job))
    template = the(children, "Job")["spec"]["template"]["metadata"]["labels"]
    for labels in [*(o["metadata"]["labels"] for o in children.objects), template]:
        assert labels["team"] == "nlp"
        assert labels["cost-center"] == "4711"
        assert labels["lmforge.io/job-name"] == "llama3-70b-full"


@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_rendering_is_deterministic(example: str) -> None:
    first, second = render_example(example), render_example(example)
    assert first.objects == second.objects
    assert json.dumps(first.objects, sort_keys=True) == json.dumps(second.objects, sort_keys=True)
    assert first.config == second.config


@pytest.mark.parametrize("attempt", [0, 1, 7])
def test_each_attempt_is_a_new_job_reusing_the_other_children(attempt: int) -> None:
    first = render_example("multinode", attempt=0)
    children = render_example("multinode", attempt=attempt)
    job = the(children, "Job")
    assert job["metadata"]["name"] == f"llama3-70b-full-{attempt}"
    assert job["metadata"]["labels"]["lmforge.io/attempt"] == str(attempt)
    assert job["spec"]["template"]["metadata"]["labels"]["lmforge.io/attempt"] == str(attempt)
    env = env_of(trainer(children))
    service = the(children, "Service")["metadata"]["name"]
    assert env["MASTER_ADDR"]["value"] == f"llama3-70b-full-{attempt}-0.{service}"
    # Config, claims (checkpoints to resume from), Service and access stay the same objects.
    assert [o for o in children.objects if o["kind"] != "Job"] == [
        o for o in first.objects if o["kind"] != "Job"
    ]


def test_trainer_account_may_only_write_its_report() -> None:
    target = target_of(example_job("multinode"))
    account, role, binding = render_trainer_access(target)
    report = "llama3-70b-full-report"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [report],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    children = render_children(target)
    assert pod_spec(children)["serviceAccountName"] == account["metadata"]["name"]
    assert env_of(trainer(children))["LMFORGE_REPORT_CONFIGMAP"]["value"] == report
    (created,) = [o for o in children.of_kind("ConfigMap") if o["metadata"]["name"] == report]
    assert "data" not in created  # the trainer's keys are never overwritten by the operator
    assert render_service(target) == the(children, "Service")


# ---------------------------------------------------------------- fromJob: a model on a claim


def _from_job(data: Obj) -> None:
    data["spec"]["model"] = {"fromJob": {"name": "llama3-alpaca-lora"}, "chatTemplate": "llama3"}


def test_model_from_an_earlier_job_is_read_from_its_claim_read_only() -> None:
    upstream = target_of(example_job("lora"))
    model_uri = output_uri(upstream)  # what the upstream job publishes in status.output.uri
    claim = model_uri.removeprefix("pvc://").split("/")[0]
    assert model_uri.endswith("/final")

    job = example_job("multinode", _from_job)
    assert job.spec.model.source is None
    target = target_of(job, model_uri=model_uri)
    children = render_children(target)

    config = run_config(children)
    assert config.paths.model == f"/mnt/pvc/{model_uri.removeprefix('pvc://')}"
    mount = mount_holding(trainer(children), config.paths.model)
    assert mount["mountPath"] == f"/mnt/pvc/{claim}"
    assert mount["readOnly"] is True
    assert claim_of_mount(children, mount) == {"claimName": claim, "readOnly": True}
    assert model_uri not in fetches(children)
    assert claim not in claims(children)  # the upstream job owns it
    assert plan_mounts(target).claims[claim] is True


def test_model_in_our_own_output_claim_is_read_through_the_output_mount() -> None:
    def shared(data: Obj) -> None:
        _from_job(data)
        data["spec"]["output"] = {"existingClaim": "team-outputs"}

    job = example_job("multinode", shared)
    model_uri = "pvc://team-outputs/finetunejob/llama3-alpaca-lora/final"
    children = render_children(target_of(job, model_uri=model_uri))
    config = run_config(children)
    assert config.paths.model == "/mnt/output/finetunejob/llama3-alpaca-lora/final"
    mount = mount_holding(trainer(children), config.paths.model)
    assert claim_of_mount(children, mount)["claimName"] == "team-outputs"
    claim_names = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(children)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claim_names.count("team-outputs") == 1


def test_target_attempt_changes_only_the_job() -> None:
    target = target_of(example_job("queued"))
    later = replace(target, attempt=2)
    assert the(render_children(later), "Job")["metadata"]["name"] == "mistral-cpt-legal-2"
    assert output_uri(later) == output_uri(target)


def test_alignment_job_mounts_and_locates_every_model_reference() -> None:
    (job,) = load_file(EXAMPLES / "alignmentjob-grpo.yaml")
    assert isinstance(job, AlignmentJob)
    reward_uri = "pvc://team-outputs/alignmentjob/qwen-reward-model/final"  # its status.output
    target = TrainingTarget(
        job,
        namespace=NAMESPACE,
        uid=UID,
        model_uris={
            "model": "hf://Qwen/Qwen2.5-1.5B-Instruct",
            "method.rewards[0].model": reward_uri,
        },
    )
    children = render_children(target)
    config = run_config(children)
    assert config.kind == "AlignmentJob"
    assert config.paths.model == "/mnt/cache/model"
    assert fetches(children) == {"hf://Qwen/Qwen2.5-1.5B-Instruct": "/mnt/cache/model"}
    reward_path = config.model_path("method.rewards[0].model")
    assert reward_path == "/mnt/pvc/team-outputs/alignmentjob/qwen-reward-model/final"
    # the reward model's claim is mounted read-only where the run config says
    assert mount_holding(trainer(children), reward_path)["readOnly"] is True
    assert the(children, "Job")["metadata"]["labels"]["lmforge.io/job-kind"] == "AlignmentJob"
