"""Render the Phi-2 chat template that vLLM gets with --chat-template.

The environment matches the one vLLM and transformers render chat templates in:
a sandboxed jinja2 environment with trim_blocks, lstrip_blocks, the loop
controls extension and a raise_exception function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "vllm-deploy" / "phi2-chat-template.jinja"


class TemplateError(Exception):
    """Raised by the template's raise_exception call."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def render(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    environment.globals["raise_exception"] = _raise_exception
    template = environment.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )


def test_multi_turn_with_system_message() -> None:
    messages = [
        {"role": "system", "content": "You are a careful medical assistant."},
        {"role": "user", "content": "I have a headache and a fever."},
        {"role": "assistant", "content": "How long have you had them?"},
        {"role": "user", "content": "Since yesterday evening."},
    ]

    prompt = render(messages)

    assert prompt == (
        "You are a careful medical assistant.\n"
        "\n"
        "Instruct: I have a headache and a fever.\n"
        "Output: How long have you had them?\n"
        "Instruct: Since yesterday evening.\n"
        "Output:"
    )


def test_without_system_message_starts_with_instruct() -> None:
    prompt = render([{"role": "user", "content": "Solve 3x + 7 = 22."}])

    assert prompt == "Instruct: Solve 3x + 7 = 22.\nOutput:"


def test_no_generation_prompt_ends_after_turn() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]

    prompt = render(messages, add_generation_prompt=False)

    assert prompt == "Instruct: Hi\nOutput: Hello!\n"


def test_whitespace_around_content_is_trimmed() -> None:
    messages = [
        {"role": "system", "content": "  Be brief.\n\n"},
        {"role": "user", "content": "\n  What is 2 + 2?  \n"},
    ]

    prompt = render(messages)

    assert prompt == "Be brief.\n\nInstruct: What is 2 + 2?\nOutput:"


def test_empty_system_message_adds_nothing() -> None:
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi"},
    ]

    assert render(messages) == "Instruct: Hi\nOutput:"


def test_assistant_without_content_renders_empty() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Still there?"},
    ]

    prompt = render(messages)

    assert prompt == "Instruct: Hi\nOutput: \nInstruct: Still there?\nOutput:"


def test_unsupported_role_is_rejected() -> None:
    messages = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "tool", "content": '{"temperature": 21}'},
    ]

    with pytest.raises(TemplateError, match="Role tool is not supported"):
        render(messages)


def test_content_parts_are_rejected() -> None:
    # vLLM joins text parts into one string before rendering a template that
    # reads content as a string, so only other clients get here.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]

    with pytest.raises(TemplateError, match="content must be text"):
        render(messages)


def test_template_compiles_in_plain_jinja2() -> None:
    # A syntax error would otherwise surface only when vLLM starts.
    jinja2.Environment().parse(TEMPLATE.read_text(encoding="utf-8"))


def test_template_path_is_the_kustomize_file() -> None:
    # vllm-deploy/phi2-chat-template.jinja is a link into the kustomize base,
    # because kustomize reads generator files only from inside its own folder.
    base_copy = REPO / "vllm-deploy" / "base" / "phi2-chat-template.jinja"

    assert TEMPLATE.samefile(base_copy)
