"""Prove that the vllm_server fixture serves the tiny base model and two working
LoRA adapters, so that other tests can tell from a text which model produced it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import openai
import pytest
import requests

from servers import VLLMServer

MODELS = ["tiny-base", "doctor", "dcot"]
PROMPT = [{"role": "user", "content": "Which adapter should answer this?"}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def client(vllm_server: VLLMServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=vllm_server.api_base, api_key="unused", max_retries=0, timeout=60
    )


def complete_greedy(client: openai.OpenAI, model: str) -> str:
    response = client.chat.completions.create(
        model=model, messages=PROMPT, temperature=0, max_tokens=MAX_TOKENS
    )
    content = response.choices[0].message.content
    assert content is not None
    return content


def test_models_list_base_and_adapters(vllm_server: VLLMServer) -> None:
    response = requests.get(vllm_server.api_base + "/models", timeout=10)
    assert response.status_code == 200
    models = {entry["id"]: entry for entry in response.json()["data"]}

    assert sorted(models) == sorted(MODELS)
    assert models["tiny-base"]["parent"] is None
    assert models["doctor"]["parent"] == "tiny-base"
    assert models["dcot"]["parent"] == "tiny-base"


def test_greedy_texts_differ_between_models(client: openai.OpenAI) -> None:
    texts = {model: complete_greedy(client, model) for model in MODELS}

    for model, text in texts.items():
        assert text.strip(), f"{model} returned empty text"
    assert texts["doctor"] != texts["tiny-base"]
    assert texts["dcot"] != texts["tiny-base"]
    assert texts["doctor"] != texts["dcot"]


@pytest.mark.parametrize("model", MODELS)
def test_greedy_text_repeats_for_same_model(client: openai.OpenAI, model: str) -> None:
    first = complete_greedy(client, model)
    second = complete_greedy(client, model)

    assert first == second


@pytest.mark.parametrize("model", MODELS)
def test_stream_chunks_name_the_model(client: openai.OpenAI, model: str) -> None:
    expected = complete_greedy(client, model)

    stream = client.chat.completions.create(
        model=model,
        messages=PROMPT,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = list(stream)

    assert chunks
    assert {chunk.model for chunk in chunks} == {model}
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected
    finish_reasons = [
        choice.finish_reason
        for chunk in chunks
        for choice in chunk.choices
        if choice.finish_reason is not None
    ]
    # The tiny model never emits its end token, so every reply runs to the limit.
    assert finish_reasons == ["length"]


REFERENCE_SCRIPT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, messages, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(f"{model_dir}/base")
input_ids = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)["input_ids"]
texts = {}
for name in ("tiny-base", "doctor", "dcot"):
    model = AutoModelForCausalLM.from_pretrained(f"{model_dir}/base", dtype=torch.float32)
    if name != "tiny-base":
        model = PeftModel.from_pretrained(model, f"{model_dir}/{name}")
    output = model.generate(input_ids, max_new_tokens=max_tokens, do_sample=False)
    texts[name] = tokenizer.decode(
        output[0][input_ids.shape[1]:], skip_special_tokens=True
    )
print(json.dumps(texts))
"""


@pytest.mark.slow
def test_greedy_texts_match_peft_reference(
    client: openai.OpenAI, tiny_model_dir: Path, vllm_python: str
) -> None:
    """vLLM in float32 applies each adapter exactly as Hugging Face PEFT does,
    so a test can name the adapter that produced a text."""
    result = subprocess.run(
        [
            vllm_python,
            "-c",
            REFERENCE_SCRIPT,
            str(tiny_model_dir),
            json.dumps(PROMPT),
            str(MAX_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads(result.stdout.strip().splitlines()[-1])

    for model in MODELS:
        assert complete_greedy(client, model) == reference[model], model
