"""The pure pieces of the reward-model and online recipes: texts, prompts, reward plumbing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lmforge.trainer.data import load_source
from lmforge.trainer.data.examples import Example
from lmforge.trainer.model import MethodError, load_pretrained
from lmforge.trainer.recipes.online import (
    TRLRewardFunction,
    batch_in_responses,
    columns_of,
    online_kwargs,
    prompt_rows,
)
from lmforge.trainer.recipes.reward import pair_texts, tokenize_pairs
from lmforge.trainer.rewards import RewardComponent, Rewards, reward_text, rule_score
from lmforge.trainer.tiny import build_tiny_model, build_tokenizer, bundled_texts

from lmforge.api.common import DataSource
from lmforge.api.kinds import AlignmentJobSpec, RewardRule

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    tok = build_tokenizer(bundled_texts())
    tok.chat_template = CHATML
    return tok


def test_prompt_records_keep_their_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "spell: 1 2", "answer": "one two", "level": 2, "meta": {"x": 1}}\n'
        '{"messages": [{"role": "user", "content": "spell: 3"}], "answer": "three"}\n'
    )
    examples = load_source(DataSource(uri=str(path), format="prompt"), tmp_path)
    # scalar columns reach the rewards; nested values are not columns
    assert [e.columns for e in examples] == [{"answer": "one two", "level": 2}, {"answer": "three"}]
    assert examples[0].messages == ({"role": "user", "content": "spell: 1 2"},)


def test_prompt_rows_cut_chat_records_before_the_answer() -> None:
    chat = Example(
        messages=(
            {"role": "user", "content": "spell: 1"},
            {"role": "assistant", "content": "one"},
        )
    )
    prompt = Example(messages=({"role": "user", "content": "spell: 2"},), columns={"answer": "two"})
    rows = prompt_rows([chat, prompt])
    assert rows == [
        {"prompt": [{"role": "user", "content": "spell: 1"}], "answer": "one"},
        {"prompt": [{"role": "user", "content": "spell: 2"}], "answer": "two"},
    ]
    assert columns_of(rows) == {"answer": ["one", "two"]}


def test_each_reward_component_is_one_named_trl_reward_function(tokenizer) -> None:  # type: ignore[no-untyped-def]
    exact = RewardComponent(
        "exact", 2.0, rule_score(RewardRule(type="exact-match", column="answer"), tokenizer)
    )
    fn = TRLRewardFunction(exact)
    assert fn.__name__ == "exact"
    prompts = [[{"role": "user", "content": "spell: 1"}]] * 2
    completions = [
        [{"role": "assistant", "content": "one"}],
        [{"role": "assistant", "content": "two"}],
    ]
    # TRL passes dataset columns and its own extras as keyword arguments
    scores = fn(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1], [2]],
        trainer_state=None,
        log_metric=print,
        answer=["one", "one"],
    )
    assert scores == [1.0, 0.0]


def test_online_arguments_count_prompts_and_use_the_generation_spec() -> None:
    spec = AlignmentJobSpec.model_validate(
        {
            "model": {"source": "hf://x/y"},
            "dataset": {"sources": [{"uri": "p.jsonl"}]},
            "method": {
                "type": "grpo",
                "beta": 0.02,
                "rewards": [{"rule": {"type": "regex", "pattern": "x"}, "weight": 0.5}],
            },
            "generation": {"samplesPerPrompt": 6, "maxNewTokens": 12, "temperature": 0.7},
        }
    )
    rewards = Rewards([RewardComponent("r", 0.5, lambda p, c, cols: [0.0] * len(c))])
    kwargs = online_kwargs(spec, rewards)
    assert kwargs["num_generations"] == 6
    assert kwargs["max_completion_length"] == 12
    assert kwargs["temperature"] == 0.7
    assert kwargs["beta"] == 0.02
    assert kwargs["reward_weights"] == [0.5]
    batch = batch_in_responses(
        {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 2}, 6
    )
    assert batch == {"per_device_train_batch_size": 24, "per_device_eval_batch_size": 12}
    if not torch.cuda.is_available():
        spec.generation.backend = "vllm"
        with pytest.raises(MethodError, match="vllm needs a CUDA GPU"):
            online_kwargs(spec, rewards)


def test_reward_model_trains_on_the_text_it_scores_at_rollout(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = Example(
        messages=({"role": "user", "content": "spell: 1 2"},),
        chosen=({"role": "assistant", "content": "one two"},),
        rejected=({"role": "assistant", "content": "one three"},),
    )
    chosen, rejected = pair_texts(tokenizer, example)
    prompt = list(example.messages)
    assert chosen == reward_text(tokenizer, prompt, "one two")
    assert rejected == reward_text(tokenizer, prompt, "one three")
    data = tokenize_pairs(tokenizer, [(chosen, rejected), (chosen * 20, rejected)], max_length=40)
    assert len(data) == 1  # the long pair is left out, not cut
    assert data[0]["chosen_ids"] == tokenizer(chosen, add_special_tokens=False)["input_ids"]


def test_adapter_directories_load_merged_under_any_head(tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_dir = build_tiny_model(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().state_dict()

    merged: Any = load_pretrained(AutoModelForCausalLM, str(tmp_path / "adapter"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged.state_dict()[key], expected[key])
    scorer: Any = load_pretrained(
        AutoModelForSequenceClassification, str(tmp_path / "adapter"), num_labels=1
    )
    assert torch.allclose(scorer.state_dict()[key], expected[key])
    assert scorer.config.num_labels == 1
    # Trainable as plain weights (full fine-tuning of a reward model on the demo's adapter
    # once failed: PEFT had frozen everything, the new head included).
    for model in (merged, scorer):
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen == []
