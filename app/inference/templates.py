"""The chat template for base tokenizers that have none (docs/model-kinds.md).

Plain-text role headers, and the tokenizer's own ``eos_token`` after each assistant turn: no new
tokens, so no embedding resize, and generation stops where training taught it to. The template
is set when a causal-LM job starts and saved with the fine-tuned model's tokenizer, so
inference renders prompts exactly as training did. No torch here.
"""

from __future__ import annotations

from typing import Any

# Newlines are written as '\n' string literals inside the tags, not as template text:
# transformers renders with trim_blocks, which would swallow a newline after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give ``tokenizer`` the default chat template when it has none; True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True
