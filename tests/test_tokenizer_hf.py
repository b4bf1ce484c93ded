"""HFTokenizer must give what transformers.AutoTokenizer gives; StreamDecoder must add up to decode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import transformers  # the reference; in the test extra, installed by .ci/run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from meshllm.errors import TokenizerError
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import (
    HFTokenizer,
    Llama2cTokenizer,
    StreamDecoder,
    load_tokenizer,
    random_llama2c_vocab,
    write_tokenizer_bin,
)

CORPUS = [
    "hello world, this is a small corpus for a tiny tokenizer.",
    "the quick brown fox jumps over the lazy dog; hello again, world!",
    "tokenizers split text into pieces and merge frequent pairs of pieces.",
    "café naïve résumé — accents are multi-byte in UTF-8.",
] * 5

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TEXTS = [
    "",
    "hello world",
    " leading space and trailing ",
    "multiple   spaces\tand\nnewlines\n\n",
    "emoji 😀 and 👍🏽 and 🏳️‍🌈",
    "日本語のテキスト",
    "café naïve résumé",
    "<s> a literal special </s> token",
]

SPECIAL = ["<unk>", "<s>", "</s>"]


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _llama2_style() -> Tokenizer:
    """Metaspace + byte-fallback BPE with ``<0xHH>`` pieces, like Llama 2's tokenizer.json."""
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = meta
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SPECIAL)
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


# name -> (builder, post-processor adds BOS in tokenizer.json, tokenizer_config extras).
# transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists; the
# flag variants check that HFTokenizer does too (no doubled or invented BOS).
VARIANTS: dict[str, tuple[Any, bool, dict[str, Any]]] = {
    "bytelevel-template": (_byte_level, True, {}),
    "bytelevel-template-flag-on": (_byte_level, True, {"add_bos_token": True}),
    "bytelevel-template-flag-off": (_byte_level, True, {"add_bos_token": False}),
    "bytelevel-none-flag-on": (_byte_level, False, {"add_bos_token": True, "add_eos_token": True}),
    "bytelevel-none": (_byte_level, False, {}),
    "llama2-style": (_llama2_style, True, {"add_bos_token": True, "add_eos_token": False}),
}


def _write_variant(d: Path, name: str) -> Path:
    build, template, extras = VARIANTS[name]
    tok = build()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "</s>", "special": True}  # as transformers saves it
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>"}
    config.update(extras, chat_template=CHAT_TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[HFTokenizer, Any]]:
    out = {}
    for name in VARIANTS:
        d = _write_variant(tmp_path_factory.mktemp(name), name)
        out[name] = (HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d)))
    return out


def _stream(tok: Any, ids: list[int], prev: int | None = None) -> tuple[str, list[str]]:
    dec = StreamDecoder(tok, prev=prev)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    return "".join(pieces), pieces


@pytest.mark.parametrize("name", list(VARIANTS))
def test_encode_decode_match_transformers(pairs, name: str) -> None:
    tok, ref = pairs[name]
    assert tok.bos_id == ref.bos_token_id and tok.eos_ids == (ref.eos_token_id,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.encode(text, bos=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    bos_first = [tok.encode(t)[:1] == [tok.bos_id] for t in TEXTS[1:] if not t.startswith("<s>")]
    adds_bos = VARIANTS[name][1]  # tokenizer.json decides; config flags are ignored (transformers 5)
    assert all(bos_first) if adds_bos else not any(bos_first)
    assert tok.encode("hello")[:2] != [tok.bos_id, tok.bos_id]  # never doubled


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), name=st.sampled_from(["bytelevel-template-flag-on", "llama2-style"]))
def test_encode_matches_transformers_random(pairs, text: str, name: str) -> None:
    tok, ref = pairs[name]
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert _stream(tok, tok.encode(text, bos=False))[0] == tok.decode(tok.encode(text, bos=False))


