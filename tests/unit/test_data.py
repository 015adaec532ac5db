"""The trainer data pipeline: formats, validation, mixing, templates, tokenization, packing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lmforge.trainer.attention import padding_free  # noqa: E402
from lmforge.trainer.data import (  # noqa: E402
    NAMED_TEMPLATES,
    DataCollator,
    DataError,
    Example,
    encode_prompt,
    load_examples,
    load_source,
    resolve_chat_template,
    tokenize_examples,
)

from lmforge.api.common import DatasetSpec, DataSource, EvalSplit  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def load(uri: str, data_format: str = "auto") -> list[Example]:
    return load_source(DataSource(uri=uri, format=data_format), FIXTURES)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_tokenizer()


def build_tokenizer() -> Any:
    """A small byte-level BPE tokenizer built locally (no hub), with BOS added to plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "Hello there, how are you? I am fine, thank you.",
        "user assistant system: What is the capital of France? Paris.",
        "The quick brown fox jumps over the lazy dog. Rivers flow to the sea.",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


# ---------------------------------------------------------------- formats


def test_plain_text_file_has_one_document_per_paragraph() -> None:
    examples = load("plain.txt")
    assert [e.text for e in examples] == [
        "The first document\nspans two lines.",
        "The second document.",
        "The third document.",
    ]
    assert [e.origin for e in examples] == ["plain.txt:1", "plain.txt:4", "plain.txt:7"]


@pytest.mark.parametrize("uri", ["text.jsonl", "lmflow_text_only.json"])
def test_text_records(uri: str) -> None:
    examples = load(uri)
    assert [e.text for e in examples] == ["Rivers flow to the sea.", "Mountains rise over time."]
    assert all(e.messages == () for e in examples)


def test_lmflow_text2text_is_user_then_assistant() -> None:
    examples = load("lmflow_text2text.json")
    assert examples[1].messages == (user("Capital of France?"), assistant("Paris"))
    assert examples[1].origin == "lmflow_text2text.json[1]"
    assert examples[1].reference == "Paris"


def test_lmflow_conversation_keeps_system_and_tools() -> None:
    (example,) = load("lmflow_conversation.json")
    assert example.messages == (
        system("You are terse."),
        user("Hi"),
        assistant("Hello"),
        user("What is 2 + 2?"),
        assistant("4"),
    )
    assert example.tools == (
        {"name": "add", "parameters": {"a": "int", "b": "int"}},
        {"description": "Look up the weather in a city."},
    )
    assert example.reference == "4"


def test_lmflow_paired_conversation_splits_shared_prompt() -> None:
    (example,) = load("lmflow_paired_conversation.json")
    assert example.messages == (system("Be kind."), user("How do I boil an egg?"))
    assert example.chosen == (assistant("Simmer it for nine minutes."),)
    assert example.rejected == (assistant("Figure it out."),)


def test_alpaca_joins_input_and_unrolls_history() -> None:
    first, second = load("alpaca.json")
    assert first.messages == (user("Translate to French\ncat"), assistant("chat"))
    assert second.messages == (
        system("You translate."),
        user("Translate to French: cat"),
        assistant("chat"),
        user("And dog?"),
        assistant("chien"),
    )


def test_sharegpt_maps_speakers_and_tool_turns() -> None:
    first, second = load("sharegpt.jsonl")
    assert first.messages == (system("Be nice."), user("Hi"), assistant("Hello!"))
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool", "assistant"]
    assert second.messages[2]["content"] == '{"temp": 21}'
    assert second.tools == ({"name": "weather", "parameters": {"city": "string"}},)
    assert second.origin == "sharegpt.jsonl:2"


def test_openai_messages() -> None:
    first, second = load("openai.jsonl")
    assert first.messages == (
        system("You are Marv."),
        user("Capital of France?"),
        assistant("Paris, obviously."),
    )
    assert second.messages == (user("2 + 2?"), assistant("4"))


def test_preference_with_strings_and_messages() -> None:
    first, second = load("preference.jsonl")
    assert first.messages == (user("Name a colour."),)
    assert first.chosen == (assistant("Blue."),)
    assert first.rejected == (assistant("Seven."),)
    assert second.messages == (system("Answer briefly."), user("Sky colour?"))
    assert second.rejected == (assistant("It depends on many factors."),)
    assert second.reference == "Blue."


def test_preference_in_llama_factory_sharegpt_layout() -> None:
    (example,) = load("preference_sharegpt.jsonl")
    assert example.messages == (system("Be kind."), user("Name a colour."))
    assert example.chosen == (assistant("Blue."),)
    assert example.rejected == (assistant("Seven."),)


def test_preference_with_implicit_prompt(tmp_path: Path) -> None:
    prompt = [user("Hi"), assistant("Hello"), user("Sky colour?")]
    write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"chosen": [*prompt, assistant("Blue.")], "rejected": [*prompt, assistant("Red.")]}],
    )
    (example,) = load_source(DataSource(uri="pairs.jsonl", format="preference"), tmp_path)
    assert example.messages == tuple(prompt)
    assert example.chosen == (assistant("Blue."),)
    assert example.rejected == (assistant("Red."),)


def test_kto_records() -> None:
    good, bad = load("kto.jsonl")
    assert good.messages == (user("Name a colour."),)
    assert good.chosen == (assistant("Blue."),) and good.label is True
    assert bad.chosen == (assistant("Seven."),) and bad.label is False


def test_kto_sees_a_pair_as_a_desirable_and_an_undesirable_row() -> None:
    from lmforge.trainer.recipes.kto import labelled

    good, bad = load("kto.jsonl")
    assert labelled(good) == [(good, True)] and labelled(bad) == [(bad, False)]
    (pair,) = load("preference.jsonl")[:1]
    rows = labelled(pair)
    assert [(row.chosen, label) for row, label in rows] == [
        (pair.chosen, True),
        (pair.rejected, False),
    ]
    assert all(row.messages == pair.messages and not row.rejected for row, _ in rows)
    prompt_only = load("prompt.jsonl")[0]
    assert labelled(prompt_only) == []


