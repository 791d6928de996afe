"""Prompt templates: turn a row's ``prompt`` into the text the policy continues.

- ``"r1"`` (alias ``"r1zero"``): the DeepSeek-R1-Zero template (DeepSeek-R1 paper, Table 1), for base models.
- ``"compact"``: ``"{prompt}=?\\n"``, for tiny character-level models where every prompt character
  costs attention compute and context (the embedded default model has ~128 characters in all).
- ``"plain"``: the prompt unchanged.
- ``"chat"``: the tokenizer's own chat template, with the R1 instruction as the system message.

No template ends in ``<think>``: the completion writes every tag itself, so the format reward sees the
whole structure and the policy is rewarded for producing it.
"""

from __future__ import annotations

from typing import Any

R1_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>."
)
R1_TEMPLATE = R1_INSTRUCTION + " User: {prompt}. Assistant:"
COMPACT_TEMPLATE = "{prompt}=?\n"
PLAIN_TEMPLATE = "{prompt}"

# "r1zero" is an alias of "r1" (the name the trainer's config uses).
TEMPLATES = {
    "r1": R1_TEMPLATE,
    "r1zero": R1_TEMPLATE,
    "compact": COMPACT_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
    "chat": None,
}

_DEFAULT = object()


def chat_messages(
    prompt: str | list[dict[str, str]], system_prompt: str | None = R1_INSTRUCTION
) -> list[dict[str, str]]:
    """Messages for a chat model: a message-list prompt is used as is; a string prompt becomes an optional
    system message plus one user message."""
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise ValueError(
                    f"prompt message {i} must be a dict with string 'role' and 'content', got {message!r}"
                )
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def format_prompt(
    row: dict[str, Any], template: str, tokenizer: Any = None, system_prompt: Any = _DEFAULT
) -> str:
    """The text the model continues for ``row`` under ``template`` (a name in ``TEMPLATES``).

    ``template="chat"`` needs ``tokenizer`` (a transformers tokenizer with a ``chat_template``) and
    returns ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``;
    ``system_prompt`` defaults to the R1 instruction (pass None for no system message).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(TEMPLATES)}")
    prompt = row.get("prompt")
    if template == "chat":
        if tokenizer is None:
            raise ValueError(
                "template='chat' needs a tokenizer (with a chat_template) to format the messages"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template='chat' but tokenizer {type(tokenizer).__name__} has no chat_template; use "
                "template='r1' for base models, or set tokenizer.chat_template to a Jinja string"
            )
        messages = chat_messages(prompt, R1_INSTRUCTION if system_prompt is _DEFAULT else system_prompt)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, list):
        raise ValueError(
            f"the row's prompt is a list of chat messages, which template {template!r} cannot format; "
            "use template='chat' with a tokenizer that has a chat_template"
        )
    if not isinstance(prompt, str):
        raise ValueError(f"the row's 'prompt' must be a string or a list of chat messages, got {prompt!r}")
    return TEMPLATES[template].format(prompt=prompt)
