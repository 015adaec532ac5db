"""Tiny models and a synthetic task for tests and the demo.

No model hub is reachable, so tests and the demo build their own base model: a
byte-level BPE tokenizer trained on the bundled corpus (``examples/data``) and
a small Llama-architecture model with random weights, saved as an ordinary
Hugging Face directory so the real ``from_pretrained`` code path loads it.

The task ("spell the digits") is one such a model learns from scratch in
seconds on one CPU thread, with full fine-tuning or LoRA::

    user:      spell: 4 0 7 2
    assistant: four zero seven two

Measured with the default model (64 wide, 2 layers, 4 heads, 512 tokens), the
bundled 1000 training records, batch 32, AdamW, cosine schedule with 5 % warmup,
loss on the answer only; held-out exact match goes from 0 % to:

- full fine-tuning, lr 3e-3, 400 steps (~9 s): 99-100 % (5 seeds);
- LoRA r=16, alpha=32, all linear layers, lr 3e-3, 800 steps (~20 s):
  97.5-100 % (5 seeds). LoRA at the usual lr 2e-4 learns nothing in budget.
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, IM_START, IM_END]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK_PREFIX = "spell:"
MIN_DIGITS, MAX_DIGITS = 3, 5
# One in EVAL_EVERY digit strings belongs to the eval split, decided by a hash of
# the digits, so no eval prompt can ever appear in a training set, whatever seeds.
EVAL_EVERY = 5

DATA_DIR_ENV = "LMFORGE_DATA_DIR"
CORPUS_FILE = "tiny-corpus.txt"
TRAIN_FILE = "tiny-task-train.jsonl"
EVAL_FILE = "tiny-task-eval.jsonl"

Split = Literal["train", "eval"]


def bundled_data_dir() -> Path:
    """Return the bundled data folder: ``$LMFORGE_DATA_DIR`` if set, else the checkout's.

    The default is ``examples/data`` of the repository checkout this module lives
    in (an editable install); an image that installs the package elsewhere copies
    the folder and points ``LMFORGE_DATA_DIR`` at it.
    """
    if env_dir := os.environ.get(DATA_DIR_ENV):
        data_dir = Path(env_dir)
    else:
        # trainer/lmforge/trainer/tiny.py -> the repository root is three levels up.
        data_dir = Path(__file__).resolve().parents[3] / "examples" / "data"
    if not (data_dir / CORPUS_FILE).is_file():
        raise FileNotFoundError(
            f"bundled corpus {data_dir / CORPUS_FILE} not found; run from a repository "
            f"checkout (pip install -e .), set {DATA_DIR_ENV} to a copy of examples/data, "
            "or pass texts= explicitly"
        )
    return data_dir


def bundled_texts() -> list[str]:
    """Return the bundled tokenizer corpus, one paragraph per item."""
    text = (bundled_data_dir() / CORPUS_FILE).read_text(encoding="utf-8")
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Byte-level BPE round-trips any text exactly (spaces and newlines included,
    which ChatML needs) and never produces ``<unk>``. The special tokens (``<s>``,
    ``</s>``, ``<pad>``, ``<unk>``, ``<|im_start|>``, ``<|im_end|>``) are single
    tokens with ids 0-5. No chat template is set: callers fall back to ChatML.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    out_dir: Path,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    initializer_range: float | None = None,
    seed: int = 0,
) -> Path:
    """Build a random-weight Llama model plus tokenizer and save them to ``out_dir``.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``. The same arguments give the same vocabulary
    and bit-identical weights. ``texts`` defaults to the bundled corpus plus the
    task's vocabulary; ``vocab_size`` is the tokenizer's target, the model's
    embedding matches the tokenizer's actual length. ``initializer_range``
    defaults to ``hidden_size ** -0.5``: with Llama's usual 0.02 a 64-wide frozen
    ``lm_head`` can only produce logits of about +-1, so LoRA (which leaves it
    frozen) could rank the right token first but never become confident.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(
        texts if texts is not None else [*bundled_texts(), *task_vocabulary_texts()],
        vocab_size=vocab_size,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range if initializer_range is not None else hidden_size**-0.5,
        dtype="float32",
    )
    # A private RNG state, so building a model neither depends on nor disturbs
    # the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Generation stops at the end of a ChatML turn as well as at EOS.
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids(IM_END),
        tokenizer.eos_token_id,
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = max_position_embeddings
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _split_of(digits: str) -> Split:
    return "eval" if zlib.crc32(digits.encode()) % EVAL_EVERY == 0 else "train"


def _digit_strings(rng: random.Random) -> Iterator[str]:
    while True:
        length = rng.randint(MIN_DIGITS, MAX_DIGITS)
        yield "".join(rng.choice("0123456789") for _ in range(length))


