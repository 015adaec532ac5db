"""The tiny model builder and the synthetic task that tests and the demo rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lmforge.trainer import tiny
from lmforge.trainer.data import Example, resolve_chat_template
from lmforge.trainer.evaluate import exact_match_accuracy
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATML = (
    "<|im_start|>user\nspell: 4 0 7<|im_end|>\n<|im_start|>assistant\nfour zero seven<|im_end|>\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_tokenizer_round_trips_through_from_pretrained(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    built = tiny.build_tokenizer([*tiny.bundled_texts(), *tiny.task_vocabulary_texts()])
    assert tokenizer.get_vocab() == built.get_vocab()
    assert 300 < len(tokenizer) <= 512
    for text in (CHATML, "The river runs through the town.\n  Twice!", "ünïcödé ☃"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template is None  # the data pipeline falls back to ChatML


def test_special_tokens_are_single_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    ids = set()
    for token in tiny.SPECIAL_TOKENS:
        encoded = tokenizer(f"x{token}y", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(encoded) == ["x", token, "y"]
        ids.add(tokenizer.convert_tokens_to_ids(token))
    assert len(ids) == len(tiny.SPECIAL_TOKENS)


def test_task_words_are_single_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answer = " ".join(tiny.DIGIT_WORDS)
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 10
    digits = "spell: " + " ".join("0123456789")
    assert len(tokenizer(digits, add_special_tokens=False)["input_ids"]) <= 12


def test_model_loads_with_auto_class(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids(tiny.IM_END)
    assert im_end in model.generation_config.eos_token_id
    inputs = tokenizer(CHATML, return_tensors="pt", add_special_tokens=False)
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_builder_is_reproducible(model_dir: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    first, second, third = _weights(model_dir), _weights(again), _weights(other)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])
    assert (model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_builder_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_model(tmp_path / "m", seed=7, hidden_size=32, num_layers=1, num_heads=2)
    assert torch.equal(torch.rand(3), expected)


def test_builder_accepts_own_texts_and_sizes(tmp_path: Path) -> None:
    texts = ["hello world, " * 20, "spell: 1 2 3 -> one two three"] * 5
    path = tiny.build_tiny_model(
        tmp_path / "m", texts=texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.hidden_size == 32
    assert model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(path)) <= 300


def test_task_records_are_well_formed() -> None:
    records = tiny.task_records(100, seed=0)
    assert len(records) == 100
    prompts = set()
    for record in records:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith("spell: ")
        digits = user["content"].removeprefix("spell: ").split()
        assert 3 <= len(digits) <= 5
        assert assistant["content"] == " ".join(tiny.DIGIT_WORDS[int(d)] for d in digits)
        prompts.add(user["content"])
    assert len(prompts) == 100


def test_task_records_are_deterministic_by_seed() -> None:
    assert tiny.task_records(50, seed=3) == tiny.task_records(50, seed=3)
    assert tiny.task_records(50, seed=3) != tiny.task_records(50, seed=4)
    assert tiny.task_records(20, seed=3) == tiny.task_records(50, seed=3)[:20]


def _prompts(records: list[dict]) -> set[str]:
    return {r["messages"][0]["content"] for r in records}


def test_train_and_eval_are_disjoint_whatever_the_seeds() -> None:
    train = _prompts(tiny.task_records(2000, seed=0) + tiny.task_records(2000, seed=1))
    evals = _prompts(tiny.task_records(500, seed=0, split="eval"))
    evals |= _prompts(tiny.task_records(500, seed=1, split="eval"))
    assert len(evals) > 500
    assert not train & evals


def test_bundled_task_files_are_current_and_disjoint(tmp_path: Path) -> None:
    data_dir = tiny.bundled_data_dir()
    fresh = tiny.write_task_data(tmp_path)
    for path in fresh:
        assert (data_dir / path.name).read_text() == path.read_text(), f"regenerate {path.name}"
    train, evals = (
        [json.loads(line) for line in (data_dir / name).read_text().splitlines()]
        for name in (tiny.TRAIN_FILE, tiny.EVAL_FILE)
    )
    assert not _prompts(train) & _prompts(evals)


def test_untrained_model_does_not_solve_the_task(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = tiny.task_records(50, seed=0, split="eval")
    examples = [Example(messages=tuple(r["messages"])) for r in records]
    accuracy = exact_match_accuracy(
        model,
        tokenizer,
        examples,
        chat_template=resolve_chat_template("auto", tokenizer),
        max_new_tokens=12,
        max_samples=50,
    )
    assert accuracy <= 0.05


def test_data_dir_can_be_relocated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiny.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LMFORGE_DATA_DIR"):
        tiny.bundled_texts()
    (tmp_path / tiny.CORPUS_FILE).write_text("first paragraph\n\nsecond\n")
    assert tiny.bundled_texts() == ["first paragraph", "second\n"]


def test_bundled_alignment_files_are_current_and_right() -> None:
    data_dir = tiny.bundled_data_dir()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for fresh in tiny.write_alignment_data(Path(tmp)):
            assert (data_dir / fresh.name).read_text() == fresh.read_text(), fresh.name
    prefs = [json.loads(line) for line in (data_dir / tiny.PREFERENCE_FILES["train"]).open()]
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    for p in prefs:  # chosen is the right spelling of the prompt's digits
        digits = p["prompt"].removeprefix(tiny.TASK_PREFIX).replace(" ", "")
        assert p["chosen"] == tiny.spell(digits)
    labels = [json.loads(line)["label"] for line in (data_dir / tiny.KTO_FILE).open()]
    assert 0.4 < sum(labels) / len(labels) < 0.6
