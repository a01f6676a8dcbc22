"""Tiny models for offline runs: a real architecture with random weights and a tokenizer trained on
the fly, so the quickstart and the tests download nothing.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

# A few-layer decoder: big enough for LoRA, 4-bit (bitsandbytes needs dims divisible by its block)
# and DDP to be real, small enough to train on two CPU cores in seconds.
TINY_CONFIGS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}

_WORDS = (
    "the a model learns to answer questions about ray clusters gpus memory plans adapters "
    "quantization batch sizes tokens loss step node worker train fine tune lora rank alpha "
    "what is how many which one red green blue cat dog sun moon apple pear one two three four five"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def learnable_records(n: int = 256, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style records with a simple, learnable mapping (count words, echo a colour...)."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue"]
    animals = ["cat", "dog"]
    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            c = rng.choice(colours)
            records.append({"instruction": f"what colour is the {c} apple", "input": "",
                            "output": f"the apple is {c}"})
        elif kind == 1:
            k = rng.randint(1, 5)
            word = ["one", "two", "three", "four", "five"][k - 1]
            records.append({"instruction": "how many", "input": " ".join(["sun"] * k),
                            "output": word})
        else:
            a = rng.choice(animals)
            records.append({"instruction": f"which one is the {a}", "input": "cat dog",
                            "output": a})
    return records


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256) -> None:
    """Train a byte-level BPE tokenizer on the tiny corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # its bar prints blank lines to stdout
    corpus = [" ".join(_WORDS)] * 4
    corpus += [f"{r['instruction']} {r['input']} {r['output']}" for r in learnable_records(128)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>",
        unk_token=None, model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def make_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0,
                    **overrides) -> Path:
    """Write a tiny `arch` model (random weights, bf16) and its tokenizer to `out_dir`.

    Written into a temporary sibling and renamed, so a crash never leaves a half-written model.
    Returns the directory. An existing complete directory is reused.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(TINY_CONFIGS)}")
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    train_tokenizer(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp))
    cfg = dict(TINY_CONFIGS[arch], **overrides)
    cfg.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp), safe_serialization=True)
    with open(tmp / "rayquant_tiny.json", "w", encoding="utf-8") as f:
        json.dump({"arch": arch, "seed": seed, "note": "random weights, built offline"}, f)
    from planner.atomic import publish_mode

    publish_mode(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
