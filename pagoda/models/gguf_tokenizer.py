"""Models layer: writes the tokenizer stored in a GGUF file as tokenizer.json + tokenizer_config.json.

transformers' GGUF tokenizer conversion builds the vocabulary; this module
then makes the special-token behaviour follow the GGUF flags exactly
(`tokenizer.ggml.add_bos_token` / `add_eos_token`), keeps the chat template in
tokenizer_config.json where every reader looks for it, and checks that both
`tokenizers` and transformers' `AutoTokenizer` encode with BOS exactly when
the GGUF says so. Gemma produces garbage without its BOS, so this is checked
at conversion time, not trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

# Keys transformers writes about where it loaded from; meaningless in a saved folder.
_LOAD_TIME_KEYS = ("is_local", "local_files_only")
_PROBE_TEXT = "Hello world"


def special_token_flags(metadata: dict[str, Any]) -> tuple[bool, bool]:
    """(add_bos, add_eos) as llama.cpp decides them: the GGUF flags, else by tokenizer family."""
    # Without the flag llama.cpp adds BOS for SentencePiece ("llama") vocabularies only.
    default_bos = metadata.get("tokenizer.ggml.model") == "llama"
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    return add_bos, add_eos


def write_tokenizer(gguf_path: Path, metadata: dict[str, Any], out_dir: Path) -> None:
    """Convert the GGUF's tokenizer into `out_dir` and verify its BOS behaviour."""
    # transformers is slow to import and needed only here, when converting.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    add_bos, add_eos = special_token_flags(metadata)
    _set_post_processor(out_dir / "tokenizer.json", metadata, add_bos, add_eos)
    _finish_tokenizer_config(out_dir, metadata, add_bos, add_eos)
    _verify_bos(out_dir, metadata, add_bos)


def _set_post_processor(path: Path, metadata: dict[str, Any], add_bos: bool, add_eos: bool) -> None:
    tokenizer = Tokenizer.from_file(str(path))
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    prefix: list[tuple[str, int]] = []
    suffix: list[tuple[str, int]] = []
    if add_bos:
        prefix = [(_token(tokenizer, bos_id, "bos"), bos_id)]
    if add_eos:
        suffix = [(_token(tokenizer, eos_id, "eos"), eos_id)]
    single = [t for t, _ in prefix] + ["$A:0"] + [t for t, _ in suffix]
    pair = single + [t for t, _ in prefix] + ["$B:1"] + [t for t, _ in suffix]
    special_tokens = list(dict(prefix + suffix).items())
    tokenizer.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)
    tokenizer.save(str(path))


def _token(tokenizer: Tokenizer, token_id: int | None, role: str) -> str:
    token = tokenizer.id_to_token(token_id) if token_id is not None else None
    if token is None:
        raise ValueError(f"GGUF asks to add the {role} token but its id {token_id!r} is not in the vocabulary")
    return token


def _finish_tokenizer_config(out_dir: Path, metadata: dict[str, Any], add_bos: bool, add_eos: bool) -> None:
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in _LOAD_TIME_KEYS:
        config.pop(key, None)
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    # transformers 5 names the plain fast tokenizer "TokenizersBackend", which
    # transformers 4 (and so vLLM) does not know; both know this name.
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template_file = out_dir / "chat_template.jinja"
    template_file.unlink(missing_ok=True)
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _verify_bos(out_dir: Path, metadata: dict[str, Any], add_bos: bool) -> None:
    from transformers import AutoTokenizer

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    encodings = {
        "tokenizers": Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(_PROBE_TEXT).ids,
        "transformers": AutoTokenizer.from_pretrained(out_dir)(_PROBE_TEXT)["input_ids"],
    }
    for reader, ids in encodings.items():
        if (ids[:1] == [bos_id]) != add_bos:
            raise RuntimeError(
                f"converted tokenizer in {out_dir} encodes {_PROBE_TEXT!r} as {ids} with {reader}; "
                f"the GGUF says add_bos_token={add_bos} (bos id {bos_id})"
            )
