"""Small random Hugging Face checkpoints written by the tests (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little robot who lived on a mesh of tiny computers.",
    "Héllo wörld! Ünïcödé, emoji 🙂 and 中文 too.",
    "Numbers 1234567890 and symbols #$%&*()[]{}<>",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(out: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer.json + tokenizer_config.json with <s>=1 and </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }))


def write_hf_model(out: Path, arch: str = "llama", *, tied: bool = False, layers: int = 4, vocab: int = 300,
                   seed: int = 0, rope_scaling: bool = False, head_dim: int | None = None) -> torch.nn.Module:
    """Writes a random checkpoint of ``arch`` (llama, qwen2, mistral) with save_pretrained."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if head_dim is not None:  # heads of another size than hidden_size / num_attention_heads
        common["head_dim"] = head_dim
    if arch == "llama":
        extra = {"rope_theta": 500000.0}
        if rope_scaling:
            extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger-than-default weights so that logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(out)
    write_tokenizer(out, vocab)
    return model