def test_prompt_records() -> None:
    first, second = load("prompt.jsonl")
    assert first.messages == (user("Write a haiku about rain."),)
    assert second.messages == (system("Be poetic."), user("Describe snow."))
    assert first.reference is None


@pytest.mark.parametrize(
    ("uri", "data_format"),
    [
        ("text.jsonl", "text"),
        ("lmflow_text_only.json", "text_only"),
        ("lmflow_text2text.json", "text2text"),
        ("lmflow_conversation.json", "conversation"),
        ("lmflow_paired_conversation.json", "paired_conversation"),
        ("alpaca.json", "alpaca"),
        ("sharegpt.jsonl", "sharegpt"),
        ("openai.jsonl", "openai"),
        ("preference.jsonl", "preference"),
        ("preference_sharegpt.jsonl", "preference"),
        ("kto.jsonl", "kto"),
        ("prompt.jsonl", "prompt"),
    ],
)
def test_auto_detection_matches_explicit_format(uri: str, data_format: str) -> None:
    assert load(uri, "auto") == load(uri, data_format)


def test_auto_detection_reads_keys_of_plain_records(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t2t.jsonl", [{"input": "a?", "output": "b"}])
    write_jsonl(tmp_path / "conv.jsonl", [{"system": "s", "messages": [user("u"), assistant("a")]}])
    (t2t,) = load_source(DataSource(uri="t2t.jsonl"), tmp_path)
    (conv,) = load_source(DataSource(uri="conv.jsonl"), tmp_path)
    assert t2t.messages == (user("a?"), assistant("b"))
    assert conv.messages == (system("s"), user("u"), assistant("a"))


def test_directory_source_reads_json_files_recursively_in_order() -> None:
    examples = load("directory")
    assert [e.origin for e in examples] == ["directory/b.jsonl:1", "directory/nested/a.json[0]"]
    assert [e.reference for e in examples] == ["b", "a"]


def test_absolute_and_file_uris(tmp_path: Path) -> None:
    path = FIXTURES / "openai.jsonl"
    absolute = load_source(DataSource(uri=str(path)), tmp_path)
    with_scheme = load_source(DataSource(uri=f"file://{path}"), tmp_path)
    relative = load("file://openai.jsonl")
    assert [e.messages for e in absolute] == [e.messages for e in relative]
    assert absolute == with_scheme
    assert relative[0].origin == "openai.jsonl:1"


def test_hub_uri_of_a_local_dataset_folder() -> None:
    examples = load("hf://hub_dataset")
    assert [e.messages for e in examples] == [
        (user("Hub one?"), assistant("one")),
        (user("Hub two?"), assistant("two")),
    ]
    assert examples[0].origin == "hf://hub_dataset[0]"


def test_unreachable_hub_names_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying an unreachable network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load("hf://lmforge-tests/no-such-dataset@v1")
    assert "hf://lmforge-tests/no-such-dataset@v1" in str(err.value)


# ---------------------------------------------------------------- validation


def test_malformed_jsonl_lists_every_bad_line() -> None:
    with pytest.raises(DataError) as err:
        load("malformed/alpaca.jsonl")
    message = str(err.value)
    assert "malformed/alpaca.jsonl:line 2: field 'output': missing" in message
    assert "malformed/alpaca.jsonl:line 3: field 'instruction': must be a string" in message
    assert "malformed/alpaca.jsonl:line 4: not valid JSON" in message
    assert "malformed/alpaca.jsonl:line 5: field 'output': must not be empty" in message
    assert [(p.location, p.field) for p in err.value.problems] == [
        ("line 2", "output"),
        ("line 3", "instruction"),
        ("line 4", ""),
        ("line 5", "output"),
    ]


def test_malformed_json_names_record_index_and_field() -> None:
    with pytest.raises(DataError) as err:
        load("malformed/conversations.json")
    found = {(p.location, p.field) for p in err.value.problems}
    assert found == {
        ("record 1", "messages[0].role"),
        ("record 2", "messages[1].content"),
        ("record 3", "messages"),
        ("record 4", ""),
    }
    message = str(err.value)
    assert "conversations.json:record 1: field 'messages[0].role': 'human' is not one of" in message
    assert "must end with an assistant turn" in message


def test_unknown_keys_name_the_file_the_keys_and_the_formats() -> None:
    with pytest.raises(DataError) as err:
        load("malformed/unknown.jsonl")
    message = str(err.value)
    assert "malformed/unknown.jsonl" in message
    assert "['answer', 'question']" in message
    assert "alpaca" in message and "sharegpt" in message


def test_lmflow_type_must_be_known_and_agree_with_format() -> None:
    with pytest.raises(DataError, match="'float_only' is not supported"):
        load("malformed/lmflow_bad_type.json")
    with pytest.raises(DataError, match="'conversation' contradicts the source's format 'alpaca'"):
        load("lmflow_conversation.json", "alpaca")


def test_unsupported_scheme_and_missing_path() -> None:
    with pytest.raises(DataError, match=r"gs://bucket/data\.jsonl.*unsupported scheme"):
        load("gs://bucket/data.jsonl")
    with pytest.raises(DataError, match="no such file or directory"):
        load("missing.jsonl")


def test_problems_of_all_sources_come_in_one_error_capped_at_twenty(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": f"q{i}"} for i in range(30)])
    spec = DatasetSpec(
        sources=[
            DataSource(uri="bad.jsonl", format="alpaca"),
            DataSource(uri=str(FIXTURES / "malformed")),
        ]
    )
    with pytest.raises(DataError) as err:
        load_examples(spec, tmp_path, seed=1)
    problems = err.value.problems
    assert len(problems) == 30 + 4 + 4 + 1 + 1
    assert {Path(p.file).name for p in problems} >= {"bad.jsonl", "alpaca.jsonl", "unknown.jsonl"}
    message = str(err.value)
    assert message.count("field 'output': missing") == 20
    assert f"... and {len(problems) - 20} more problems" in message


# ---------------------------------------------------------------- mixing


def _numbered_source(folder: Path, name: str, count: int) -> str:
    write_jsonl(folder / name, [{"text": f"{name} {i}"} for i in range(count)])
    return name


def test_weights_repeat_and_sample_records(tmp_path: Path) -> None:
    a = _numbered_source(tmp_path, "a.jsonl", 10)
    b = _numbered_source(tmp_path, "b.jsonl", 4)
    spec = DatasetSpec(sources=[DataSource(uri=a, weight=2.5), DataSource(uri=b, weight=0.5)])
    train, evaluation = load_examples(spec, tmp_path, seed=7)
    assert evaluation == []
    counts = Counter(e.text for e in train)
    a_counts = [counts[f"a.jsonl {i}"] for i in range(10)]
    b_counts = [counts[f"b.jsonl {i}"] for i in range(4)]
    assert sorted(a_counts) == [2] * 5 + [3] * 5
    assert sorted(b_counts) == [0, 0, 1, 1]
    assert len(train) == 27
    again, _ = load_examples(spec, tmp_path, seed=7)
    other, _ = load_examples(spec, tmp_path, seed=8)
    assert again == train
    assert [e.text for e in other] != [e.text for e in train]


def test_eval_fraction_is_held_out_before_weighting(tmp_path: Path) -> None:
    a = _numbered_source(tmp_path, "a.jsonl", 16)
    b = _numbered_source(tmp_path, "b.jsonl", 4)
    spec = DatasetSpec(
        sources=[DataSource(uri=a, weight=2), DataSource(uri=b)],
        eval_split=EvalSplit(fraction=0.25),
    )
    train, evaluation = load_examples(spec, tmp_path, seed=3)
    assert len(evaluation) == 5
    held = {e.text for e in evaluation}
    assert not held & {e.text for e in train}
    held_from_a = sum(text.startswith("a.jsonl") for text in held)
    assert len(train) == (16 - held_from_a) * 2 + (4 - (5 - held_from_a))


def test_eval_sources_are_used_whole(tmp_path: Path) -> None:
    a = _numbered_source(tmp_path, "a.jsonl", 6)
    e = _numbered_source(tmp_path, "e.jsonl", 3)
    spec = DatasetSpec(
        sources=[DataSource(uri=a)],
        eval_split=EvalSplit(fraction=0.5, sources=[DataSource(uri=e)]),
    )
    train, evaluation = load_examples(spec, tmp_path, seed=0)
    assert sorted(x.text for x in train) == sorted(f"a.jsonl {i}" for i in range(6))
    assert sorted(x.text for x in evaluation) == [f"e.jsonl {i}" for i in range(3)]


# ---------------------------------------------------------------- templates


CHAT = Example(
    messages=(
        system("Be brief."),
        user("Hi"),
        assistant("Hello there"),
        user("What is the capital of France?"),
        assistant("Paris."),
    )
)


def test_resolve_chat_template(tokenizer: Any) -> None:
    assert resolve_chat_template("none", tokenizer) is None
    assert resolve_chat_template("auto", tokenizer) == NAMED_TEMPLATES["chatml"]
    assert resolve_chat_template("llama3", tokenizer) == NAMED_TEMPLATES["llama3"]
    with_own = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with_own.chat_template = "{{ messages[0]['content'] }}"
    assert resolve_chat_template("auto", with_own) == "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="unknown chat template"):
        resolve_chat_template("nope", tokenizer)


def test_chatml_renders_the_known_layout(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(
        [user("Hi")],
        chat_template=NAMED_TEMPLATES["chatml"],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def _labelled_runs(tokenizer: Any, record: dict[str, list[int]]) -> list[str]:
    """Decoded text of each contiguous run of trained tokens."""
    runs: list[list[int]] = []
    previous = False
    for label in record["labels"]:
        if label != -100:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != -100
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize(
    ("template", "runs"),
    [
        ("chatml", ["Hello there<|im_end|>", "Paris.<|im_end|></s>"]),
        ("qwen2", ["Hello there<|im_end|>", "Paris.<|im_end|></s>"]),
        ("alpaca", ["Hello there</s>", "Paris.</s>"]),
        ("zephyr", ["Hello there</s>", "Paris.</s>"]),
        ("vicuna", ["Hello there</s>", "Paris.</s>"]),
        ("mistral", ["Hello there</s>", "Paris.</s>"]),
        ("gemma", ["Hello there<end_of_turn>", "Paris.<end_of_turn></s>"]),
        ("llama3", ["Hello there<|eot_id|>", "Paris.<|eot_id|></s>"]),
    ],
)
def test_labels_cover_only_assistant_turns(tokenizer: Any, template: str, runs: list[str]) -> None:
    data = tokenize_examples(
        [CHAT],
        tokenizer,
        chat_template=NAMED_TEMPLATES[template],
        max_seq_length=512,
        train_on_prompt=False,
        packing=False,
    )
    (record,) = data.records
    # Markers the tokenizer lacks (llama3, gemma) are plain text and still fully covered.
    assert [run.strip() for run in _labelled_runs(tokenizer, record)] == runs
    assert record["input_ids"][-1] == tokenizer.eos_token_id
    assert data.stats["trainable_tokens"] == sum(label != -100 for label in record["labels"])


def test_plain_concatenation_without_template(tokenizer: Any) -> None:
    data = tokenize_examples(
        [CHAT],
        tokenizer,
        chat_template=None,
        max_seq_length=512,
        train_on_prompt=False,
        packing=False,
    )
    (record,) = data.records
    text = tokenizer.decode(record["input_ids"], skip_special_tokens=False)
    assert text == (
        "<s>system: Be brief.\nuser: Hi\nassistant: Hello there\n"
        "user: What is the capital of France?\nassistant: Paris.</s>"
    )
    assert [r.strip() for r in _labelled_runs(tokenizer, record)] == ["Hello there", "Paris.</s>"]


def test_train_on_prompt_trains_every_token_but_the_first(tokenizer: Any) -> None:
    data = tokenize_examples(
        [CHAT],
        tokenizer,
        chat_template=NAMED_TEMPLATES["chatml"],
        max_seq_length=512,
        train_on_prompt=True,
        packing=False,
    )
    (record,) = data.records
    assert record["labels"][0] == -100
    assert record["labels"][1:] == record["input_ids"][1:]


def test_tools_reach_the_template(tokenizer: Any) -> None:
    example = load("lmflow_conversation.json")[0]
    data = tokenize_examples(
        [example],
        tokenizer,
        chat_template=NAMED_TEMPLATES["qwen2"],
        max_seq_length=1024,
        train_on_prompt=False,
        packing=False,
    )
    text = tokenizer.decode(data.records[0]["input_ids"])
    assert '{"name": "add"' in text


def test_text_examples_train_every_token_and_end_with_eos(tokenizer: Any) -> None:
    data = tokenize_examples(
        load("text.jsonl"),
        tokenizer,
        chat_template=None,
        max_seq_length=512,
        train_on_prompt=False,
        packing=False,
    )
    for record in data.records:
        assert record["input_ids"][0] == tokenizer.bos_token_id
        assert record["input_ids"][-1] == tokenizer.eos_token_id
        assert record["labels"][1:] == record["input_ids"][1:]
    assert data.stats["records"] == 2
    assert data.stats["truncated"] == 0


def test_truncation_is_counted(tokenizer: Any) -> None:
    examples = [Example(text="Rivers flow to the sea. " * 20), Example(text="Hi")]
    data = tokenize_examples(
        examples,
        tokenizer,
        chat_template=None,
        max_seq_length=16,
        train_on_prompt=False,
        packing=False,
    )
    assert [len(r["input_ids"]) for r in data.records] == [16, len(data.records[1]["input_ids"])]
    assert data.stats["truncated"] == 1
    assert data.stats["truncated_fraction"] == 0.5
    assert data.stats["max_length"] == 16
    assert data.stats["tokens"] == sum(len(r["input_ids"]) for r in data.records)


def test_records_left_without_an_answer_are_dropped(tokenizer: Any) -> None:
    long_prompt = Example(messages=(user("Hello there " * 40), assistant("Paris.")))
    data = tokenize_examples(
        [long_prompt, CHAT],
        tokenizer,
        chat_template=NAMED_TEMPLATES["chatml"],
        max_seq_length=40,
        train_on_prompt=False,
        packing=False,
    )
    assert data.stats["dropped"] == 1
    assert data.stats["records"] == 1


# ---------------------------------------------------------------- collation and packing


def test_collator_pads_unpacked_batches(tokenizer: Any) -> None:
    records = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [-100]},
    ]
    batch = DataCollator(tokenizer, pad_to_multiple_of=4)(records)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [8, pad, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_collator_pads_with_eos_when_there_is_no_pad_token(tokenizer: Any) -> None:
    class NoPad:
        pad_token_id = None
        eos_token_id = tokenizer.eos_token_id

    batch = DataCollator(NoPad())([{"input_ids": [5, 6]}, {"input_ids": [5]}])
    assert batch["input_ids"][1, 1].item() == tokenizer.eos_token_id


def test_packing_fills_sequences_and_restarts_positions(tokenizer: Any) -> None:
    examples = [Example(text=f"Rivers flow to the sea {i}.") for i in range(10)]
    data = tokenize_examples(
        examples,
        tokenizer,
        chat_template=None,
        max_seq_length=40,
        train_on_prompt=False,
        packing=True,
    )
    lengths = [len(r["input_ids"]) for r in data.records]
    assert all(length <= 40 for length in lengths)
    assert data.stats["packed_sequences"] == len(data.records) < len(examples)
    assert sum(lengths) == data.stats["tokens"]
    starts = sum(r["position_ids"].count(0) for r in data.records)
    assert starts == len(examples)
    for record in data.records:
        for i, position in enumerate(record["position_ids"]):
            if position == 0:
                assert record["labels"][i] == -100  # never predicted across records


def _tiny_llama(vocab_size: int, attn_implementation: str) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_records_give_the_same_logits_as_alone(
    tokenizer: Any, attn_implementation: str
) -> None:
    examples = [
        CHAT,
        Example(text="Rivers flow to the sea."),
        Example(messages=(user("Capital of France?"), assistant("Paris."))),
        Example(text="The quick brown fox jumps over the lazy dog."),
        Example(messages=(user("Hi"), assistant("Hello"))),
    ]
    kwargs = {
        "chat_template": NAMED_TEMPLATES["chatml"],
        "max_seq_length": 96,
        "train_on_prompt": False,
    }
    alone = tokenize_examples(examples, tokenizer, packing=False, **kwargs).records
    packed = tokenize_examples(examples, tokenizer, packing=True, **kwargs).records
    assert 1 < len(packed) < len(alone)
    model = _tiny_llama(len(tokenizer), attn_implementation)
    batch = DataCollator(tokenizer)(packed)
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (len(packed), 1, width, width)
    with torch.no_grad():
        packed_logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        pieces = []
        for row, record in enumerate(packed):
            starts = [i for i, p in enumerate(record["position_ids"]) if p == 0]
            ends = [*starts[1:], len(record["position_ids"])]
            for start, end in zip(starts, ends, strict=True):
                ids = torch.tensor([record["input_ids"][start:end]])
                expected = model(input_ids=ids).logits[0]
                torch.testing.assert_close(
                    packed_logits[row, start:end], expected, atol=1e-4, rtol=0
                )
                pieces.append(record["input_ids"][start:end])
    # Every record is packed whole, once (packing may reorder them).
    assert sorted(pieces) == sorted(r["input_ids"] for r in alone)
    # The loss sees the same targets packed or not (a causal LM's first label is never one;
    # in a packed row, no record's first token is predicted from the record before it).
    trained_alone = sum(sum(label != -100 for label in r["labels"][1:]) for r in alone)
    assert (batch["labels"][:, 1:] != -100).sum().item() == trained_alone


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_free_batches_train_exactly_as_the_block_mask(
    tokenizer: Any, attn_implementation: str
) -> None:
    """One row of every record, no padding and no mask: transformers finds the records from
    the position ids, so logits, loss and gradients equal the dense block mask's."""
    examples = [CHAT, Example(text="Rivers flow to the sea."), *load("alpaca.json")[:6]]
    packed = tokenize_examples(
        examples,
        tokenizer,
        chat_template=NAMED_TEMPLATES["chatml"],
        max_seq_length=96,
        train_on_prompt=False,
        packing=True,
    ).records
    model = _tiny_llama(len(tokenizer), attn_implementation)
    dense = DataCollator(tokenizer)(packed)
    flat = DataCollator(tokenizer, padding_free=True, pad_to_multiple_of=8)(packed)
    tokens = sum(len(r["input_ids"]) for r in packed)
    assert "attention_mask" not in flat and flat["use_cache"] is False
    assert flat["input_ids"].shape == (1, -(-tokens // 8) * 8)  # padded only to the multiple
    real = torch.cat([dense["input_ids"][i, : len(r["input_ids"])] for i, r in enumerate(packed)])
    assert torch.equal(flat["input_ids"][0, :tokens], real)

    def loss_and_grads(batch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    dense_loss, dense_grads = loss_and_grads(dense)
    flat_loss, flat_grads = loss_and_grads(flat)
    torch.testing.assert_close(flat_loss, dense_loss, atol=1e-5, rtol=1e-5)
    for flat_grad, dense_grad in zip(flat_grads, dense_grads, strict=True):
        torch.testing.assert_close(flat_grad, dense_grad, atol=1e-5, rtol=1e-4)
    # Without the position ids the records would see each other: the check can fail.
    mixed = {k: v for k, v in flat.items() if k != "position_ids"}
    assert not torch.allclose(model(**mixed).loss, dense_loss, atol=1e-3)
    # What the trainer picks: padding-free only with a varlen (flash) kernel, never when the
    # adapter learns a prompt (PEFT ignores position ids then).
    assert padding_free(model) is False
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert padding_free(flash) is True
    peft = pytest.importorskip("peft")
    prompted = peft.get_peft_model(
        model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    assert padding_free(prompted) is False


def test_block_mask_layout_with_padding(tokenizer: Any) -> None:
    records = [
        {
            "input_ids": [5, 6, 7, 8, 9],
            "labels": [-100, 6, 7, -100, 9],
            "position_ids": [0, 1, 2, 0, 1],
        },
        {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
    ]
    batch = DataCollator(tokenizer, mask_dtype=torch.bfloat16)(records)
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bfloat16 and mask.shape == (2, 1, 5, 5)
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # Padding attends only to itself, so no row is fully masked.
    assert allowed[1] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100, -100]


def test_collator_drives_a_trainer_step_on_packed_data(tokenizer: Any, tmp_path: Path) -> None:
    examples = [CHAT, Example(text="Rivers flow to the sea."), *load("alpaca.json")]
    data = tokenize_examples(
        examples,
        tokenizer,
        chat_template=NAMED_TEMPLATES["chatml"],
        max_seq_length=128,
        train_on_prompt=False,
        packing=True,
    )
    model = _tiny_llama(len(tokenizer), "sdpa")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data.records, data_collator=DataCollator(tokenizer)
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


@pytest.mark.parametrize("template", ["chatml", "llama3", None])
def test_prompt_for_generation_matches_training(tokenizer: Any, template: str | None) -> None:
    """Evaluation and serving prompt the model exactly as training showed it the prompt."""
    chat_template = NAMED_TEMPLATES[template] if template else None
    (record,) = tokenize_examples(
        [CHAT],
        tokenizer,
        chat_template=chat_template,
        max_seq_length=512,
        train_on_prompt=False,
        packing=False,
    ).records
    prompt = encode_prompt(CHAT.messages[:-1], tokenizer, chat_template)
    assert record["input_ids"][: len(prompt)] == prompt
    # The first trained token comes right after the prompt of the last turn.
    assert record["labels"][len(prompt)] != -100


# ---------------------------------------------------------------- content parts


def test_openai_content_parts_are_joined_text(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]
    write_jsonl(
        tmp_path / "parts.jsonl",
        [{"messages": [{"role": "user", "content": parts}, assistant_parts("4")]}],
    )
    for data_format in ("auto", "openai", "conversation"):
        (example,) = load_source(DataSource(uri="parts.jsonl", format=data_format), tmp_path)
        assert example.messages == (user("What is\n2 + 2?"), assistant("4"))


def assistant_parts(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_non_text_content_parts_are_rejected_by_type(tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
    write_jsonl(
        tmp_path / "image.jsonl",
        [
            {"messages": [{"role": "user", "content": [image]}, assistant("a cat")]},
            {"conversations": [{"from": "human", "value": [{"text": "no type"}]}]},
        ],
    )
    with pytest.raises(DataError) as err:
        load_source(DataSource(uri="image.jsonl", format="openai"), tmp_path)
    message = str(err.value)
    assert (
        "image.jsonl:line 1: field 'messages[0].content[0].type': 'image_url' parts are not "
        "supported; only text parts are" in message
    )
    with pytest.raises(DataError, match=r"conversations\[0\]\.value\[0\]': must be a content"):
        load_source(DataSource(uri="image.jsonl", format="sharegpt"), tmp_path)


# ---------------------------------------------------------------- plain text documents


@pytest.mark.parametrize(
    ("split", "texts"),
    [
        ("paragraph", ["a\nb", "c", "d"]),
        ("line", ["a", "b", "c", "d"]),
        ("file", ["a\nb\n\nc\n\n\nd"]),
    ],
)
def test_text_split_options(tmp_path: Path, split: str, texts: list[str]) -> None:
    (tmp_path / "corpus.txt").write_text("a\nb\n\nc\n\n\nd\n")
    examples = load_source(DataSource(uri="corpus.txt", text_split=split), tmp_path)
    assert [e.text for e in examples] == texts


def test_tabular_files_are_read(tmp_path: Path) -> None:
    import datasets

    rows = {"instruction": ["2 + 2?", "3 + 3?"], "output": ["4", "6"]}
    table = datasets.Dataset.from_dict(rows)
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.to_csv(str(tmp_path / "t.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    for uri in ("t.parquet", "t.csv", str(arrow)):
        examples = load_source(DataSource(uri=uri), tmp_path)
        assert [e.messages for e in examples] == [
            (user("2 + 2?"), assistant("4")),
            (user("3 + 3?"), assistant("6")),
        ], uri
    bad = datasets.Dataset.from_dict({"instruction": ["q"], "answer": ["a"]})
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet:record 0: cannot detect the format"):
        load_source(DataSource(uri="bad.parquet"), tmp_path)


# ---------------------------------------------------------------- prepare_data


def prepare(
    tmp_path: Path,
    tokenizer: Any,
    *,
    pretraining: bool = False,
    template: str | None = None,
    **spec: Any,
) -> Any:
    from lmforge.trainer.data import prepare_data

    return prepare_data(
        DatasetSpec(**spec),
        tokenizer,
        chat_template=template,
        continued_pretraining=pretraining,
        base_dir=tmp_path,
        seed=0,
        cache_dir=tmp_path / "cache",
    )


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "rivers",
    "flow",
    "to",
    "sea",
    "hello",
    "there",
    "how",
    "are",
    "you",
]


def _documents(count: int) -> list[str]:
    """Documents of different lengths (tens to hundreds of words)."""
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20 + (i * 37) % 300))
        for i in range(count)
    ]


def _corpus_tokens(tokenizer: Any, documents: list[str]) -> int:
    """Tokens of every document on its own, with its EOS: what pretraining must keep."""
    return sum(len(tokenizer(doc)["input_ids"]) + 1 for doc in documents)


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_continued_pretraining_keeps_the_corpus(
    tmp_path: Path, tokenizer: Any, layout: str
) -> None:
    documents = _documents(30)
    if layout == "txt":
        (tmp_path / "corpus.txt").write_text("\n\n".join(documents) + "\n")
    else:
        write_jsonl(tmp_path / "corpus.jsonl", [{"text": doc} for doc in documents])
    data = prepare(
        tmp_path,
        tokenizer,
        pretraining=True,
        sources=[DataSource(uri=f"corpus.{layout}")],
        max_seq_length=256,
    )
    stats = data.stats["train"]
    corpus = _corpus_tokens(tokenizer, documents)
    assert stats["documents"] == 30
    assert stats["tokens_in"] == corpus
    assert stats["tokens_trained"] >= 0.99 * corpus
    assert stats["blocks"] == len(data.train) == -(-corpus // 256)
    assert all(
        len(block["input_ids"]) == 256 for block in data.train.select(range(len(data.train) - 1))
    )
    assert stats["partial_block"] == "kept"
    # Documents follow one another, each ending with EOS.
    stream = [t for block in data.train for t in block["input_ids"]]
    assert stream.count(tokenizer.eos_token_id) == 30
    assert data.metrics()["data_blocks"] == stats["blocks"]


def test_partial_last_block_can_be_dropped(tmp_path: Path, tokenizer: Any) -> None:
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": doc} for doc in _documents(5)])
    data = prepare(
        tmp_path,
        tokenizer,
        pretraining=True,
        sources=[DataSource(uri="corpus.jsonl")],
        max_seq_length=64,
        keep_partial_block=False,
    )
    stats = data.stats["train"]
    assert stats["partial_block"] == "dropped"
    assert all(len(block["input_ids"]) == 64 for block in data.train)
    assert stats["tokens"] == 64 * stats["blocks"] < stats["tokens_in"]
    with pytest.raises(DataError, match="is shorter than one block of maxSeqLength 4,096"):
        prepare(
            tmp_path,
            tokenizer,
            pretraining=True,
            sources=[DataSource(uri="corpus.jsonl")],
            max_seq_length=4096,
            keep_partial_block=False,
        )


def _long_prompts(path: Path, count: int, long: int) -> None:
    """`long` conversations whose prompt alone is far over 32 tokens, then short ones."""
    records = []
    for i in range(count):
        prompt = "Hello there " * (40 if i < long else 1)
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": prompt},
                    {"from": "gpt", "value": f"Paris {i}."},
                ]
            }
        )
    write_jsonl(path, records)


def test_drops_and_truncation_are_warned_with_cause_and_fix(tmp_path: Path, tokenizer: Any) -> None:
    _long_prompts(tmp_path / "chats.jsonl", 10, 3)
    template = NAMED_TEMPLATES["chatml"]
    data = prepare(
        tmp_path,
        tokenizer,
        template=template,
        sources=[DataSource(uri="chats.jsonl")],
        max_seq_length=32,
    )
    stats = data.stats["train"]
    long_prompt = Example(messages=(user("Hello there " * 40), assistant("Paris 0.")))
    (encoded,) = [
        tokenize_examples(
            [long_prompt],
            tokenizer,
            chat_template=template,
            max_seq_length=10_000,
            train_on_prompt=False,
            packing=False,
        ).records
    ]
    prompt_tokens = encoded[0]["labels"].index(next(x for x in encoded[0]["labels"] if x != -100))
    assert stats["dropped"] == 3 and stats["truncated"] == 3 and stats["records"] == 7
    assert len(data.train) == 7
    assert data.warnings[0] == (
        f"3 of 10 training records have no assistant tokens within maxSeqLength 32; "
        f"the longest prompt is {prompt_tokens:,} tokens; raise dataset.maxSeqLength"
    )
    assert data.warnings[1].startswith("3 of 10 training records are longer than maxSeqLength 32")
    assert "3 dropped, 3 truncated at maxSeqLength 32" in data.summary
    assert data.stats["summary"] == data.summary and data.stats["warnings"] == data.warnings
    assert data.metrics()["data_dropped"] == 3


def test_nothing_left_to_train_fails_with_the_summary(tmp_path: Path, tokenizer: Any) -> None:
    _long_prompts(tmp_path / "chats.jsonl", 4, 4)
    with pytest.raises(DataError) as err:
        prepare(
            tmp_path,
            tokenizer,
            template=NAMED_TEMPLATES["chatml"],
            sources=[DataSource(uri="chats.jsonl")],
            max_seq_length=32,
        )
    message = str(err.value)
    assert "no record is left to train on (4 training examples -> 0 records" in message
    assert "4 of 4 training records have no assistant tokens within maxSeqLength 32" in message


def test_prepared_records_match_in_memory_tokenization(tmp_path: Path, tokenizer: Any) -> None:
    template = NAMED_TEMPLATES["chatml"]
    source = DataSource(uri=str(FIXTURES / "sharegpt.jsonl"))
    data = prepare(tmp_path, tokenizer, template=template, sources=[source], max_seq_length=512)
    examples = load_source(source, tmp_path)
    expected = tokenize_examples(
        examples,
        tokenizer,
        chat_template=template,
        max_seq_length=512,
        train_on_prompt=False,
        packing=False,
    )
    assert sorted(map(str, (dict(r) for r in data.train))) == sorted(
        str({"input_ids": r["input_ids"], "labels": r["labels"]}) for r in expected.records
    )
    for key in ("records", "tokens", "trainable_tokens", "dropped", "truncated"):
        assert data.stats["train"][key] == expected.stats[key], key


def test_prepared_packing_keeps_every_record_and_reports_its_efficiency(
    tmp_path: Path, tokenizer: Any
) -> None:
    texts = [" ".join(WORDS[: 1 + (i * 7) % 25]) + f" {i}" for i in range(60)]
    for folder in ("alone", "packed"):  # one cache folder each
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "texts.jsonl", [{"text": text} for text in texts])
    spec: dict[str, Any] = {
        "sources": [DataSource(uri="texts.jsonl")],
        "max_seq_length": 64,
        "eval_split": EvalSplit(fraction=0.0),
    }
    alone = prepare(tmp_path / "alone", tokenizer, **spec, packing=False)
    data = prepare(tmp_path / "packed", tokenizer, **spec, packing=True)
    stats = data.stats["train"]
    lengths = [len(r["input_ids"]) for r in data.train]
    assert stats["packed_sequences"] == len(data.train) < stats["records"] == 60
    assert stats["packed_longest"] == max(lengths) <= 64
    assert stats["packing_efficiency"] == stats["tokens"] / (len(lengths) * max(lengths)) > 0.95
    pieces = []
    for record in data.train:
        starts = [t for t, p in enumerate(record["position_ids"]) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(record["input_ids"])], strict=True):
            pieces.append((record["input_ids"][start:end], record["labels"][start:end]))
    assert sorted(pieces) == sorted((r["input_ids"], r["labels"]) for r in alone.train)
    assert f"packed into {len(lengths)} sequences of at most {max(lengths)} tokens" in data.summary


def test_prepared_hold_out_and_weights_match_load_examples(tmp_path: Path, tokenizer: Any) -> None:
    a = _numbered_source(tmp_path, "a.jsonl", 16)
    b = _numbered_source(tmp_path, "b.jsonl", 4)
    spec = {
        "sources": [DataSource(uri=a, weight=2.5), DataSource(uri=b, weight=0.5)],
        "eval_split": EvalSplit(fraction=0.25),
    }
    train, evaluation = load_examples(DatasetSpec(**spec), tmp_path, seed=0)
    data = prepare(tmp_path, tokenizer, **spec)
    assert sorted(e.text for e in data.eval_examples) == sorted(e.text for e in evaluation)
    texts = Counter(tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in data.train)
    assert texts == Counter(e.text for e in train)
    assert [(s["examples"], s["in_training"]) for s in data.stats["sources"]] == [
        (16, sum(e.text.startswith("a") for e in train)),
        (4, sum(e.text.startswith("b") for e in train)),
    ]


def test_prepared_in_worker_processes_matches_one_process(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three processes, each a contiguous range crossing file and batch boundaries, give the
    records, order and statistics one process gives; eval sources are tokenized too."""
    from lmforge.trainer.data import prepare

    monkeypatch.setattr(prepare, "BATCH", 6)  # tokenize 3 at a time
    monkeypatch.setattr(prepare, "FILE_BATCH", 5)  # several batches per file
    spec = {
        "sources": [
            DataSource(uri=_numbered_source(tmp_path, "a.jsonl", 17), weight=1.5),
            DataSource(uri=_numbered_source(tmp_path, "b.jsonl", 9)),
        ],
        "eval_split": EvalSplit(sources=[DataSource(uri=_numbered_source(tmp_path, "c.jsonl", 7))]),
        "packing": True,
        "max_seq_length": 48,
    }
    results = []
    for workers in (1, 3):
        data = prepare.prepare_data(
            DatasetSpec(**spec),
            tokenizer,
            chat_template=None,
            continued_pretraining=False,
            base_dir=tmp_path,
            seed=0,
            cache_dir=tmp_path / f"cache-{workers}",
            num_proc=workers,
        )
        assert len(list((tmp_path / f"cache-{workers}").glob("tokens-*.arrow"))) == workers
        assert data.eval is not None
        results.append((data.train.to_list(), data.eval.to_list(), data.stats))
    assert results[0] == results[1]
    assert results[0][2]["train"]["examples"] == 17 + 9 + 9  # weight 1.5: 17 + half of 17
    assert results[0][2]["eval"]["examples"] == 7


def test_node_prepares_once_and_other_local_ranks_open_the_same_files(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun, local rank 0 prepares; rank 1 waits, then opens the same files with
    the same records, statistics and eval examples; an earlier launch's marker is ignored."""
    import threading

    from lmforge.trainer.data import prepare, prepare_once_per_node

    tokenized: list[int] = []
    tokenize_files = prepare.tokenize_files

    def counted(*args: Any, **kwargs: Any) -> Any:
        tokenized.append(threading.get_ident())
        return tokenize_files(*args, **kwargs)

    monkeypatch.setattr(prepare, "tokenize_files", counted)
    spec = DatasetSpec(
        sources=[DataSource(uri=_numbered_source(tmp_path, "a.jsonl", 30), weight=1.5)],
        eval_split=EvalSplit(fraction=0.2),
        packing=True,
        max_seq_length=48,
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepared-1-2.json").write_text("{}")  # stale: another launch's

    def prepare(local_rank: str) -> Any:
        return prepare_once_per_node(
            spec,
            tokenizer,
            chat_template=None,
            continued_pretraining=False,
            base_dir=tmp_path,
            seed=0,
            cache_dir=cache,
            env={"LOCAL_RANK": local_rank},
        )

    waited: dict[str, Any] = {}
    other = threading.Thread(target=lambda: waited.update(data=prepare("1")))
    other.start()
    first = prepare("0")
    other.join(timeout=60)
    second = waited["data"]
    assert not (cache / "prepared-1-2.json").exists()
    assert tokenized == [threading.get_ident()]  # once, by local rank 0
    assert second.train.to_list() == first.train.to_list() and len(first.train) > 0
    assert second.eval.to_list() == first.eval.to_list()
    assert list(second.eval_examples) == list(first.eval_examples) != []
    assert (second.stats, second.summary, second.warnings) == (
        first.stats,
        first.summary,
        first.warnings,
    )


def test_prepared_problems_keep_file_line_and_field(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(DataError) as err:
        prepare(tmp_path, tokenizer, sources=[DataSource(uri=str(FIXTURES / "malformed"))])
    assert ("line 2", "output") in {(p.location, p.field) for p in err.value.problems}
    assert "malformed/alpaca.jsonl:line 3: field 'instruction': must be a string" in str(err.value)


def test_validate_data_previews_without_training(
    tmp_path: Path, tokenizer: Any, capsys: Any
) -> None:
    import yaml

    from lmforge.cli import main

    tokenizer.save_pretrained(tmp_path / "model")
    _long_prompts(tmp_path / "chats.jsonl", 10, 3)
    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "preview"},
        "spec": {
            "model": {"source": "file://model", "chatTemplate": "chatml"},
            "dataset": {"sources": [{"uri": "chats.jsonl"}], "maxSeqLength": 32},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", "--data", "--samples", "2", str(tmp_path / "job.yaml")]) == 0
    out = capsys.readouterr().out
    assert "chats.jsonl: 10 valid records, weight 1 -> 10 in training" in out
    assert "record lengths before maxSeqLength 32: p50" in out
    assert "10 training examples -> 7 records" in out
    assert (
        "warning: 3 of 10 training records have no assistant tokens within maxSeqLength 32" in out
    )
    assert out.count("--- record") == 2
    assert re.search(r"\n  \[\[Paris \d\.<\|im_end\|></s>\]\]\n", out)  # trained tokens
    assert not (tmp_path / "lmforge-runs").exists()

    job["spec"]["dataset"]["sources"] = [{"uri": "missing.jsonl"}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", "--data", str(tmp_path / "job.yaml")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "data", "data_format", "expected"),
    [
        ("dpo", "tiny-preferences-train.jsonl", "preference", "0 of 1,000 records dropped"),
        ("reward-model", "tiny-preferences-train.jsonl", "preference", "pairs longer than"),
        ("kto", "tiny-kto-train.jsonl", "kto", "desirable and"),
        ("grpo", "tiny-prompts-train.jsonl", "prompt", "other fields: answer"),
    ],
)
def test_validate_data_previews_alignment_jobs(
    tmp_path: Path,
    tokenizer: Any,
    capsys: Any,
    method: str,
    data: str,
    data_format: str,
    expected: str,
) -> None:
    """`lmforge validate --data` on an AlignmentJob: its records as its method's recipe
    reads them (counts, lengths, drops, the first records), without loading the model."""
    import shutil

    import yaml

    from lmforge.cli import main

    tokenizer.save_pretrained(tmp_path / "model")
    shutil.copy(Path(__file__).parents[2] / "examples/data" / data, tmp_path / data)
    job: dict[str, Any] = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": "preview"},
        "spec": {
            "model": {"source": "file://model", "chatTemplate": "chatml"},
            "dataset": {"sources": [{"uri": data, "format": data_format}], "maxSeqLength": 64},
            "method": {"type": method},
        },
    }
    if method == "grpo":
        rule = {"type": "exact-match", "column": "answer"}
        job["spec"]["method"]["rewards"] = [{"name": "right", "rule": rule}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code = main(["validate", "--data", "--samples", "2", str(tmp_path / "job.yaml")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"method {method}: trains on" in captured.out
    assert "1,000 training records" in captured.out
    assert "prompt tokens: p50" in captured.out
    assert expected in captured.out
    assert "spell: " in captured.out  # the first records, rendered
    assert not (tmp_path / "lmforge-runs").exists()

    # Short maxSeqLength: drops are counted and explained with the fix.
    if method == "dpo":
        job["spec"]["dataset"]["maxSeqLength"] = 16
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        assert main(["validate", "--data", str(tmp_path / "job.yaml")]) == 1
        err = capsys.readouterr().err
        assert "no record has an answer token within maxSeqLength 16" in err
        assert "(the longest prompt is 25 tokens); raise it" in err


def test_validate_data_names_the_bad_alignment_record(
    tmp_path: Path, tokenizer: Any, capsys: Any
) -> None:
    import yaml

    from lmforge.cli import main

    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
    )
    job = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": "preview"},
        "spec": {
            "model": {"source": "file://model", "chatTemplate": "chatml"},
            "dataset": {"sources": [{"uri": "pairs.jsonl", "format": "preference"}]},
            "method": {"type": "dpo"},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", "--data", str(tmp_path / "job.yaml")]) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:line 2" in err and "rejected" in err
