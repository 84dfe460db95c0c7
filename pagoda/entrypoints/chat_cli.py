"""Entrypoints layer: `pagoda chat` — an interactive chat in the terminal, with a local model or any
OpenAI-compatible server (`--url`).

The conversation is rendered by the model's chat template (the server's,
with `--url`), answers stream as they are generated, and the history is
kept across turns. Commands: `/reset` forgets the conversation, `/system
TEXT` sets the system message, `/params temperature=0.7 max_tokens=256 ...`
changes sampling, `/help`, `/quit`. Ctrl-C stops the answer being written
(what came so far stays in the history) and Ctrl-D leaves. Ctrl-C is caught
as a flag the generation loop reads between steps, so an engine step is
never cut in the middle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pagoda.entrypoints.cli_flags import add_engine_flags, engine_kwargs

PROMPT = ">>> "
HELP = """Commands:
  /reset              forget the conversation (the system message stays)
  /system TEXT        set the system message (empty TEXT removes it)
  /params K=V ...     sampling: temperature, top_p, top_k, max_tokens, seed, ...; /params alone shows them
  /help               this text
  /quit               leave (as does Ctrl-D)
Ctrl-C stops the answer being written."""
# Parameters /params takes, and how to read their values.
PARAM_TYPES: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int, "seed": int,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
}


def add_chat_parser(commands: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    parser = commands.add_parser("chat", formatter_class=formatter, help="chat with a model in the terminal",
                                 description="Chat with a model in the terminal: a local MODEL, or a server with "
                                             "--url. " + HELP.replace("\n", " "))
    remote = parser.add_argument_group("remote server")
    remote.add_argument("--url", default=None,
                        help="an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1, instead of a "
                             "local model (default: none)")
    remote.add_argument("--api-key", default=None, help="the server's API key (default: none)")
    conversation = parser.add_argument_group("conversation")
    conversation.add_argument("--system", default=None, help="system message to start with (default: none)")
    conversation.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 is greedy)")
    conversation.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    add_engine_flags(parser)
    parser.set_defaults(handler=run_chat)


class StopFlag:
    """Set by Ctrl-C while an answer streams; the streaming loop checks it between tokens."""

    def __init__(self) -> None:
        self.set = False

    @contextmanager
    def catching(self) -> Iterator[None]:
        self.set = False

        def handler(signum: int, frame: FrameType | None) -> None:
            self.set = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class LocalBackend:
    """The model in this process: the engine is stepped here, one answer at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pagoda import LLM

        self.llm = LLM(args.model, **engine_kwargs(args))
        self.name = args.model
        self._count = 0

    def stream(self, messages: list[dict[str, str]], params: dict[str, Any], stop: StopFlag) -> Iterator[str]:
        from pagoda.engine.tokenizer import render_chat
        from pagoda.sampling_params import RequestOutputKind, SamplingParams

        engine = self.llm.llm_engine
        text = render_chat(engine.tokenizer, messages)
        sampling = SamplingParams(**params, output_kind=RequestOutputKind.DELTA)
        self._count += 1
        request_id = f"chat-{self._count}"
        engine.submit(engine.prepare_request(request_id, text, sampling, add_special_tokens=False))
        finished = False
        try:
            while not finished and not stop.set:
                for output in engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output.outputs[0].text
        finally:
            if not finished:
                engine.abort_request([request_id])

    def close(self) -> None:
        self.llm.shutdown()


class RemoteBackend:
    """An OpenAI-compatible server: streamed `/chat/completions`; closing the stream stops the answer."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(600, connect=10))
        models = self.http.get("/models")
        if models.status_code != 200:
            raise ValueError(f"{self.url}/models answered {models.status_code}: {models.text[:200]}")
        self.name = models.json()["data"][0]["id"]

    def stream(self, messages: list[dict[str, str]], params: dict[str, Any], stop: StopFlag) -> Iterator[str]:
        body = {"model": self.name, "messages": messages, "stream": True, **params}
        with self.http.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise ValueError(f"the server answered {response.status_code}: {response.read()[:300]!r}")
            for line in response.iter_lines():
                if stop.set:
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise ValueError(f"the server failed the answer: {chunk['error'].get('message')}")
                for choice in chunk["choices"]:
                    yield choice["delta"].get("content") or ""

    def close(self) -> None:
        self.http.close()


class ChatSession:
    """The conversation and its commands; `backend` writes the answers."""

    def __init__(self, backend: LocalBackend | RemoteBackend, system: str | None, params: dict[str, Any],
                 write: Callable[[str], None]) -> None:
        self.backend = backend
        self.system = system
        self.params = params
        self.history: list[dict[str, str]] = []
        self.write = write
        self.stop = StopFlag()

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def handle(self, line: str) -> bool:
        """One line from the user; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text)
        self.history.append({"role": "user", "content": text})
        answer = ""
        with self.stop.catching():
            try:
                for piece in self.backend.stream(self.messages(), self.params, self.stop):
                    answer += piece
                    self.write(piece)
            except ValueError as error:
                self.history.pop()
                self.write(f"\n[error: {error}]\n")
                return True
        stopped = self.stop.set
        self.write("\n[stopped]\n" if stopped else "\n")
        self.history.append({"role": "assistant", "content": answer})
        return True

    def _command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        if name in ("/quit", "/exit", "/bye"):
            return False
        if name == "/reset":
            self.history.clear()
            self.write("[conversation cleared]\n")
        elif name == "/system":
            self.system = rest.strip() or None
            self.write(f"[system message {'set' if self.system else 'removed'}]\n")
        elif name == "/params":
            self._set_params(rest.split())
        elif name == "/help":
            self.write(HELP + "\n")
        else:
            self.write(f"[unknown command {name}; /help lists them]\n")
        return True

    def _set_params(self, assignments: list[str]) -> None:
        changes: dict[str, Any] = {}
        for assignment in assignments:
            key, equals, value = assignment.partition("=")
            if not equals or key not in PARAM_TYPES:
                self.write(f"[expected KEY=VALUE with KEY one of {', '.join(PARAM_TYPES)}; got {assignment!r}]\n")
                return
            try:
                changes[key] = PARAM_TYPES[key](value)
            except ValueError:
                self.write(f"[{key} takes a {PARAM_TYPES[key].__name__}, got {value!r}]\n")
                return
        try:
            from pagoda.sampling_params import SamplingParams

            SamplingParams(**{**self.params, **changes})
        except ValueError as error:
            self.write(f"[{error}]\n")
            return
        self.params.update(changes)
        self.write("[" + " ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + "]\n")


def run_chat(args: argparse.Namespace) -> None:
    import readline  # noqa: F401  # line editing and history for input()

    if "PAGODA_LOG_LEVEL" not in os.environ:
        logging.getLogger("pagoda").setLevel(logging.WARNING)  # the engine's start-up lines would clutter the chat

    backend: LocalBackend | RemoteBackend = (RemoteBackend(args.url, args.api_key) if args.url is not None
                                             else LocalBackend(args))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    session = ChatSession(backend, args.system, {"temperature": args.temperature, "max_tokens": args.max_tokens},
                          write)
    write(f"pagoda chat with {backend.name}. /help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves.\n")
    try:
        while True:
            try:
                line = input(PROMPT)
            except KeyboardInterrupt:
                write("\n(Ctrl-D leaves)\n")
                continue
            except EOFError:
                write("\n")
                break
            if not session.handle(line):
                break
    finally:
        backend.close()
