"""Final artifacts: model or adapter directory, merged model, model card, metrics, loss curve."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lmforge.api.runconfig import RunConfig

log = logging.getLogger(__name__)


def _replace_dir(staged: Path, final: Path) -> None:
    """Swap a fully written directory into place (a reader never sees half of it)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)


def save_final(
    model: Any,
    tokenizer: Any,
    chat_template: str | None,
    out: Path,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """`final/`: a Hugging Face model directory, or a PEFT adapter directory, plus tokenizer.

    `state_dict` carries the gathered full weights of a sharded (FSDP, ZeRO-3) model.
    """
    staged = out / ".final.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, state_dict=state_dict)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(staged)
    final = out / "final"
    _replace_dir(staged, final)
    return final


def save_start_model(model: Any, tokenizer: Any, out: Path) -> Path:
    """`base/`: the model a run started from, when that was an adapter merged into its base in
    memory (an AlignmentJob after a LoRA FinetuneJob): the new adapter in final/ applies to it.
    Written before training wraps `model`; a resumed run keeps the existing copy."""
    base = out / "base"
    if (base / "config.json").is_file():
        return base
    staged = out / ".base.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    _replace_dir(staged, base)
    return base


def save_merged(base_path: str, adapter_dir: Path, tokenizer: Any, out: Path) -> Path:
    """`merged/`: the adapter folded into a freshly loaded full-precision base."""
    import torch
    from lmforge.trainer.model import load_pretrained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_pretrained(AutoModelForCausalLM, base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staged = out / ".merged.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    merged.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    final = out / "merged"
    _replace_dir(staged, final)
    return final


def output_kind(config: RunConfig) -> str:
    return config.spec.output_kind


def write_model_card(config: RunConfig, final: Path, metrics: dict[str, Any]) -> None:
    """README.md with Hugging Face metadata, so hubs and people know what this is."""
    spec = config.spec
    is_adapter = output_kind(config) == "adapter"
    is_reward_model = output_kind(config) == "reward-model"
    sources = [s.uri for s in spec.dataset.sources]
    shown = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    front = {
        "base_model": config.paths.model,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-classification" if is_reward_model else "text-generation",
        "tags": ["lmforge", spec.objective, spec.tuning.type],
    }
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", ""]
    lines += [
        f"# {config.name}",
        "",
        f"{'Adapter' if is_adapter else 'Model'} produced by the LMForge {config.kind} "
        f"`{config.name}`: {spec.objective} with {spec.tuning.type} on `{config.paths.model}`.",
        "",
        "## Training",
        "",
        f"- data: {', '.join(sources)} (max {spec.dataset.max_seq_length} tokens, "
        f"packing {'on' if spec.dataset.packing else 'off'})",
        f"- steps: {metrics.get('steps')}, learning rate {spec.training.learning_rate}, "
        f"global batch {spec.training.batch_size.global_}, {config.processes} process(es), "
        f"strategy {spec.distributed.strategy}",
        f"- chat template: {spec.model.chat_template}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.6g} |" for k, v in shown.items()),
        "",
        "## Use",
        "",
        "```python",
    ]
    if is_adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{final}")',
        ]
    elif is_reward_model:  # one scalar score per text (rewards.reward_text renders it)
        lines += [
            "from transformers import AutoModelForSequenceClassification",
            f'model = AutoModelForSequenceClassification.from_pretrained("{final}")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{final}")',
        ]
    lines += ["```", ""]
    (final / "README.md").write_text("\n".join(lines))


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training (and evaluation) loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
