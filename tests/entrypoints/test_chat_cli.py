"""`pagoda chat`: the session's commands and history (a scripted backend), and the real thing in a terminal
(pexpect): three turns with a local model, an answer stopped by Ctrl-C and a turn after it, /reset, Ctrl-D;
and the same against a running server with --url."""

from __future__ import annotations

import re
import sys

import pexpect
import pytest

from pagoda.entrypoints.chat_cli import PROMPT, ChatSession, StopFlag

MODEL_FLAGS = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "128MiB"]
START_TIMEOUT_S = 300
ANSWER_TIMEOUT_S = 120


class ScriptedBackend:
    """Answers each turn with its words one by one; may raise the stop flag after some of them."""

    name = "scripted"

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[list[dict[str, str]]] = []
        self.stop_after = stop_after

    def stream(self, messages, params, stop: StopFlag):
        self.seen.append([dict(m) for m in messages])
        for index, word in enumerate(["one ", "two ", "three ", "four "]):
            if self.stop_after is not None and index == self.stop_after:
                stop.set = True
            if stop.set:
                return
            yield word


def _session(backend) -> tuple[ChatSession, list[str]]:
    written: list[str] = []
    return ChatSession(backend, None, {"temperature": 0.0, "max_tokens": 8}, written.append), written


def test_history_grows_turn_by_turn_and_reset_and_system_shape_it():
    backend = ScriptedBackend()
    session, written = _session(backend)
    session.handle("hello")
    session.handle("/system be brief")
    session.handle("again")
    assert backend.seen[-1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "one two three four "},
                                {"role": "user", "content": "again"}]
    session.handle("/reset")
    session.handle("fresh")
    assert backend.seen[-1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fresh"}]
    assert "[conversation cleared]\n" in written


def test_a_stopped_answer_keeps_what_came_and_the_next_turn_goes_on():
    backend = ScriptedBackend(stop_after=2)
    session, written = _session(backend)
    session.handle("tell me")
    assert "".join(written).endswith("one two \n[stopped]\n")
    backend.stop_after = None
    session.handle("more")
    assert backend.seen[-1][-2] == {"role": "assistant", "content": "one two "}


@pytest.mark.parametrize(("line", "answer"), [
    ("/params temperature=0.5 top_k=5", "[max_tokens=8 temperature=0.5 top_k=5]"),
    ("/params temperature=hot", "[temperature takes a float, got 'hot']"),
    ("/params colour=red", "[expected KEY=VALUE"),
    ("/params temperature=-1", "SamplingParams.temperature must be non-negative"),
    ("/frobnicate", "[unknown command /frobnicate"),
])
def test_params_are_checked_before_they_are_used(line, answer):
    session, written = _session(ScriptedBackend())
    session.handle(line)
    assert answer in "".join(written)


def test_quit_ends_the_session():
    session, _ = _session(ScriptedBackend())
    assert session.handle("/quit") is False and session.handle("hi") is True


def _spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "pagoda.entrypoints.cli", "chat", *args], encoding="utf-8",
                          timeout=ANSWER_TIMEOUT_S, dimensions=(40, 200))
    child.expect("pagoda chat with", timeout=START_TIMEOUT_S)
    child.expect_exact(PROMPT)
    return child


def _turn(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact(PROMPT)
    answer = child.before.split(text, 1)[-1]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", answer).strip()


def _converse_stop_and_leave(child: pexpect.spawn) -> None:
    answers = [_turn(child, text) for text in ("What is the capital of France?", "And of Italy?",
                                               "Name one river there.")]
    assert all(answers), answers
    assert "[max_tokens=1500" in _turn(child, "/params max_tokens=1500")
    request = "Write a very long story about a lighthouse keeper and his many adventures."
    child.sendline(request)
    child.expect_exact(request + "\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming: four words of it came
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact(PROMPT)
    assert _turn(child, "/params max_tokens=16")
    assert _turn(child, "Thank you.")
    assert "[conversation cleared]" in _turn(child, "/reset")
    child.sendeof()
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.slow
def test_a_terminal_conversation_with_a_local_model(smollm_path):
    _converse_stop_and_leave(_spawn("smollm2-135m", *MODEL_FLAGS, "--temperature", "0", "--max-tokens", "24"))


@pytest.mark.slow
def test_a_terminal_conversation_with_a_server(openai_server):
    from openai_server_helpers import API_KEY

    _converse_stop_and_leave(_spawn("--url", f"{openai_server.url}/v1", "--api-key", API_KEY,
                                    "--temperature", "0", "--max-tokens", "24"))
