"""The trainer's data pipeline: read and validate sources, mix them, render chats, tokenize, batch.

template = resolve_chat_template(spec.model.chat_template, tokenizer)
data = prepare_data(spec.dataset, tokenizer, chat_template=template, ...)  # Arrow, on disk
log.info(data.summary); [log.warning(w) for w in data.warnings]
trainer = Trainer(..., train_dataset=data.train, data_collator=DataCollator(tokenizer))

`load_examples` / `tokenize_examples` are the same steps on in-memory lists (evaluation, tests).
"""

from lmforge.trainer.data.collate import DataCollator
from lmforge.trainer.data.examples import DataError, DataProblem, Example
from lmforge.trainer.data.loading import iter_source, load_examples, load_source
from lmforge.trainer.data.prepare import PreparedData, prepare_data, prepare_once_per_node
from lmforge.trainer.data.templates import NAMED_TEMPLATES, resolve_chat_template
from lmforge.trainer.data.tokenization import (
    TokenizedData,
    encode_prompt,
    tokenize_examples,
)

__all__ = [
    "NAMED_TEMPLATES",
    "DataCollator",
    "DataError",
    "DataProblem",
    "Example",
    "PreparedData",
    "TokenizedData",
    "encode_prompt",
    "iter_source",
    "load_examples",
    "load_source",
    "prepare_data",
    "prepare_once_per_node",
    "resolve_chat_template",
    "tokenize_examples",
]