@pytest.mark.parametrize("name", ["bytelevel-template", "llama2-style"])
def test_stream_decoder_holds_back_split_characters(pairs, name: str) -> None:
    tok, _ = pairs[name]
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        joined, pieces = _stream(tok, ids)
        assert joined == tok.decode(ids), text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
    ids = tok.encode("😀", bos=False)
    assert len(ids) > 1  # the emoji really is split across tokens
    _, pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "😀"


def test_stream_decoder_flushes_incomplete_bytes(pairs) -> None:
    tok, _ = pairs["bytelevel-template"]
    ids = tok.encode("ok 😀", bos=False)[:-1]  # cut the emoji's last byte
    joined, pieces = _stream(tok, ids)
    assert joined == tok.decode(ids) and joined.endswith("\ufffd")
    assert pieces[-1].endswith("\ufffd")  # only flush() lets the broken tail out


def test_stream_decoder_llama2c_prev(tmp_path: Path) -> None:
    pieces, scores = random_llama2c_vocab(512, seed=1)
    tok = Llama2cTokenizer(pieces, scores)
    text = "the rainbow was 😀 over the hills — naïve 日本"
    ids = tok.encode(text, bos=False)
    assert _stream(tok, ids, prev=1)[0] == tok.decode(ids, prev=1) == text
    assert _stream(tok, ids)[0] == tok.decode(ids) == " " + text
    long_ids = ids * 50  # the window slides: still exact, and the buffer stays small
    dec = StreamDecoder(tok, prev=1)
    out = "".join(dec.push(i) for i in long_ids) + dec.flush()
    assert out == tok.decode(long_ids, prev=1)
    assert len(dec._ids) < 20


@pytest.mark.parametrize("name", ["bytelevel-template", "llama2-style", "bytelevel-none-flag-on"])
def test_chat_template_matches_transformers(pairs, name: str) -> None:
    tok, ref = pairs[name]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  hi 😀  "},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    text = tok.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>") and text.endswith("<|assistant|>\n")
    with pytest.raises(TokenizerError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_files_and_templates(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    d = _write_variant(tmp_path / "m", "bytelevel-none")
    (d / "tokenizer_config.json").unlink()
    tok = HFTokenizer.from_dir(d)
    assert tok.bos_id is None and tok.eos_ids == ()
    assert tok.chat_template_name == "chatml (fallback)"  # no template of its own (tests/test_chat_template.py)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert HFTokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        HFTokenizer.from_dir(d)


def test_load_tokenizer(tmp_path: Path) -> None:
    d = _write_variant(tmp_path / "hf", "llama2-style")
    hf = load_tokenizer(d, {"kind": "hf", "file": "tokenizer.json", "config": "tokenizer_config.json"})
    assert isinstance(hf, HFTokenizer) and hf.chat_template == CHAT_TEMPLATE
    bare = load_tokenizer(d, {"kind": "hf", "file": "tokenizer.json", "config": None})
    assert bare.chat_template is None and bare.bos_id is None

    pieces, scores = random_llama2c_vocab(300)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, scores)
    l2c = load_tokenizer(tmp_path, {"kind": "llama2c", "file": "tokenizer.bin", "vocab_size": 300})
    assert isinstance(l2c, Llama2cTokenizer) and l2c.vocab_size == 300
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sp'"):
        load_tokenizer(tmp_path, {"kind": "sp"})
    with pytest.raises(TokenizerError, match="lacks 'vocab_size'"):
        load_tokenizer(tmp_path, {"kind": "llama2c", "file": "tokenizer.bin"})
    config = make_llama2c_config(16, 32, 1, 2, 2, 300, 8)
    write_llama2c(tmp_path / "model.bin", config, random_llama2c_weights(config, 0))  # a model dir as shipped
    assert load_tokenizer(tmp_path, {"kind": "llama2c", "file": "tokenizer.bin", "vocab_size": 300}).encode("a")
