"""Record formats: detect which one a file uses and parse each record into an `Example`.

Every parser checks its record completely and reports each problem it finds to a `RecordCheck`
instead of raising, so that one run over the data lists everything that is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from lmforge.trainer.data.examples import DataProblem, Example

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT/BELLE speaker names, as LLaMA-Factory reads them: a function call is something the
# assistant says, an observation is a tool result.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
# Where preference records keep their prompt.
PROMPT_KEYS = ("prompt", "conversations", "messages")
# LMFlow's {"type": ..., "instances": [...]} types that are text datasets.
LMFLOW_TYPES = ("text_only", "text2text", "conversation", "paired_conversation")


class RecordCheck:
    """Collects the problems of one record (file + location) while it is parsed."""

    def __init__(self, file: str, location: str, problems: list[DataProblem]) -> None:
        self.file = file
        self.location = location
        self.problems = problems
        self.ok = True

    def problem(self, field: str, message: str) -> None:
        """Record a problem with `field` ("" for the record as a whole)."""
        self.ok = False
        self.problems.append(DataProblem(self.file, self.location, field, message))


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _string(
    check: RecordCheck,
    record: dict[str, Any],
    key: str,
    *,
    required: bool = True,
    non_empty: bool = True,
    field: str | None = None,
) -> str | None:
    """record[key] as a string; reports a missing, mistyped or empty value."""
    field = field or key
    if key not in record or record[key] is None:
        if required:
            check.problem(field, "missing")
        return None
    value = record[key]
    if not isinstance(value, str):
        check.problem(field, f"must be a string, got {_type_name(value)}")
        return None
    if non_empty and not value.strip():
        check.problem(field, "must not be empty")
        return None
    return value


def _content(
    check: RecordCheck, item: dict[str, Any], key: str, non_empty: bool, field: str
) -> str | None:
    """A message's content: a string, or OpenAI content parts [{"type": "text", "text"}].

    Text parts are joined with newlines; other part types (images, audio, files) cannot be
    trained on by a text model and are reported with their type.
    """
    parts = item.get(key)
    if not isinstance(parts, list):
        return _string(check, item, key, non_empty=non_empty, field=field)
    texts: list[str] = []
    for i, part in enumerate(parts):
        where = f"{field}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or "type" not in part:
            check.problem(where, 'must be a content part {"type": "text", "text": ...}')
        elif kind != "text":
            check.problem(f"{where}.type", f"{kind!r} parts are not supported; only text parts are")
        else:
            text = _string(check, part, "text", non_empty=False, field=f"{where}.text")
            if text is not None:
                texts.append(text)
    if len(texts) != len(parts):
        return None
    content = "\n".join(texts)
    if non_empty and not content.strip():
        check.problem(field, "must not be empty")
        return None
    return content


def _messages(
    check: RecordCheck,
    value: Any,
    field: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    role_names: dict[str, str] | None = None,
) -> list[dict[str, str]] | None:
    """A list of {role, content} messages; `role_names` maps dataset speaker names to roles."""
    if not isinstance(value, list):
        check.problem(field, f"must be a list of messages, got {_type_name(value)}")
        return None
    if not value:
        check.problem(field, "must not be empty")
        return None
    names = role_names or {role: role for role in ROLES}
    messages: list[dict[str, str]] = []
    ok = True
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            check.problem(where, f"must be an object with {role_key!r} and {content_key!r}")
            ok = False
            continue
        name = item.get(role_key)
        role = names.get(name) if isinstance(name, str) else None
        if name is None:
            check.problem(f"{where}.{role_key}", "missing")
        elif role is None:
            check.problem(f"{where}.{role_key}", f"{name!r} is not one of {', '.join(names)}")
        elif role == "system" and i > 0:
            check.problem(f"{where}.{role_key}", "a system message may only come first")
            role = None
        content = _content(check, item, content_key, role != "tool", f"{where}.{content_key}")
        if role is None or content is None:
            ok = False
            continue
        messages.append({"role": role, "content": content})
    return messages if ok else None


def _tools(check: RecordCheck, value: Any, field: str) -> tuple[dict[str, Any], ...]:
    """Tool (function) definitions: a list of objects, JSON strings or descriptions; or JSON."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            check.problem(field, f"is a string but not JSON: {err.msg}")
            return ()
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        check.problem(field, f"must be a list of tool definitions, got {_type_name(value)}")
        return ()
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        if isinstance(tool, str):
            text = tool
            with contextlib.suppress(json.JSONDecodeError):
                tool = json.loads(text)
            if not isinstance(tool, dict):  # LMFlow's tools may be plain descriptions
                tool = {"description": text}
        if not isinstance(tool, dict):
            check.problem(f"{field}[{i}]", "must be an object, a JSON string or a description")
            continue
        tools.append(tool)
    return tuple(tools)


