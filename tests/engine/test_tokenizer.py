"""Pagoda's tokenizer (tokenizers + jinja2) gives transformers' ids, text and chat prompts, without importing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.engine.tokenizer import Tokenizer, render_chat

TEXTS = ["Hello world", " leading and  double  spaces", "é日本語\n\n\ttabs", "<bos>special<eos> text", "a" * 300,
         "emoji 🙂 and \u00a0 nbsp", ""]

# A Gemma-style template exercising what templates use: bos_token, raise_exception, loop controls, tojson.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "<start_of_turn>{{ message['role'] }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    "{{ {'k': 'ü'} | tojson }}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  Again  "}],
]


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def tokenizers_pair(request: pytest.FixtureRequest, model_paths: dict[str, Path]):
    from transformers import AutoTokenizer

    path = model_paths[request.param]
    return Tokenizer.from_folder(path), AutoTokenizer.from_pretrained(str(path))


def test_ids_and_text_match_transformers(tokenizers_pair) -> None:
    ours, theirs = tokenizers_pair
    for text in TEXTS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == theirs.encode(text, add_special_tokens=add_special_tokens), (text, add_special_tokens)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("x")) == theirs.decode(theirs.encode("x"))  # defaults agree


def test_chat_prompts_match_transformers(tokenizers_pair) -> None:
    ours, theirs = tokenizers_pair
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = theirs.apply_chat_template(conversation, chat_template=TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            assert render_chat(ours, conversation, add_generation_prompt, TEMPLATE) == expected
            if theirs.chat_template is not None:
                expected = theirs.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
                assert render_chat(ours, conversation, add_generation_prompt) == expected


def test_bad_text_and_templates_are_value_errors(tokenizers_pair) -> None:
    ours, _ = tokenizers_pair
    with pytest.raises(ValueError, match="not valid Unicode"):
        ours.encode("lone \ud800 surrogate")
    with pytest.raises(ValueError, match="bad role"):
        render_chat(ours, [{"role": "tool", "content": "x"}], chat_template=TEMPLATE)
    with pytest.raises(ValueError, match="role"):
        render_chat(ours, [{"content": "no role"}], chat_template=TEMPLATE)


def test_llm_never_imports_transformers(smollm_path: Path) -> None:
    code = ("import sys; from pagoda import LLM, SamplingParams; "
            f"llm = LLM({str(smollm_path)!r}, kv_cache_memory=64 << 20, max_model_len=512); "
            "llm.chat([{'role': 'user', 'content': 'Hi'}], SamplingParams(max_tokens=2), use_tqdm=False); "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
