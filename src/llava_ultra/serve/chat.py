"""Terminal chat with a checkpoint: multi-turn, streaming, images from files.

Reads lines from any text stream (stdin by default, so it can be driven by a pipe) and writes the
answers as they stream. Commands: `/image PATH` attaches an image to the next question, `/reset`
starts a new conversation, `/exit` (or end of input) quits. Images of earlier turns stay in the
conversation (the engine's selector chooses among all of them); after each answer the chosen frame
and its score are printed. A refused request (an unreadable image, too many images, a prompt too
long) prints the server-side message and the chat goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..errors import LlavaUltraError
from .engine import ChatResult, Engine, Message, SamplingParams, SelectionInfo
from .images import load_image_path

HELP = "commands: /image PATH (attach to the next question), /reset (new conversation), /exit"


def describe_selection(selection: SelectionInfo | None) -> str:
    """'[frame 2 of 3 chosen, score 0.412]' (1-based for people), '' for text-only answers."""
    if selection is None:
        return ""
    frames = ", ".join(str(i + 1) for i in selection.chosen)
    scores = ""
    if selection.scores is not None:
        scores = ", score " + ", ".join(f"{selection.scores[i]:.3f}" for i in selection.chosen)
    return f"[frame {frames} of {selection.num_images} chosen{scores}]"


def run_chat(
    engine: Engine,
    images: Sequence[str | Path] = (),
    params: SamplingParams | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    prompt: str = "",
) -> int:
    """Chat until /exit or end of input; returns the number of answered questions.

    `images` are attached to the first question. `prompt` is printed before each read (e.g. '> '
    when a person is typing; empty when input is piped)."""
    import sys

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    pending = [load_image_path(p, engine.limits, f"--image {p}") for p in images]
    history: list[Message] = []
    answered = 0
    say(f"llava-ultra chat - {HELP}")
    if pending:
        say(f"[{len(pending)} image(s) attached to the next question]")
    while True:
        if prompt:
            say(prompt, end="")
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history, pending = [], []
                say("[new conversation]")
            elif command == "/image" and arg.strip():
                path = arg.strip()
                try:
                    pending.append(load_image_path(path, engine.limits, f"image {path}"))
                    say(f"[image {path} attached; {len(pending)} waiting for the next question]")
                except LlavaUltraError as exc:
                    say(f"error: {exc}")
            else:
                say(f"error: unknown command {line!r}; {HELP}")
            continue
        question = Message("user", line, pending)
        result = None
        try:
            for event in engine.stream([*history, question], params):
                if isinstance(event, ChatResult):
                    result = event
                else:
                    say(event, end="")
        except LlavaUltraError as exc:
            say(f"error: {exc}")
            continue
        say()
        note = describe_selection(result.selection)
        if note:
            say(note)
        history += [question, Message("assistant", result.text)]
        pending = []
        answered += 1
    return answered
