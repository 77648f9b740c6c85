"""Measure how fast vLLM's CPU build serves a model of Phi-2's size, with adapters.

The real weights cannot be downloaded everywhere. So `make` writes a model with
random weights in microsoft/phi-2's shapes (2.7 billion parameters, bfloat16)
and two rank-64 LoRA adapters on every attention and MLP layer. The folders
are laid out like the `models` volume of docker-compose.yaml. Speed depends on
shapes, not on weight values, so the numbers hold for the real model, although
the generated text is noise.

    python tools/phi2_cpu_speed.py make /tmp/phi2-shape
    # start vLLM with the arguments of the compose service vllm-cpu, models
    # under /tmp/phi2-shape instead of /models, for example on port 18000
    python tools/phi2_cpu_speed.py measure http://127.0.0.1:18000

`make` needs torch, transformers 5, peft and tokenizers; `measure` only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
import urllib.request
from pathlib import Path

BASE_REPO = "microsoft/phi-2"
ADAPTER_REPOS = {
    "doctor": "petualang/Phi2-Doctor28e",
    "dcot": "haritzpuerto/phi-2-dcot",
}
ADAPTER_RANK = 64
PROMPT = "I have had a headache and a fever since yesterday, what should I do?"


def make_model(out: Path) -> None:
    """Write the random Phi-2-shaped model and its two adapters under out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

    base_dir = out / BASE_REPO
    base_dir.mkdir(parents=True, exist_ok=True)

    # Phi-2's own tokenizer cannot be downloaded either, so a small byte-level
    # BPE trained on the standard library replaces it. Only prompt length matters.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    ).save_pretrained(base_dir)

    # The dimensions of microsoft/phi-2's config.json.
    config = PhiConfig(
        vocab_size=51200,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        partial_rotary_factor=0.4,
        max_position_embeddings=2048,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="5GB")

    targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    for seed, repo in enumerate(ADAPTER_REPOS.values(), start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=ADAPTER_RANK, lora_alpha=16, target_modules=targets)
        adapted = get_peft_model(model, lora)
        # PEFT starts lora_B at zero; random values make the adapter do work.
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.01)
        adapted.save_pretrained(out / repo)
        model = adapted.unload()


def time_request(url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """Return the seconds one chat completion takes and its completion tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        usage = json.load(response)["usage"]
    return time.perf_counter() - start, usage["completion_tokens"]


def measure(url: str, base_model: str, rounds: int) -> None:
    """Print first-token time and decode speed per model, one request at a time.

    Decode speed is (tokens(64) - tokens(1)) / (time(64) - time(1)), which
    leaves out the prompt's prefill.
    """
    for model in [base_model, *ADAPTER_REPOS]:
        for _ in range(rounds):
            first_seconds, first_tokens = time_request(url, model, 1)
            all_seconds, all_tokens = time_request(url, model, 64)
            speed = (all_tokens - first_tokens) / (all_seconds - first_seconds)
            print(
                f"{model}: first token {first_seconds:.2f} s, "
                f"decode {speed:.2f} tokens/s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="write the random model and adapters")
    make.add_argument("out", type=Path)
    run = commands.add_parser("measure", help="time requests to a running vLLM")
    run.add_argument("url", help="vLLM's address, for example http://127.0.0.1:8000")
    run.add_argument("--base-model", default="phi-2", help="vLLM's --served-model-name")
    run.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    if args.command == "make":
        make_model(args.out)
    else:
        measure(args.url, args.base_model, args.rounds)


if __name__ == "__main__":
    main()
