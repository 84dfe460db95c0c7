"""Test helper: a Gemma 3 multimodal tokenizer folder built from the converted 270M text model.

The packaged 270M GGUF's tokenizer has 262144 tokens and no `<image_soft_token>`;
Gemma 3's vision checkpoints put it at id 262144. `write_gemma3_tokenizer` adds
it there (special, never normalized), names Gemma 3's image tokens in
tokenizer_config.json the way the real checkpoints' configs do (so
transformers' `Gemma3Processor` finds `boi_token`, `eoi_token`, `image_token`),
and writes a chat template of Pagoda's own that places `<start_of_image>` for
each image content part.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

IMAGE_SOFT_TOKEN = "<image_soft_token>"
IMAGE_SOFT_TOKEN_ID = 262144
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"

# Gemma 3's turn format: `<start_of_turn>{role}\n...<end_of_turn>\n`, the assistant's role spelled "model";
# a system message is folded into the first user turn; image parts ("image" or OpenAI's "image_url")
# become `<start_of_image>`.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if message['content'] is string -%}
      {%- set ns.system = message['content'] + '\\n\\n' -%}
    {%- else -%}
      {%- for part in message['content'] if part['type'] == 'text' -%}
        {%- set ns.system = ns.system + part['text'] -%}
      {%- endfor -%}
      {%- set ns.system = ns.system + '\\n\\n' -%}
    {%- endif -%}
  {%- else -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<start_of_turn>' + role + '\\n' -}}
    {%- if role == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}
    {%- if message['content'] is string -%}
      {{- message['content'] | trim -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] in ('image', 'image_url') -%}
          {{- '<start_of_image>' -}}
        {%- elif part['type'] == 'text' -%}
          {{- part['text'] | trim -}}
        {%- else -%}
          {{- raise_exception('unsupported content part type: ' + part['type']) -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<end_of_turn>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""


def write_gemma3_tokenizer(source_folder: Path, target_folder: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for a Gemma 3 vision model."""
    target_folder.mkdir(parents=True, exist_ok=True)
    backend = BackendTokenizer.from_file(str(source_folder / "tokenizer.json"))
    if backend.token_to_id(IMAGE_SOFT_TOKEN) is None:
        if backend.get_vocab_size(with_added_tokens=True) != IMAGE_SOFT_TOKEN_ID:
            raise ValueError(f"{source_folder}: expected {IMAGE_SOFT_TOKEN_ID} tokens before {IMAGE_SOFT_TOKEN}")
        backend.add_special_tokens([AddedToken(IMAGE_SOFT_TOKEN, special=True, normalized=False)])
    if backend.token_to_id(IMAGE_SOFT_TOKEN) != IMAGE_SOFT_TOKEN_ID:
        raise ValueError(f"{source_folder}: {IMAGE_SOFT_TOKEN} is not id {IMAGE_SOFT_TOKEN_ID}")
    backend.save(str(target_folder / "tokenizer.json"))

    config = json.loads((source_folder / "tokenizer_config.json").read_text())
    config.update({"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_SOFT_TOKEN})
    config["extra_special_tokens"] = {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_SOFT_TOKEN}
    config.pop("chat_template", None)
    (target_folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (target_folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