def task_records(n: int, seed: int, split: Split = "train") -> list[dict[str, Any]]:
    """Return ``n`` distinct "spell the digits" SFT records in OpenAI chat format.

    ``{"messages": [{"role": "user", "content": "spell: 4 0 7"},
    {"role": "assistant", "content": "four zero seven"}]}``, 3-5 digits each.
    Deterministic in ``(n, seed, split)``; the train and eval splits are disjoint
    for any seeds (a digit string's split is fixed by its hash).
    """
    rng = random.Random(f"{split}-{seed}")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for digits in _digit_strings(rng):
        if len(records) == n:
            break
        if digits in seen or _split_of(digits) != split:
            continue
        seen.add(digits)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"{TASK_PREFIX} {' '.join(digits)}"},
                    {"role": "assistant", "content": " ".join(DIGIT_WORDS[int(d)] for d in digits)},
                ]
            }
        )
    return records


def task_vocabulary_texts(n: int = 200) -> list[str]:
    """Return ChatML-rendered task conversations, so the tokenizer learns the task's words.

    Drawn from the train split only; with them every digit and digit word is a
    single token, both at the start of an answer and after a space.
    """
    return [
        "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in r["messages"])
        for r in task_records(n, seed=12345, split="train")
    ]


def write_task_data(
    out_dir: Path, *, n_train: int = 1000, n_eval: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Write the task's train and eval JSONL files (the bundled ones use the defaults)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / TRAIN_FILE, out_dir / EVAL_FILE
    splits: list[tuple[Path, int, Split]] = [
        (train_path, n_train, "train"),
        (eval_path, n_eval, "eval"),
    ]
    for path, n, split in splits:
        lines = [json.dumps(r) + "\n" for r in task_records(n, seed=seed, split=split)]
        path.write_text("".join(lines), encoding="utf-8")
    return train_path, eval_path


# ---------------------------------------------------------------- alignment data for the task

PREFERENCE_FILES = {"train": "tiny-preferences-train.jsonl", "eval": "tiny-preferences-eval.jsonl"}
KTO_FILE = "tiny-kto-train.jsonl"
PROMPT_FILES = {"train": "tiny-prompts-train.jsonl", "eval": "tiny-prompts-eval.jsonl"}


def spell(digits: str) -> str:
    """The right answer: "407" -> "four zero seven"."""
    return " ".join(DIGIT_WORDS[int(d)] for d in digits)


def misspell(digits: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit word replaced, one dropped, or two swapped."""
    words = spell(digits).split()
    kind = rng.choice(("replace", "drop", "swap") if len(set(digits)) > 1 else ("replace", "drop"))
    if kind == "replace":
        i = rng.randrange(len(words))
        words[i] = rng.choice([w for w in DIGIT_WORDS if w != words[i]])
    elif kind == "drop":
        del words[rng.randrange(len(words))]
    else:
        i, j = rng.sample([k for k in range(len(words))], 2)
        while words[i] == words[j]:
            i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def _task_digits(n: int, seed: int, split: Split) -> list[str]:
    digits = []
    for record in task_records(n, seed, split):
        prompt = record["messages"][0]["content"]
        digits.append(prompt.removeprefix(TASK_PREFIX).replace(" ", ""))
    return digits


def prompt_of(digits: str) -> str:
    return f"{TASK_PREFIX} {' '.join(digits)}"


def preference_records(n: int, seed: int, split: Split = "train") -> list[dict[str, Any]]:
    """``{"prompt": "spell: 4 0 7", "chosen": "four zero seven", "rejected": "four one
    seven"}``: the right spelling preferred over a near miss (same splits as the SFT task)."""
    rng = random.Random(f"pref-{split}-{seed}")
    return [
        {"prompt": prompt_of(d), "chosen": spell(d), "rejected": misspell(d, rng)}
        for d in _task_digits(n, seed, split)
    ]


def kto_records(n: int, seed: int, split: Split = "train") -> list[dict[str, Any]]:
    """``{"prompt", "completion", "label"}``: right spellings (true) and near misses (false),
    alternating."""
    rng = random.Random(f"kto-{split}-{seed}")
    return [
        {
            "prompt": prompt_of(d),
            "completion": spell(d) if i % 2 == 0 else misspell(d, rng),
            "label": i % 2 == 0,
        }
        for i, d in enumerate(_task_digits(n, seed, split))
    ]


def prompt_records(n: int, seed: int, split: Split = "train") -> list[dict[str, Any]]:
    """``{"prompt": "spell: 4 0 7", "answer": "four zero seven"}``: prompts for the online
    methods, with the reference answer as a column for verifiable rewards."""
    return [{"prompt": prompt_of(d), "answer": spell(d)} for d in _task_digits(n, seed, split)]


def write_alignment_data(
    out_dir: Path, *, n_train: int = 1000, n_eval: int = 200, seed: int = 0
) -> list[Path]:
    """Write the task's preference, KTO and prompt files (the bundled ones use the defaults)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, list[dict[str, Any]]]] = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        files.append((PREFERENCE_FILES[split], preference_records(n, seed, split)))  # type: ignore[arg-type]
        files.append((PROMPT_FILES[split], prompt_records(n, seed, split)))  # type: ignore[arg-type]
    files.append((KTO_FILE, kto_records(n_train, seed, "train")))
    written = []
    for name, records in files:
        path = out_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written.append(path)
    return written