def _with_system(
    check: RecordCheck, record: dict[str, Any], messages: list[dict[str, str]]
) -> list[dict[str, str]]:
    """Prepend the record's top-level "system" prompt, when it has a non-empty one."""
    system = _string(check, record, "system", required=False, non_empty=False)
    if system and system.strip():
        if messages and messages[0]["role"] == "system":
            check.problem("system", "given both as a field and as the first message")
        return [{"role": "system", "content": system}, *messages]
    return messages


def _ends_with_assistant(check: RecordCheck, messages: list[dict[str, str]], field: str) -> bool:
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        check.problem(field, f"must end with an assistant turn to train on, ends with {last}")
        return False
    return True


def _any_messages(check: RecordCheck, value: Any, field: str) -> list[dict[str, str]] | None:
    """Messages written either OpenAI-style ({"role", "content"}) or ShareGPT-style."""
    if isinstance(value, dict):  # a single message, as in LLaMA-Factory's preference data
        value = [value]
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, dict) and "from" in first and "role" not in first:
        return _messages(
            check, value, field, role_key="from", content_key="value", role_names=SHAREGPT_ROLES
        )
    return _messages(check, value, field)


def _prompt_messages(check: RecordCheck, value: Any, field: str) -> list[dict[str, str]] | None:
    """A prompt given as a plain string (one user turn) or as a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            check.problem(field, "must not be empty")
            return None
        return [{"role": "user", "content": value}]
    if value is None:
        check.problem(field, "missing")
        return None
    if not isinstance(value, list):
        check.problem(field, f"must be a string or a list of messages, got {_type_name(value)}")
        return None
    messages = _any_messages(check, value, field)
    if messages is not None and messages[-1]["role"] == "assistant":
        check.problem(field, "a prompt must not end with an assistant turn")
        return None
    return messages


def _completion(check: RecordCheck, value: Any, field: str) -> list[dict[str, str]] | None:
    """An answer: a plain string (one assistant turn), one message, or assistant messages."""
    if isinstance(value, str):
        if not value.strip():
            check.problem(field, "must not be empty")
            return None
        return [{"role": "assistant", "content": value}]
    if value is None:
        check.problem(field, "missing")
        return None
    if not isinstance(value, list | dict):
        check.problem(field, f"must be a string or a list of messages, got {_type_name(value)}")
        return None
    messages = _any_messages(check, value, field)
    if messages is not None and messages[0]["role"] != "assistant":
        check.problem(field, "an answer must start with an assistant turn")
        return None
    if messages is not None and not _ends_with_assistant(check, messages, field):
        return None
    return messages


def _split_shared_prompt(
    check: RecordCheck, chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]] | None:
    """Split two full conversations into their shared prompt and the diverging answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The answers start at the first assistant turn of the diverging part.
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    prompt, good, bad = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt:
        check.problem("chosen", "chosen and rejected share no prompt (no common first turns)")
        return None
    for name, answer in (("chosen", good), ("rejected", bad)):
        if not answer:
            check.problem(name, "has no answer after the shared prompt")
            return None
        if answer[0]["role"] != "assistant":
            check.problem(name, "must continue the shared prompt with an assistant turn")
            return None
        if not _ends_with_assistant(check, answer, name):
            return None
    return prompt, good, bad


# ---------------------------------------------------------------- parsers, one per format


