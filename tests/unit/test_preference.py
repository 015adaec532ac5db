"""The DPO family's pieces: pairs tokenized as SFT renders them, TRL's DPO and IPO losses
against the papers' formulas, KTO's unpaired rows and CPO/ORPO's row layout."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lmforge.trainer import pairs
from lmforge.trainer.data import Example, tokenize_examples
from lmforge.trainer.data.templates import NAMED_TEMPLATES
from lmforge.trainer.recipes.kto import labelled, with_kl_completions
from lmforge.trainer.recipes.preference import pair_row
from lmforge.trainer.tiny import preference_records
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATML = NAMED_TEMPLATES["chatml"]


def _pair(record: dict[str, str]) -> Example:
    return Example(
        messages=({"role": "user", "content": record["prompt"]},),
        chosen=({"role": "assistant", "content": record["chosen"]},),
        rejected=({"role": "assistant", "content": record["rejected"]},),
        origin="pairs.jsonl:line 1",
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("template", [CHATML, None], ids=["chatml", "none"])
def test_pairs_are_the_token_ids_sft_trains_on(tokenizer: Any, template: str | None) -> None:
    examples = [_pair(r) for r in preference_records(8, seed=0)]
    records = pairs.encode_pairs(examples, tokenizer, template, "dpo")
    for example, record in zip(examples, records, strict=True):
        for side in ("chosen", "rejected"):
            sft = tokenize_examples(
                [Example(messages=example.messages + getattr(example, side))],
                tokenizer,
                chat_template=template,
                max_seq_length=128,
                train_on_prompt=False,
                packing=False,
            ).records[0]
            assert record["prompt_ids"] + record[f"{side}_ids"] == sft["input_ids"]
            # the answer is exactly what SFT trains on (its labels), EOS included
            trained = [t for t in sft["labels"] if t != -100]
            assert record[f"{side}_ids"][-len(trained) :] == trained
            assert record[f"{side}_ids"][-1] == tokenizer.eos_token_id


def test_records_without_a_pair_are_bad_data(tokenizer: Any) -> None:
    sft_only = Example(
        messages=(
            {"role": "user", "content": "spell: 1"},
            {"role": "assistant", "content": "one"},
        ),
        origin="sft.jsonl:line 3",
    )
    with pytest.raises(Exception, match=r"sft.jsonl:line 3: field 'rejected': dpo trains on"):
        pairs.encode_pairs([sft_only], tokenizer, CHATML, "dpo")


def test_kto_splits_pairs_into_labelled_rows_and_rotates_kl_completions() -> None:
    pair = _pair({"prompt": "spell: 1 2", "chosen": "one two", "rejected": "two one"})
    (good, good_label), (bad, bad_label) = labelled(pair)
    assert (good.chosen, good_label) == (pair.chosen, True)
    assert (bad.chosen, bad_label) == (pair.rejected, False)
    row = Example(messages=pair.messages, chosen=pair.rejected, label=False)
    assert labelled(row) == [(row, False)]

    rows = [{"prompt_ids": [i], "completion_ids": [10 + i], "label": True} for i in range(5)]
    kl = [r["KL_completion_ids"] for r in with_kl_completions(rows, batch_size=2)]
    assert kl == [[11], [10], [13], [12], [14]]  # within each batch, never across


def test_cpo_rows_mask_the_prompt_and_truncate_at_the_start() -> None:
    row = pair_row({"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}, 4)
    assert row["chosen_input_ids"] == [1, 2, 3, 4]
    assert row["chosen_labels"] == [-100, -100, 3, 4]
    assert row["rejected_input_ids"] == [1, 2, 6]
    assert row["rejected_labels"] == [-100, -100, 6]
    assert row["prompt_attention_mask"] == [1, 1]


# ---------------------------------------------------------------- losses against the papers


def _dpo_trainer(tiny_model: Path, tmp_path: Path, loss_type: str, beta: float) -> Any:
    from datasets import Dataset
    from lmforge.trainer.recipes.preference import TokenizedPairs
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = pairs.encode_pairs(
        [_pair(r) for r in preference_records(4, seed=1)], tokenizer, CHATML, "dpo"
    )
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that differs from the reference, so margins are not 0
        generator = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    args = DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type],
        beta=beta,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
    )
    trainer = type("DPO", (TokenizedPairs, DPOTrainer), {})(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator(records)
    logps = {
        name: pairs.pair_logps(model, records, pad_token_id=tokenizer.pad_token_id, max_length=64)
        for name, model in (("policy", policy), ("reference", reference))
    }
    return trainer, batch, logps["policy"], logps["reference"]


def test_dpo_loss_is_the_papers_formula(tiny_model: Path, tmp_path: Path) -> None:
    beta = 0.3
    trainer, batch, policy, reference = _dpo_trainer(tiny_model, tmp_path, "sigmoid", beta)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    # DPO paper, eq. 7: -log sigmoid(beta * (log pi/pi_ref (y_w) - log pi/pi_ref (y_l)))
    margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    expected = -F.logsigmoid(beta * margin).mean()
    assert margin.abs().min() > 1e-3  # the check is not about a zero margin
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


def test_ipo_loss_is_the_papers_formula(tiny_model: Path, tmp_path: Path) -> None:
    beta = 0.3
    trainer, batch, policy, reference = _dpo_trainer(tiny_model, tmp_path, "ipo", beta)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    # IPO paper, eq. 17: (h - 1/(2 tau))^2 with h the difference of the log-likelihood ratios,
    # here per token (TRL normalises by answer length, as the IPO authors' results do).
    h = (policy.chosen - reference.chosen) / policy.chosen_tokens - (
        policy.rejected - reference.rejected
    ) / policy.rejected_tokens
    expected = ((h - 1 / (2 * beta)) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


def test_preference_accuracy_counts_positive_margins() -> None:
    policy = pairs.SequenceLogps(
        torch.tensor([-1.0, -4.0, -2.0]),
        torch.tensor([-3.0, -2.0, -2.0]),
        torch.tensor([1.0, 4.0, 2.0]),
        torch.tensor([3.0, 1.0, 1.0]),
    )
    reference = pairs.SequenceLogps(
        torch.tensor([-2.0, -3.0, -2.0]),
        torch.tensor([-2.0, -3.0, -2.0]),
        torch.tensor([1.0, 4.0, 2.0]),
        torch.tensor([3.0, 1.0, 1.0]),
    )
    # margins over the reference: (1 - -1) = 2, (-1 - 1) = -2, 0 - 0 = 0 (a tie is not right)
    assert pairs.accuracy(pairs.reference_margins(policy, reference)) == pytest.approx(1 / 3)
    # per token: -1 vs -1 (tie), -1 vs -2 (right), -1 vs -2 (right)
    assert pairs.accuracy(pairs.normalised_margins(policy)) == pytest.approx(2 / 3)
    assert pairs.accuracy(torch.zeros(0)) is None
