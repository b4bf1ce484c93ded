"""llama2.c checkpoint and tokenizer.bin: round trips, clear errors, and agreement with the run.c oracle."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.errors import ModelError, TokenizerError, UnsupportedModelError
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, read_llama2c, write_llama2c
from meshllm.model.tokenizer import Llama2cTokenizer, random_llama2c_vocab, write_tokenizer_bin
from tests.oracles.run_c import RunC

# dim, hidden, layers, heads, kv_heads, vocab, seq_len
SMALL = (64, 172, 2, 4, 4, 300, 32)
GQA = (48, 128, 3, 6, 2, 512, 24)


def _save(tmp_path: Path, dims: tuple[int, ...], shared: bool, seed: int = 0):
    config = make_llama2c_config(*dims, shared_classifier=shared)
    weights = random_llama2c_weights(config, seed)
    path = tmp_path / "model.bin"
    write_llama2c(path, config, weights)
    return path, config, weights


# ---------------------------------------------------------------- checkpoint format


@pytest.mark.parametrize("dims", [SMALL, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_round_trip(tmp_path: Path, dims: tuple[int, ...], shared: bool) -> None:
    path, config, weights = _save(tmp_path, dims, shared)
    got_config, got = read_llama2c(path)
    assert got_config == config
    assert got_config.head_dim == dims[0] // dims[3]
    assert got_config.rope_interleaved and got_config.stop_on_bos and got_config.tied_embeddings == shared
    assert got_config.stop_ids() == frozenset({1, 2})
    assert set(got) == set(weights)
    assert ("output" in got) == (not shared)
    for name, arr in weights.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_file_layout_matches_run_c(tmp_path: Path) -> None:
    dim, hidden, L, H, KV, V, S = GQA
    path, config, weights = _save(tmp_path, GQA, shared=False)
    raw = path.read_bytes()
    assert struct.unpack("<7i", raw[:28]) == (dim, hidden, L, H, KV, -V, S)
    floats = np.frombuffer(raw[28:], dtype="<f4")
    hs, kv_dim = dim // H, dim // H * KV
    per_layer = 2 * dim + dim * dim * 2 + 2 * dim * kv_dim + 3 * dim * hidden
    before_freqs = V * dim + L * per_layer + dim
    assert floats.size == before_freqs + S * hs + V * dim
    np.testing.assert_array_equal(floats[V * dim : V * dim + dim], weights["layers.0.attention_norm"])
    np.testing.assert_array_equal(floats[-V * dim :].reshape(V, dim), weights["output"])
    # freq_cis as llama2.c's export.py writes it: cos/sin(pos * 10000^(-2j/hs)).
    inv = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
    ang = np.outer(np.arange(S), inv)
    real = floats[before_freqs : before_freqs + S * hs // 2].reshape(S, hs // 2)
    imag = floats[before_freqs + S * hs // 2 : before_freqs + S * hs].reshape(S, hs // 2)
    np.testing.assert_allclose(real, np.cos(ang), atol=1e-5)
    np.testing.assert_allclose(imag, np.sin(ang), atol=1e-5)


def test_read_is_zero_copy_and_read_only(tmp_path: Path) -> None:
    path, _, _ = _save(tmp_path, SMALL, shared=True)
    _, got = read_llama2c(path)
    with pytest.raises(ValueError):
        got["norm"][0] = 0.0


@pytest.mark.parametrize("delta", [-4, -1, 4])
def test_wrong_size_is_a_clear_error(tmp_path: Path, delta: int) -> None:
    path, _, _ = _save(tmp_path, SMALL, shared=True)
    raw = path.read_bytes()
    path.write_bytes(raw[:delta] if delta < 0 else raw + b"\0" * delta)
    with pytest.raises(ModelError, match=rf"implies {len(raw)} bytes but the file has {len(raw) + delta}"):
        read_llama2c(path)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((64, 172, 2, 5, 5, 300, 32), "not divisible by n_heads"),
        ((64, 172, 2, 4, 3, 300, 32), "not a multiple of n_kv_heads"),
        ((64, 172, 0, 4, 4, 300, 32), "n_layers=0 must be positive"),
        ((64, 172, 2, 4, 4, 0, 32), "vocab_size=0"),
        ((-64, 172, 2, 4, 4, 300, 32), "dim=-64"),
        ((12, 172, 2, 4, 4, 300, 32), "head size 3 is odd"),
    ],
)
def test_bad_header_is_a_clear_error(tmp_path: Path, header: tuple[int, ...], match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 1024)
    with pytest.raises(ModelError, match=match):
        read_llama2c(path)


def test_short_or_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\1\0\0\0" * 3)
    with pytest.raises(ModelError, match="too short"):
        read_llama2c(path)
    with pytest.raises(ModelError, match="cannot read"):
        read_llama2c(tmp_path / "missing.bin")


def test_write_rejects_what_the_format_cannot_hold(tmp_path: Path) -> None:
    config = make_llama2c_config(*SMALL)
    weights = random_llama2c_weights(config, 0)
    with pytest.raises(ModelError, match="layers.1.wk"):
        write_llama2c(tmp_path / "m.bin", config, {**weights, "layers.1.wk": weights["layers.1.wk"][:-1]})
    with pytest.raises(ModelError, match="'output'"):
        write_llama2c(tmp_path / "m.bin", config, {**weights, "output": weights["tok_embeddings"]})
    untied = make_llama2c_config(*SMALL, shared_classifier=False)
    with pytest.raises(ModelError, match="missing weight 'output'"):
        write_llama2c(tmp_path / "m.bin", untied, weights)
    from dataclasses import replace

    with pytest.raises(UnsupportedModelError, match="rope_interleaved"):
        write_llama2c(tmp_path / "m.bin", replace(config, rope_interleaved=False), weights)


# ---------------------------------------------------------------- the oracle itself


def _hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a llama2.c (adjacent-pair RoPE) q/k projection in HF's rotate-half order."""
    hs = w.shape[0] // n_heads
    order = np.concatenate([np.arange(0, hs, 2), np.arange(1, hs, 2)])
    return w.reshape(n_heads, hs, -1)[:, order].reshape(w.shape)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_oracle_forward_matches_transformers_llama(tmp_path: Path, shared: bool) -> None:
    """Cross-check the run.c transcription against an independent implementation."""
    import torch
    import transformers
    dim, hidden, L, H, KV, V, S = GQA
    path, config, w = _save(tmp_path, GQA, shared)
    hf_config = transformers.LlamaConfig(
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KV,
        vocab_size=V,
        max_position_embeddings=S,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shared,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    sd = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["norm"]}
    for i in range(L):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "input_layernorm.weight"] = w[q + "attention_norm"]
        sd[p + "post_attention_layernorm.weight"] = w[q + "ffn_norm"]
        sd[p + "self_attn.q_proj.weight"] = _hf_permute(w[q + "wq"], H)
        sd[p + "self_attn.k_proj.weight"] = _hf_permute(w[q + "wk"], KV)
        sd[p + "self_attn.v_proj.weight"] = w[q + "wv"]
        sd[p + "self_attn.o_proj.weight"] = w[q + "wo"]
        sd[p + "mlp.gate_proj.weight"] = w[q + "w1"]
        sd[p + "mlp.down_proj.weight"] = w[q + "w2"]
        sd[p + "mlp.up_proj.weight"] = w[q + "w3"]
    sd["lm_head.weight"] = w["tok_embeddings"] if shared else w["output"]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)

    tokens = [1, 7, 300, 42, 5, 5, 299, 100, 3, 250]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    oracle = RunC(path)
    got = np.stack([oracle.forward(t, pos) for pos, t in enumerate(tokens)])
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)


