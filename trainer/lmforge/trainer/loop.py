"""The training loop pieces every recipe shares: atomic checkpoints (a mixin that sits in
front of transformers' Trainer or any TRL trainer), progress, method callbacks, and the
training arguments as kwargs that TrainingArguments and every TRL config accept."""

from __future__ import annotations

import logging
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lmforge.trainer import checkpoints, export, sharding
from lmforge.trainer.console import Console
from lmforge.trainer.launch import rank, strategy_problem
from lmforge.trainer.model import MethodError, Precision, parameter_counts, weight_dtypes
from lmforge.trainer.progress import ProgressReporter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_callback import ProgressCallback as TransformersProgressCallback

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)

OPTIMIZERS = {
    "adamw": "adamw_torch_fused",  # transformers' own default; the for-loop form is slower
    "adamw-8bit": "adamw_bnb_8bit",
    "paged-adamw-8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}
SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant-with-warmup": "constant_with_warmup",
    "polynomial": "polynomial",
}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class AtomicCheckpoints:
    """Checkpoints appear only when complete (see `checkpoints`).

    A mixin placed before the trainer class (`class X(AtomicCheckpoints, DPOTrainer)`):
    TRL's trainers override `_save_checkpoint` themselves, so this wraps whichever
    implementation comes next in the MRO.
    """

    keep_checkpoints: int = 2
    on_checkpoint: Any = None  # called with (step, path) on rank 0 once a checkpoint is complete
    args: Any
    state: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our ProgressCallback shows progress (console.py); transformers' printers would repeat
        # every log step as a dict.
        for printer in (PrinterCallback, TransformersProgressCallback):
            self.remove_callback(printer)  # type: ignore[attr-defined]

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        sharding.engage_fsdp_on_cpu(self)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        final_dir = Path(self.args.output_dir)
        staging = final_dir / checkpoints.STAGING
        # Let the Trainer write everything (weights, optimizer, scheduler, RNG of every
        # rank, trainer state) into the staging folder, then publish it in one rename.
        object.__setattr__(self.args, "output_dir", str(staging))
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            object.__setattr__(self.args, "output_dir", str(final_dir))
        _barrier()
        if self.args.should_save:
            staged = staging / f"{checkpoints.PREFIX}{self.state.global_step}"
            published = checkpoints.publish(staged, final_dir)
            checkpoints.prune(final_dir, self.keep_checkpoints)
            log.info("checkpoint complete: %s", published)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.state.global_step, published)
        _barrier()


class AtomicCheckpointTrainer(AtomicCheckpoints, Trainer):
    """transformers' Trainer with atomic checkpoints (continued pretraining and SFT)."""


def with_atomic_checkpoints(trainer_class: type[Any]) -> type[Any]:
    """`trainer_class` (e.g. TRL's DPOTrainer) with atomic checkpoints in front of it."""
    return type(f"Atomic{trainer_class.__name__}", (AtomicCheckpoints, trainer_class), {})


# ---------------------------------------------------------------- callbacks


class ProgressCallback(TrainerCallback):
    """Feeds the Trainer's logs into the progress channel (rank 0 only)."""

    def __init__(self, reporter: ProgressReporter | None, console: Console | None = None) -> None:
        self.reporter = reporter
        self.console = console or Console()
        self.first_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.first_step = state.global_step
        if self.reporter is not None:
            self.reporter.started = time.monotonic()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if self.reporter is None or not state.is_world_process_zero:
            return
        logs = logs or {}
        progress = self.reporter.update(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=state.epoch,
            loss=logs.get("loss"),
            eval_loss=logs.get("eval_loss"),
            learning_rate=logs.get("learning_rate"),
            tokens_seen=int(getattr(state, "num_input_tokens_seen", 0) or 0) or None,
            steps_this_session=state.global_step - (self.first_step or 0),
        )
        self.console.show(progress)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.console.end_line()


