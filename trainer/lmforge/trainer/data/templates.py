"""Chat templates (Jinja, in the Hugging Face `chat_template` dialect) and how one is chosen.

The templates see `messages`, `tools`, `add_generation_prompt`, `bos_token` and `eos_token`, like
the templates shipped with tokenizers. Every tag trims whitespace (`{%-`, `{{-`) so the layout of
the source below never leaks into the rendered text.
"""

from __future__ import annotations

from typing import Any

# Pulls a leading system message out of `messages` for templates that place it themselves.
_TAKE_SYSTEM = r"""
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
{%- endif %}
"""

CHATML = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call these functions:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (tools and loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen2: ChatML with a default system prompt, tools in the system turn and tool results sent
# back as <tool_response> blocks in a user turn.
QWEN2 = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags.' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
    {%- if message['role'] == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif not (loop.first and message['role'] == 'system') %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3 / 3.1: header tokens, <|eot_id|> ends every turn, tool results use the ipython role.
LLAMA3 = (
    r"""
{{- bos_token }}
"""
    + _TAKE_SYSTEM
    + r"""
{%- if system or tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' + system | trim }}
    {%- if tools %}
        {{- ('\n\n' if system else '') + 'You have access to the following functions. To call a '
            'function, respond with JSON for a function call with its proper arguments.' }}
        {%- for tool in tools %}
            {{- '\n\n' + tool | tojson(indent=4) }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
)

# Stanford Alpaca's prompt, one "### Instruction:" / "### Response:" pair per turn.
ALPACA = (
    r"""
{{- bos_token }}
"""
    + _TAKE_SYSTEM
    + r"""
{%- if system %}
    {{- system + '\n\n' }}
{%- else %}
    {{- 'Below is an instruction that describes a task. '
        'Write a response that appropriately completes the request.\n\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '### Response:\n' + message['content'] + eos_token + '\n\n' }}
    {%- else %}
        {{- '### Instruction:\n' + message['content'] + '\n\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '### Response:\n' }}
{%- endif %}
"""
)

# Vicuna v1.1: "SYSTEM USER: ... ASSISTANT: ...</s>USER: ..."
VICUNA = (
    r"""
{{- bos_token }}
"""
    + _TAKE_SYSTEM
    + r"""
{%- if system %}
    {{- system + ' ' }}
{%- else %}
    {{- 'A chat between a curious user and an artificial intelligence assistant. The assistant '
        "gives helpful, detailed, and polite answers to the user's questions. " }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- 'ASSISTANT: ' + message['content'] + eos_token }}
    {%- else %}
        {{- 'USER: ' + message['content'] + ' ' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}
"""
)

# Zephyr: <|role|> headers, every turn ends with the EOS token.
ZEPHYR = r"""
{%- for message in messages %}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
"""

# Mistral instruct: [INST] ... [/INST] answer</s>; no system role, so it joins the first turn.
MISTRAL = (
    r"""
{{- bos_token }}
"""
    + _TAKE_SYSTEM
    + r"""
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {%- set prefix = system + '\n\n' if system and loop.first else '' %}
        {{- '[INST] ' + prefix + message['content'] + ' [/INST]' }}
    {%- endif %}
{%- endfor %}
"""
)

# Gemma: <start_of_turn>user|model ... <end_of_turn>; no system role, so it joins the first turn.
GEMMA = (
    r"""
{{- bos_token }}
"""
    + _TAKE_SYSTEM
    + r"""
{%- for message in messages %}
    {%- set role = 'model' if message['role'] == 'assistant' else 'user' %}
    {%- set prefix = system + '\n\n' if system and loop.first else '' %}
    {{- '<start_of_turn>' + role + '\n' + prefix + message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML.strip(),
    "llama3": LLAMA3.strip(),
    "qwen2": QWEN2.strip(),
    "alpaca": ALPACA.strip(),
    "vicuna": VICUNA.strip(),
    "zephyr": ZEPHYR.strip(),
    "mistral": MISTRAL.strip(),
    "gemma": GEMMA.strip(),
}

# chat_template "none": plain "role: content" lines; used by the tokenizer step, not exported.
PLAIN_TEMPLATE = r"""
{%- for message in messages %}
    {{- message['role'] + ': ' + message['content'] + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'assistant:' }}
{%- endif %}
""".strip()


def resolve_chat_template(name: str, tokenizer: Any) -> str | None:
    """The Jinja template for a `chatTemplate` setting.

    "auto" is the tokenizer's own template (chatml when it has none), "none" is None (plain
    "role: content" concatenation) and any other name is one of NAMED_TEMPLATES.
    """
    if name == "none":
        return None
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is for chat
            own = own.get("default")
        return own if isinstance(own, str) and own.strip() else NAMED_TEMPLATES["chatml"]
    if name not in NAMED_TEMPLATES:
        known = ", ".join(["auto", "none", *NAMED_TEMPLATES])
        raise ValueError(f"unknown chat template {name!r}; use one of {known}")
    return NAMED_TEMPLATES[name]
