"""Chat on any model (issue 18, item 5): the ChatML fallback for a model without a template, and
``--chat-template FILE``. Pure parts here; the real gateway and `meshllm ask` in tests/test_demo_serve.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.errors import APIError, TokenizerError
from meshllm.gateway import openai_api as oa
from meshllm.model.tokenizer import (
    CHATML_TEMPLATE,
    HFTokenizer,
    load_tokenizer,
    read_chat_template,
    render_chat_template,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "tiny-austen"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"},
        {"role": "assistant", "content": "A young lady."}, {"role": "user", "content": "And Harriet?"}]


def test_a_model_without_a_template_gets_chatml_after_its_bos() -> None:
    from meshllm.model.manifest import load_manifest

    tok = load_tokenizer(BUNDLED, load_manifest(BUNDLED).tokenizer)
    assert tok.chat_template is None and tok.chat_template_name == "chatml (fallback)"
    text = tok.apply_chat_template(CHAT)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho is Emma?<|im_end|>\n"
                    "<|im_start|>assistant\nA young lady.<|im_end|>\n<|im_start|>user\nAnd Harriet?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode(text, bos=False)  # as the mesh encodes a chat: the template placed the BOS
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_the_fallback_is_what_llama_cpp_renders_for_chatml() -> None:
    # llama.cpp's llm_chat_apply_template, LLM_CHAT_TEMPLATE_CHATML, with add_ass: the same text (BOS aside)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT) + "<|im_start|>assistant\n"
    assert render_chat_template(CHATML_TEMPLATE, CHAT) == expected


def test_a_models_own_template_wins(tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((BUNDLED / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                                  "{% endfor %}")
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.chat_template_name == "the model's own"
    assert tok.apply_chat_template(CHAT[:2]) == "[system] Be brief.\n[user] Who is Emma?\n"


def test_chat_template_files_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot read"):
        read_chat_template(tmp_path / "missing.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(TokenizerError, match="is empty"):
        read_chat_template(tmp_path / "empty.jinja")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match="failed to render") as e:
        read_chat_template(tmp_path / "bad.jinja")
    assert "\n" not in str(e.value)
    (tmp_path / "ok.jinja").write_text("{{ messages[-1]['content'] }}")
    assert read_chat_template(tmp_path / "ok.jinja") == "{{ messages[-1]['content'] }}"


def test_the_gateways_template_turns_a_chat_into_a_prompt() -> None:
    call = oa.parse_chat(b'{"model": "m", "messages": [{"role": "user", "content": "She was"}], "max_tokens": 5}')
    plain = oa.with_chat_template(call, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert plain.endpoint == "chat" and plain.params["prompt"] == "She was" and "messages" not in plain.params
    assert plain.params["max_tokens"] == 5
    refusing = "{{ raise_exception('only one message, please') }}"
    with pytest.raises(APIError, match="only one message") as e:
        oa.with_chat_template(call, refusing)
    assert e.value.status == 400
    with pytest.raises(APIError, match="empty prompt"):
        oa.with_chat_template(call, "{% if false %}x{% endif %}")
    completion = oa.parse_completion(b'{"model": "m", "prompt": "hi"}')
    assert oa.with_chat_template(completion, "{{ 1 }}") is completion