def test_oracle_generate_counts_positions_and_stops_on_bos(tmp_path: Path) -> None:
    config = make_llama2c_config(*SMALL, shared_classifier=False)
    weights = random_llama2c_weights(config, 1)
    write_llama2c(tmp_path / "m.bin", config, weights)
    oracle = RunC(tmp_path / "m.bin")
    out = oracle.generate_greedy([1, 10, 11], steps=8)
    assert len(out) == 8 - 3 + 1  # positions 2..7 each sample one token
    fresh = RunC(tmp_path / "m.bin")
    for pos, token in enumerate([1, 10, 11]):
        logits = fresh.forward(token, pos)
    assert out[0] == int(np.argmax(logits))
    assert oracle.generate_greedy([1, 10, 11], steps=0) [:6] == out  # 0 steps means seq_len
    assert oracle.generate_greedy([1, 10, 1, 12], steps=8) == []  # a (forced) BOS ends the loop


# ---------------------------------------------------------------- tokenizer.bin


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Llama2cTokenizer, RunC]]:
    """Tokenizer + oracle per vocab size (the oracle needs a checkpoint for vocab_size)."""
    out = {}
    for vocab_size in (300, 512, 4096):
        d = tmp_path_factory.mktemp(f"vocab{vocab_size}")
        pieces, scores = random_llama2c_vocab(vocab_size, seed=vocab_size)
        write_tokenizer_bin(d / "tokenizer.bin", pieces, scores)
        config = make_llama2c_config(16, 32, 1, 2, 2, vocab_size, 8)
        write_llama2c(d / "model.bin", config, random_llama2c_weights(config, 0))
        out[vocab_size] = (
            Llama2cTokenizer.from_file(d / "tokenizer.bin", vocab_size),
            RunC(d / "model.bin", d / "tokenizer.bin"),
        )
    return out


