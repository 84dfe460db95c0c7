"""Every flag of every `pagoda` verb has help and shows its default; sizes take units; `serve --help` groups its
flags as vLLM does. Walks the real parsers, no engine."""

from __future__ import annotations

import argparse

import pytest

from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.cli_flags import HelpFormatter


def _parsers(parser: argparse.ArgumentParser, name: str = "pagoda"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {verb}")


PARSERS = dict(_parsers(build_parser()))


def test_the_verbs_and_bench_kinds_are_there():
    assert {"pagoda generate", "pagoda chat", "pagoda serve", "pagoda bench", "pagoda convert",
            "pagoda bench serve", "pagoda bench throughput", "pagoda bench latency"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_that_shows_its_default(name):
    parser = PARSERS[name]
    formatter = HelpFormatter(name)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {label} has no help"
        optional = bool(action.option_strings) or action.nargs == "?"
        if optional:
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown, f"{name}: {label}'s help does not show its default: {shown!r}"


def test_sizes_take_units():
    parse = build_parser().parse_args
    assert parse(["serve", "--kv-cache-memory", "2GiB"]).kv_cache_memory == 2 << 30
    assert parse(["generate", "--kv-cache-memory", "512MiB"]).kv_cache_memory == 512 << 20
    assert parse(["serve", "--kv-cache-memory", "1048576"]).kv_cache_memory == 1 << 20


def test_a_bad_size_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--kv-cache-memory", "2 gigs"])
    assert exit_info.value.code == 2
    assert "bad size '2 gigs'" in capsys.readouterr().err


def test_serve_groups_its_flags_as_vllm_does():
    titles = [group.title for group in PARSERS["pagoda serve"]._action_groups]
    assert ["model", "KV cache", "scheduler", "KV store", "parallel"] == [
        t for t in titles if t in ("model", "KV cache", "scheduler", "KV store", "parallel")]
    assert "server" in titles
    help_text = PARSERS["pagoda serve"].format_help()
    assert "(default: 127.0.0.1)" in help_text and "(default: 8000)" in help_text


def test_bench_kinds_use_vllms_flag_names():
    parse = build_parser().parse_args
    throughput = parse(["bench", "throughput", "--model", "smollm2-135m", "--input-len", "32", "--output-len", "8",
                        "--num-prompts", "4"])
    assert (throughput.model, throughput.input_len, throughput.output_len, throughput.num_prompts) == \
        ("smollm2-135m", 32, 8, 4)
    latency = parse(["bench", "latency", "--batch-size", "2", "--num-iters-warmup", "1", "--num-iters", "3"])
    assert (latency.batch_size, latency.num_iters_warmup, latency.num_iters) == (2, 1, 3)
