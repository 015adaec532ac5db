"""The run config: fully resolved, versioned, identical for local and cluster runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from lmforge.trainer.launch import torchrun_command
from lmforge.trainer.loop import deepspeed_config, fsdp_arguments

from lmforge.api.kinds import DEFAULT_BETA
from lmforge.api.references import model_references
from lmforge.api.runconfig import RUN_CONFIG_VERSION, RunConfig, resolve_run_config
from lmforge.api.validation import InvalidObject, parse_object
from lmforge.local import LocalRunError, local_run_config
from tests.catalogue import BASE


def _job(**spec_changes: object):  # type: ignore[no-untyped-def]
    obj = copy.deepcopy(BASE["FinetuneJob"])
    obj["spec"].update(spec_changes)
    return parse_object(obj)


def test_defaults_are_resolved() -> None:
    job = _job(distributed={"nodes": 2, "gpusPerNode": 4}, training={"batchSize": {"perDevice": 2}})
    config = resolve_run_config(job, models={"model": "/models/base"}, output="/out")
    spec = config.spec
    assert config.version == RUN_CONFIG_VERSION
    assert spec.training.epochs == 1.0
    assert spec.training.learning_rate == 2e-4  # lora default
    assert spec.distributed.processes_per_node == 4
    assert spec.distributed.strategy == "auto"  # decided by the trainer (test_memory)
    assert spec.training.batch_size.global_ == 2 * 8
    assert config.gradient_accumulation_steps == 1


def test_gradient_accumulation_is_derived() -> None:
    job = _job(
        method={"type": "full"},
        distributed={"nodes": 2, "gpusPerNode": 8},
        training={"batchSize": {"perDevice": 2, "global": 128}},
    )
    config = resolve_run_config(job, models={"model": "m"}, output="o")
    assert config.gradient_accumulation_steps == 4
    assert config.spec.training.learning_rate == 2e-5


def test_round_trip_and_version_check(tmp_path: Path) -> None:
    config = resolve_run_config(_job(), models={"model": "m"}, output="o")
    path = tmp_path / "run.json"
    config.dump(path)
    assert RunConfig.load(path) == config
    data = json.loads(path.read_text())
    data["version"] = "lmforge.io/run-config/v0"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        RunConfig.load(path)


def test_local_paths_resolve_against_the_yaml(tmp_path: Path) -> None:
    yaml_path = tmp_path / "jobs" / "job.yaml"
    job = _job(model={"source": "file://../models/base"})
    with pytest.raises(LocalRunError, match=r"spec.model.source: no model at .*models/base"):
        local_run_config(job, yaml_path, None, tmp_path / "runs")
    (tmp_path / "models" / "base").mkdir(parents=True)
    config = local_run_config(job, yaml_path, None, tmp_path / "runs")
    assert config.paths.model == str((tmp_path / "models" / "base").resolve())
    assert config.spec.dataset.sources[0].uri == str(tmp_path / "jobs" / "data" / "train.jsonl")
    assert config.paths.output == str((tmp_path / "runs" / "finetunejob" / "cat-ftj").resolve())


def test_cluster_only_locations_fail_locally(tmp_path: Path) -> None:
    job = _job(model={"source": "pvc://models/llama"})
    with pytest.raises(LocalRunError, match=r"spec.model.source: pvc:// .* file://"):
        local_run_config(job, tmp_path / "j.yaml", None, tmp_path)
    job = _job(model={"fromJob": {"name": "sft"}})
    with pytest.raises(LocalRunError, match=r"spec.model.fromJob: FinetuneJob sft .* run it first"):
        local_run_config(job, tmp_path / "j.yaml", None, tmp_path)


def test_torchrun_command_from_operator_environment() -> None:
    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "NPROC_PER_NODE": "8",
        "MASTER_ADDR": "job-0.job",
        "MASTER_PORT": "29500",
    }
    cmd = torchrun_command(Path("/etc/lmforge/run.json"), 8, env)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=job-0.job",
        "--master-port=29500",
    } <= set(cmd)
    assert cmd[-4:] == ["lmforge.trainer", "run", "--config", "/etc/lmforge/run.json"]
    assert torchrun_command(Path("r.json"), 1, {}) == []  # one process: no torchrun
    assert "--standalone" in torchrun_command(Path("r.json"), 2, {})
    assert torchrun_command(Path("r.json"), 2, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) == []
    # DeepSpeed needs torchrun's process-group environment even for one process.
    assert "--nproc-per-node=1" in torchrun_command(Path("r.json"), 1, {}, always=True)


def test_deepspeed_and_fsdp_configs() -> None:
    zero2 = deepspeed_config("zero2")["zero_optimization"]
    assert zero2["stage"] == 2 and "offload_optimizer" not in zero2
    zero3 = deepspeed_config("zero3")["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"]
    offload = deepspeed_config("zero3-offload")["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu"
    assert offload["offload_param"]["device"] == "cpu"
    assert "train_batch_size" not in zero2  # DeepSpeed derives it from micro x accum x world
    fsdp = fsdp_arguments("LlamaDecoderLayer", gradient_checkpointing=True)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert fsdp["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"  # reshardable
    # FSDP checkpoints activations itself; the Trainer's flag would do it twice.
    assert fsdp["fsdp_config"]["activation_checkpointing"] and not fsdp["activation_checkpointing"]


def test_zero_without_gpus_is_one_process() -> None:
    one = _job(distributed={"strategy": "zero3", "gpusPerNode": 0})
    assert one.spec.distributed.processes == 1
    with pytest.raises(InvalidObject, match="runs one process only"):
        _job(distributed={"strategy": "zero2", "gpusPerNode": 0, "processesPerNode": 2})
    with pytest.raises(InvalidObject, match="runs one process only"):
        _job(distributed={"strategy": "zero2", "gpusPerNode": 0, "nodes": 2})


def _alignment(data_format: str = "preference", **method: object):  # type: ignore[no-untyped-def]
    obj = copy.deepcopy(BASE["AlignmentJob"])
    obj["spec"]["method"] = method
    obj["spec"]["dataset"]["sources"][0]["format"] = data_format
    return parse_object(obj)


def test_alignment_run_config_locates_every_model_and_fills_beta(tmp_path: Path) -> None:
    job = _alignment(
        "prompt",
        type="grpo",
        referenceModel={"source": "hf://org/ref"},
        rewards=[
            {"model": {"fromJob": {"kind": "AlignmentJob", "name": "rm"}}},
            {"rule": {"type": "length-penalty"}},
        ],
    )
    refs = [r.field for r in model_references(job.spec)]
    assert refs == ["model", "method.referenceModel", "method.rewards[0].model"]
    models = {field: f"/m/{i}" for i, field in enumerate(refs)}
    config = resolve_run_config(job, models=models, output="o")
    assert config.kind == "AlignmentJob"
    assert config.spec.method.beta == DEFAULT_BETA["grpo"]  # type: ignore[union-attr]
    assert config.model_path("method.rewards[0].model") == "/m/2"
    path = tmp_path / "run.json"
    config.dump(path)
    assert RunConfig.load(path) == config  # the AlignmentJob spec survives the round trip
    # SimPO's default reward scale differs from DPO's.
    simpo = resolve_run_config(_alignment(type="simpo"), models={"model": "m"}, output="o")
    assert simpo.spec.method.beta == 2.0  # type: ignore[union-attr]


def test_local_alignment_resolves_reward_model_from_an_earlier_local_run(tmp_path: Path) -> None:
    job = _alignment(
        "prompt",
        type="raft",
        rewards=[{"model": {"fromJob": {"kind": "AlignmentJob", "name": "rm"}}}],
    )
    sft = tmp_path / "runs" / "finetunejob" / "sft"  # spec.model's fromJob, done already
    (sft / "final").mkdir(parents=True)
    (sft / "metrics.json").write_text("{}")
    with pytest.raises(
        LocalRunError, match=r"spec.method.rewards\[0\].model.fromJob: AlignmentJob rm"
    ):
        local_run_config(job, tmp_path / "j.yaml", None, tmp_path / "runs")
    done = tmp_path / "runs" / "alignmentjob" / "rm"
    (done / "final").mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    config = local_run_config(job, tmp_path / "j.yaml", None, tmp_path / "runs")
    assert config.model_path("method.rewards[0].model") == str((done / "final").resolve())