class TimedCheckpointCallback(TrainerCallback):
    """Checkpoint every N minutes; rank 0's clock decides for all ranks (no deadlock)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        due = torch.tensor([int(time.monotonic() - self.last >= self.seconds)])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(due, src=0)
        if due.item():
            control.should_save = True
            self.last = time.monotonic()


class LisaCallback(TrainerCallback):
    """Layerwise Importance Sampled AdamW (LMFlow's LISA).

    Embeddings and the head always train; every `interval` steps a new random set
    of `active` transformer layers is unfrozen and the others are frozen. The
    choice is seeded by the step, so every rank picks the same layers.
    """

    def __init__(self, model: torch.nn.Module, active: int, interval: int, seed: int) -> None:
        self.layers = _decoder_layers(model)
        self.active = min(active, len(self.layers))
        self.interval, self.seed = interval, seed

    def switch(self, step: int) -> list[int]:
        chosen = sorted(
            random.Random(self.seed * 1_000_003 + step).sample(range(len(self.layers)), self.active)
        )
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                p.requires_grad_(i in chosen)
        return chosen

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.interval == 0:
            chosen = self.switch(state.global_step)
            log.debug("LISA step %d: training layers %s", state.global_step, chosen)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError("LISA needs a model with a `layers` ModuleList of decoder layers")


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA reallocates ranks from the gradients after every optimizer step."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.model.base_model.update_and_allocate(state.global_step)


# ---------------------------------------------------------------- distributed strategies


def deepspeed_config(strategy: str) -> dict[str, Any]:
    """DeepSpeed config for zero2 / zero3 / zero3-offload; 'auto' values come from the Trainer."""
    stage = 2 if strategy == "zero2" else 3
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if strategy == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        # train_batch_size is left out: DeepSpeed derives it (micro x accumulation x world),
        # while the Trainer's "auto" fill can run before the world size is known.
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def fsdp_arguments(layer_class: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """Trainer arguments for FSDP2 (`fully_shard`), one unit per decoder layer.

    Checkpoints are sharded (torch.distributed.checkpoint): every rank writes its own
    shard, nothing is gathered on rank 0, and a resume may use another world size.
    """
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [layer_class],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
            # FSDP's own activation checkpointing replaces the Trainer's (not both).
            "activation_checkpointing": gradient_checkpointing,
        },
        "activation_checkpointing": False,
    }


def strategy_arguments(config: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """Trainer arguments for the resolved distributed strategy."""
    strategy = config.spec.distributed.strategy
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if strategy.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise MethodError(
                f"distributed.strategy {strategy} needs DeepSpeed, which is not installed here; "
                "install the `train` extra (`pip install lmforge[train]`)"
            ) from None
        problem = strategy_problem(config, cuda)
        if problem:
            raise MethodError(problem)
        # ZeRO also pays at world size 1 (offload); without CUDA it runs on DeepSpeed's
        # CPU accelerator, which accelerate reaches only when `use_cpu` is off.
        return {"deepspeed": deepspeed_config(strategy), "use_cpu": False}
    if world_size == 1:
        return {}
    args: dict[str, Any] = {"ddp_backend": "nccl" if cuda else "gloo"}
    if strategy == "fsdp":
        layer = type(_decoder_layers(model)[0]).__name__
        return args | fsdp_arguments(layer, config.spec.training.gradient_checkpointing)
    return args


def training_arguments(
    config: RunConfig, precision: Precision, model: torch.nn.Module, has_eval: bool
) -> TrainingArguments:
    """transformers TrainingArguments from the resolved run config."""
    return TrainingArguments(**training_kwargs(config, precision, model, has_eval))


def training_kwargs(
    config: RunConfig, precision: Precision, model: torch.nn.Module, has_eval: bool
) -> dict[str, Any]:
    """The arguments of the run config as kwargs that TrainingArguments and TRL's configs
    (RewardConfig, DPOConfig, KTOConfig, GRPOConfig, ...) accept alike. Precision and
    gradient checkpointing are always explicit: TRL's configs default both on."""
    spec = config.spec
    training, ckpt = spec.training, spec.checkpoint
    out = config.output_dir
    # Every run logs into its own output (a second run in one process must not reuse the first's).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "logs")
    eval_every = training.eval_every_steps
    kwargs: dict[str, Any] = {
        "output_dir": str(out / "checkpoints"),
        "per_device_train_batch_size": training.batch_size.per_device,
        "per_device_eval_batch_size": training.batch_size.per_device,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": SCHEDULERS[training.scheduler],
        "warmup_steps": training.warmup_ratio,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": OPTIMIZERS[training.optimizer],
        "seed": training.seed,
        "data_seed": training.seed,
        "activation_checkpointing": training.gradient_checkpointing,
        "logging_steps": training.logging_every_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if ckpt.every_steps else "no",
        "save_steps": ckpt.every_steps or 500,
        "save_total_limit": None,  # AtomicCheckpointTrainer prunes complete checkpoints
        "eval_strategy": ("steps" if eval_every else "epoch") if has_eval else "no",
        "eval_steps": eval_every,
        "report_to": ["tensorboard"],
        "include_num_input_tokens_seen": "non_padding",
        "remove_unused_columns": False,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": spec.tuning.type in ("lisa", "prefix-tuning"),
        "disable_tqdm": not os.isatty(2),
        **precision.trainer_flags,
        **strategy_arguments(config, model),
    }
    if training.max_steps is not None:
        kwargs["max_steps"] = training.max_steps
    else:
        kwargs["num_train_epochs"] = training.epochs
    return kwargs


# ---------------------------------------------------------------- one run, start to end
# What every Trainer-based recipe does the same way around its own loss: train (resuming
# from the last complete checkpoint), count, and publish what it produced.


def train_resuming(
    trainer: Any, config: RunConfig, reporter: ProgressReporter | None
) -> tuple[Any, Path | None]:
    """Train, resuming from the last complete checkpoint when checkpoint.resume is auto;
    complete checkpoints are announced on the progress channel. (result, resumed from)."""
    spec = config.spec
    trainer.keep_checkpoints = spec.checkpoint.keep
    if reporter is not None:
        trainer.on_checkpoint = reporter.checkpoint
    checkpoints_dir = config.output_dir / "checkpoints"
    if rank() == 0:
        checkpoints.clear_staging(checkpoints_dir)
    resume = None
    if spec.checkpoint.resume == "auto":
        resume = checkpoints.latest_complete_checkpoint(checkpoints_dir)
        if resume is not None:
            log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return result, resume


def final_eval_loss(trainer: Any) -> float:
    """Eval loss at the last step: the Trainer's own end-of-training evaluation if it ran."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return float(entry["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def peak_memory() -> int:
    """Peak GPU memory allocated, or this process's peak RSS on CPU (bytes)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def run_metrics(trainer: Any, result: Any, resume: Path | None, started: float) -> dict[str, Any]:
    """The figures every Trainer-based run reports, beside its method's own."""
    trainable, total = parameter_counts(trainer.model)
    return {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "wall_time_seconds": round(time.monotonic() - started, 2),
        "peak_memory_bytes": peak_memory(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        **weight_dtypes(trainer.model),
        "resumed_from_step": checkpoints.checkpoint_step(resume) if resume else None,
        "world_size": trainer.args.world_size,
        "strategy": sharding.strategy_in_use(trainer),
    }


def save_outputs(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    template: str | None,
    *,
    start: str | None = None,
    weights: dict[str, Any] | None = None,
) -> Path:
    """final/ (and merged/ when tuning.mergeOnExport asks, merged onto `start`, by default
    the run's model). Returns final/."""
    final = export.save_final(model, tokenizer, template, config.output_dir, weights)
    if config.spec.tuning.merge_on_export:
        export.save_merged(start or config.paths.model, final, tokenizer, config.output_dir)
    return final


def publish(
    config: RunConfig,
    final: Path,
    metrics: dict[str, Any],
    reporter: ProgressReporter,
    *,
    trainer: Any = None,
    step: int | None = None,
) -> None:
    """Model card, loss curve (runs with a Trainer), metrics.json; the progress channel
    reports the last step and closes with the output and the scalar metrics."""
    out = config.output_dir
    export.write_model_card(config, final, metrics)
    if trainer is not None:
        export.plot_loss(trainer.state.log_history, out / "loss.png")
    export.write_json(out / "metrics.json", metrics)
    log.info("final %s written to %s", export.output_kind(config), final)
    if trainer is not None:
        step = trainer.state.global_step
        reporter.update(
            step=step,
            total_steps=step,
            epoch=trainer.state.epoch,
            eval_loss=metrics.get("eval_loss"),
            force=True,
        )
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    reporter.finish({"output": str(final), "step": step, "metrics": scalars})
