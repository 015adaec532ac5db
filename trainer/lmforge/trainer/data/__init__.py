"""The trainer's data pipeline: read and validate sources, mix them, render chats, tokenize, batch.

train, eval = load_examples(spec.dataset, base_dir, seed)
template = resolve_chat_template(spec.model.chat_template, tokenizer)
data = tokenize_examples(train, tokenizer, chat_template=template, ...)
trainer = Trainer(..., train_dataset=data.records, data_collator=DataCollator(tokenizer))
"""

from lmforge.trainer.data.collate import DataCollator
from lmforge.trainer.data.examples import DataError, DataProblem, Example
from lmforge.trainer.data.loading import load_examples, load_source
from lmforge.trainer.data.templates import NAMED_TEMPLATES, resolve_chat_template
from lmforge.trainer.data.tokenization import TokenizedData, encode_prompt, tokenize_examples

__all__ = [
    "NAMED_TEMPLATES",
    "DataCollator",
    "DataError",
    "DataProblem",
    "Example",
    "TokenizedData",
    "encode_prompt",
    "load_examples",
    "load_source",
    "resolve_chat_template",
    "tokenize_examples",
]