def parse_text(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """text / LMFlow text_only: {"text": "..."}."""
    text = _string(check, record, "text")
    return Example(text=text) if text is not None else None


def parse_text2text(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """LMFlow text2text: {"input": "...", "output": "..."} -> user / assistant."""
    prompt = _string(check, record, "input", non_empty=False)
    answer = _string(check, record, "output")
    if prompt is None or answer is None:
        return None
    return Example(
        messages=({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
    )


def parse_conversation(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """LMFlow conversation: {"system"?, "tools"?, "messages": [{"role", "content"}, ...]}."""
    if "messages" not in record:
        check.problem("messages", "missing")
        return None
    tools = _tools(check, record.get("tools"), "tools")
    messages = _messages(check, record["messages"], "messages")
    if messages is None:
        return None
    messages = _with_system(check, record, messages)
    if not _ends_with_assistant(check, messages, "messages") or not check.ok:
        return None
    return Example(messages=tuple(messages), tools=tools)


def _conversation_side(
    check: RecordCheck, record: dict[str, Any], key: str
) -> tuple[list[dict[str, str]] | None, dict[str, Any] | None]:
    """One side of an LMFlow paired conversation: {"messages": [...]} or a message list."""
    value = record.get(key)
    if value is None:
        check.problem(key, "missing")
        return None, None
    if isinstance(value, dict):
        if "messages" not in value:
            check.problem(f"{key}.messages", "missing")
            return None, None
        messages = _messages(check, value["messages"], f"{key}.messages")
        if messages is not None:
            messages = _with_system(check, value, messages)
        return messages, value
    return _messages(check, value, key), {}


def parse_paired_conversation(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """LMFlow paired_conversation: {"chosen": {conversation}, "rejected": {conversation}}.

    Both conversations repeat the prompt; the shared first turns become `messages` and the
    assistant turns where they diverge become `chosen` / `rejected`.
    """
    chosen, chosen_record = _conversation_side(check, record, "chosen")
    rejected, _ = _conversation_side(check, record, "rejected")
    if chosen is None or rejected is None:
        return None
    split = _split_shared_prompt(check, chosen, rejected)
    if split is None:
        return None
    tools = _tools(check, (chosen_record or {}).get("tools"), "chosen.tools")
    prompt, good, bad = split
    return Example(messages=tuple(prompt), tools=tools, chosen=tuple(good), rejected=tuple(bad))


def parse_alpaca(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """Alpaca: {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant]]}."""
    instruction = _string(check, record, "instruction")
    extra = _string(check, record, "input", required=False, non_empty=False)
    answer = _string(check, record, "output")
    messages: list[dict[str, str]] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        check.problem(
            "history", f"must be a list of [user, assistant] pairs, got {_type_name(history)}"
        )
        history = []
    for i, pair in enumerate(history):
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(turn, str) for turn in pair)
        ):
            check.problem(f"history[{i}]", "must be a [user, assistant] pair of strings")
            continue
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    if instruction is None or answer is None or not check.ok:
        return None
    # LLaMA-Factory joins instruction and input with a newline.
    prompt = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(messages=tuple(_with_system(check, record, messages)))


def parse_sharegpt(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """ShareGPT / BELLE: {"conversations": [{"from", "value"}], "system"?, "tools"?}."""
    if "conversations" not in record:
        check.problem("conversations", "missing")
        return None
    tools = _tools(check, record.get("tools"), "tools")
    messages = _messages(
        check,
        record["conversations"],
        "conversations",
        role_key="from",
        content_key="value",
        role_names=SHAREGPT_ROLES,
    )
    if messages is None:
        return None
    messages = _with_system(check, record, messages)
    if not _ends_with_assistant(check, messages, "conversations") or not check.ok:
        return None
    return Example(messages=tuple(messages), tools=tools)


def parse_openai(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """OpenAI chat fine-tuning: {"messages": [{"role", "content"}], "tools"?}."""
    return parse_conversation(record, check)


def parse_preference(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """Preference: {"prompt", "chosen", "rejected"}; each a string or a list of messages.

    The prompt may also be ShareGPT "conversations" or "messages", and each answer a single
    message (LLaMA-Factory's layout). Without any prompt, chosen and rejected are full
    conversations sharing their first turns (TRL's implicit prompt).
    """
    if not any(key in record for key in PROMPT_KEYS):
        missing = [key for key in ("chosen", "rejected") if key not in record]
        for key in missing:
            check.problem(key, "missing")
        if missing:
            return None
        if not isinstance(record["chosen"], list) or not isinstance(record["rejected"], list):
            check.problem(
                "prompt",
                "missing (needed unless chosen and rejected are full "
                "conversations that share their first turns)",
            )
            return None
        chosen = _messages(check, record["chosen"], "chosen")
        rejected = _messages(check, record["rejected"], "rejected")
        if chosen is None or rejected is None:
            return None
        split = _split_shared_prompt(check, chosen, rejected)
        if split is None:
            return None
        prompt, good, bad = split
    else:
        key = next(k for k in PROMPT_KEYS if k in record)
        given = _prompt_messages(check, record[key], key)
        answers = [_completion(check, record.get(k), k) for k in ("chosen", "rejected")]
        if given is None or answers[0] is None or answers[1] is None:
            return None
        prompt, good, bad = given, answers[0], answers[1]
    prompt = _with_system(check, record, prompt)
    return Example(
        messages=tuple(prompt),
        tools=_tools(check, record.get("tools"), "tools"),
        chosen=tuple(good),
        rejected=tuple(bad),
    )


def parse_kto(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """KTO: {"prompt", "completion", "label": true|false} (unpaired desirable/undesirable)."""
    prompt = _prompt_messages(check, record.get("prompt"), "prompt")
    completion = _completion(check, record.get("completion"), "completion")
    label = record.get("label")
    if "label" not in record:
        check.problem("label", "missing")
    elif not isinstance(label, bool):
        check.problem("label", f"must be true or false, got {_type_name(label)}")
    if prompt is None or completion is None or not check.ok:
        return None
    prompt = _with_system(check, record, prompt)
    return Example(messages=tuple(prompt), chosen=tuple(completion), label=label)


# Keys a prompt record is made of; any other key is a column (a reference answer, ...).
PROMPT_RECORD_KEYS = ("prompt", "messages", "system", "tools")


def parse_prompt(record: dict[str, Any], check: RecordCheck) -> Example | None:
    """Prompts only (answers are generated): {"prompt": "..."} or {"messages": [...]}."""
    if "prompt" in record:
        messages = _prompt_messages(check, record["prompt"], "prompt")
    elif "messages" in record:
        messages = _prompt_messages(check, record["messages"], "messages")
    else:
        check.problem("prompt", "missing (give prompt or messages)")
        return None
    if messages is None:
        return None
    messages = _with_system(check, record, messages)
    # the record's other scalar fields (reference answers for verifiable rewards)
    columns = {
        k: v
        for k, v in record.items()
        if k not in PROMPT_RECORD_KEYS and (v is None or isinstance(v, str | int | float | bool))
    }
    return Example(
        messages=tuple(messages), tools=_tools(check, record.get("tools"), "tools"), columns=columns
    )


PARSERS: dict[str, Callable[[dict[str, Any], RecordCheck], Example | None]] = {
    "text": parse_text,
    "text_only": parse_text,
    "text2text": parse_text2text,
    "conversation": parse_conversation,
    "paired_conversation": parse_paired_conversation,
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "openai": parse_openai,
    "preference": parse_preference,
    "kto": parse_kto,
    "prompt": parse_prompt,
}
KNOWN_FORMATS = tuple(PARSERS)


def parse_record(record: Any, data_format: str, check: RecordCheck) -> Example | None:
    """Parse one record of `data_format`; None (with problems reported) when it is invalid."""
    if not isinstance(record, dict):
        check.problem("", f"must be a JSON object, got {_type_name(record)}")
        return None
    return PARSERS[data_format](record, check)


def detect_format(record: Any) -> str | None:
    """The format a record's keys suggest, or None when they match no known format."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if not keys & set(PROMPT_KEYS) and isinstance(chosen, dict) and "messages" in chosen:
            return "paired_conversation"
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        messages = record["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, dict) and last.get("role") not in (None, "assistant"):
            return "prompt"
        # LMFlow's conversation keeps the system prompt and an id beside the messages.
        if keys & {"system", "conversation_id"}:
            return "conversation"
        return "openai"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"input", "output"} <= keys:
        return "text2text"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys:
        return "text"
    return None


def formats_agree(explicit: str, lmflow_type: str) -> bool:
    """Whether an explicit `format` and an LMFlow file's `type` describe the same records."""
    same = {"text": "text_only"}
    return explicit == lmflow_type or same.get(explicit) == lmflow_type