_FRAGMENTS = ["the", " ", "  ", "l", "ll", "o", "ee", "quick", "rain", "bow", "ing", "a", "e", "T", ","]
_FRAGMENTS += [".", "\n", "\t", "é", "ï", "😀", "日本"]
_WORDY = st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join)
_ANY = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=30)
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

FIXED_TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "a",
    "Once upon a time there was a little girl",
    "the the the thethe",
    "héllo wörld — naïve café",
    "😀👍🏽 emoji 🏳️‍🌈",
    "日本語のテキスト",
    "\t tabs\tand  double  spaces ",
    "<0x41> <s> </s>",
]


@pytest.mark.parametrize("text", FIXED_TEXTS)
@pytest.mark.parametrize("vocab_size", [300, 512, 4096])
def test_encode_matches_run_c_fixed(vocabs, vocab_size: int, text: str) -> None:
    tok, oracle = vocabs[vocab_size]
    for bos in (True, False):
        assert tok.encode(text, bos=bos) == oracle.encode(text, bos=bos)


@_SETTINGS
@given(text=st.one_of(_WORDY, _ANY), vocab_size=st.sampled_from([300, 512, 4096]))
def test_encode_matches_run_c(vocabs, text: str, vocab_size: int) -> None:
    tok, oracle = vocabs[vocab_size]
    assert tok.encode(text) == oracle.encode(text)


def test_encode_merges_and_byte_fallback(vocabs) -> None:
    tok, _ = vocabs[512]
    ids = tok.encode("the rainbow")
    assert ids[0] == 1 and 2 not in ids
    assert len(ids) < len(" the rainbow") + 1  # merges happened
    assert tok.decode(ids[1:], prev=1) == "the rainbow"
    emoji = tok.encode("😀", bos=False)
    assert emoji == [tok.pieces.index(b" ")] + [b + 3 for b in "😀".encode()]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []


def test_nul_is_byte_fallback_not_end_of_string(vocabs) -> None:
    tok, _ = vocabs[300]
    ids = tok.encode("a\0b", bos=False)
    assert 3 in ids  # <0x00>; run.c would stop at the NUL (a C string)
    assert tok.decode(ids, prev=1) == "a\0b"


@_SETTINGS
@given(text=st.one_of(_WORDY, st.text(max_size=30)), vocab_size=st.sampled_from([300, 4096]))
def test_decode_round_trips(vocabs, text: str, vocab_size: int) -> None:
    tok, _ = vocabs[vocab_size]
    ids = tok.encode(text, bos=True)
    assert tok.decode(ids[1:], prev=ids[0]) == text  # run.c strips the dummy-prefix space after BOS
    if text:
        assert tok.decode(ids[1:]) == " " + text  # no BOS before: the space stays


def test_decode_matches_run_c_pieces(vocabs) -> None:
    tok, oracle = vocabs[512]
    for prev in (None, 1, 2, 300):
        for token in range(tok.vocab_size):
            if token == 3:
                continue  # run.c returns the C string "\0", i.e. "", for <0x00>
            assert tok.piece_bytes(token, prev) == oracle.decode(prev, token), (prev, token)
    assert tok.decode([1, 2]) == "\n<s>\n\n</s>\n"
    with pytest.raises(TokenizerError, match="outside vocab"):
        tok.decode([512])


def test_tokenizer_bin_errors(tmp_path: Path) -> None:
    pieces, scores = random_llama2c_vocab(300)
    write_tokenizer_bin(tmp_path / "t.bin", pieces, scores)
    assert Llama2cTokenizer.from_file(tmp_path / "t.bin", 300).pieces == pieces
    with pytest.raises(TokenizerError, match="vocab_size is 301"):
        Llama2cTokenizer.from_file(tmp_path / "t.bin", 301)
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-2])
    with pytest.raises(TokenizerError, match="bad length"):
        Llama2cTokenizer.from_file(tmp_path / "t.bin", 300)
    with pytest.raises(TokenizerError, match="cannot read"):
        Llama2cTokenizer.from_file(tmp_path / "missing.bin", 300)
    # no template of its own: the ChatML fallback (tests/test_chat_template.py)
    assert Llama2cTokenizer(pieces, scores).apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tie_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Llama2cTokenizer, RunC]:
    """Hand-made scores: ties (leftmost wins), and merges run.c never takes (<= -1e10, NaN)."""
    d = tmp_path_factory.mktemp("ties")
    pieces, scores = random_llama2c_vocab(260)
    extra = {
        "a": -1.0, "b": -1.0, "c": -1.0, "ab": 1.0, "bc": 1.0, "abc": 2.0, "aa": 1.0, "aaa": 0.5,
        " a": 1.0, "ca": -1e10, "cb": -1.5e10, "cc": float("nan"), "ba": float("-inf"), "bb": 1.0,
    }
    pieces += [k.encode() for k in extra]
    scores += list(extra.values())
    write_tokenizer_bin(d / "tokenizer.bin", pieces, scores)
    config = make_llama2c_config(16, 32, 1, 2, 2, len(pieces), 8)
    write_llama2c(d / "model.bin", config, random_llama2c_weights(config, 0))
    return Llama2cTokenizer.from_file(d / "tokenizer.bin", len(pieces)), RunC(d / "model.bin", d / "tokenizer.bin")


def test_merge_ties_and_unmergeable_scores(tie_vocab) -> None:
    tok, oracle = tie_vocab
    piece = {p: i for i, p in enumerate(tok.pieces)}

    def ids(*ps: str) -> list[int]:
        return [piece[p.encode()] for p in ps]

    assert tok.encode("abc", bos=False) == ids(" a", "bc")  # " a" (leftmost of the 1.0 ties) first
    assert tok.encode("aaaa", bos=False) == ids(" a", "aaa")  # " a", then "aa" leftmost, then "aaa"
    assert tok.encode("ca", bos=False) == ids(" ", "c", "a")  # score -1e10 never beats run.c's start
    assert tok.encode("cc", bos=False) == ids(" ", "c", "c")  # NaN never wins either
    for text in ("abc", "aaaa", "ca", "cc", "bbb", "ababab", "cbcb"):
        assert tok.encode(text) == oracle.encode(text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="abc d", max_size=20))
def test_merge_ties_match_run_c(tie_vocab, text: str) -> None:
    tok, oracle = tie_vocab
    assert tok.encode(text) == oracle.encode(text)


@pytest.mark.parametrize("vocab_size", [260, 300, 1000, 32000])
def test_random_vocab_shape(vocab_size: int) -> None:
    pieces, scores = random_llama2c_vocab(vocab_size, seed=3)
    assert len(pieces) == len(scores) == vocab_size
    assert len(set(pieces)) == vocab_size
    assert pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    assert pieces[3] == b"<0x00>" and pieces[258] == b"<0xFF>" and pieces[259] == b" "
    assert random_llama2c_vocab(vocab_size, seed=3) == (pieces, scores)
