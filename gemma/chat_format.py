"""The Gemma chat format: the turn markers, the prompt a user turn makes, and the code in an answer.

    <start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>

Training (data/dataset.py), generation and evaluation all speak it through this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

END_OF_TURN = "<end_of_turn>"
START_OF_TURN = "<start_of_turn>"
TURN_MARKERS = (START_OF_TURN, END_OF_TURN)
# Besides EOS, these end an answer: the end of its turn, or the start of a turn the model invents.
STOP_MARKERS = (END_OF_TURN, START_OF_TURN)


def user_turn(instruction: str, input: str = "") -> str:
    """The prompt up to where the model answers; also the generation prompt (the tokenizer adds BOS)."""
    request = f"{instruction}\n{input}" if input else instruction
    return f"{START_OF_TURN}user\n{request}{END_OF_TURN}\n{START_OF_TURN}model\n"


SYSTEM_SEPARATOR = "\n\n"  # between a system text and the user's, as in Gemma's chat template


def conversation(messages: Sequence[tuple[str, str]]) -> str:
    """A whole chat as (role, text) pairs -> the prompt up to where the model answers next.

    Roles are "user" and "assistant" (the model's own earlier answers); Gemma has no system turn, so a
    "system" (or "developer") text goes at the top of the next user turn, as Gemma's own chat template
    puts it. A single user message gives exactly `user_turn` (what training used).
    """
    turns, pending_system = [], []
    for role, text in messages:
        if role in ("system", "developer"):
            pending_system.append(text)
        elif role == "user":
            turns.append(f"{START_OF_TURN}user\n{SYSTEM_SEPARATOR.join(pending_system + [text])}{END_OF_TURN}\n")
            pending_system = []
        elif role == "assistant":
            turns.append(f"{START_OF_TURN}model\n{text}{END_OF_TURN}\n")
        else:
            raise ValueError(f"unknown chat role {role!r}: use system, user or assistant")
    if not messages or messages[-1][0] != "user":
        raise ValueError("a chat must end with a user message")
    return "".join(turns) + f"{START_OF_TURN}model\n"


# `conversation` as a Jinja chat template, for runtimes that format chats themselves (a merged model's
# tokenizer, a GGUF file): BOS, then the same turns. Unlike Gemma's own template it does not strip the
# texts, because training did not.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set pending = namespace(system=[]) %}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{% set pending.system = pending.system + [message['content']] %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '" + START_OF_TURN + "user\\n' + (pending.system + [message['content']]) | join('\\n\\n') + '"
    + END_OF_TURN + "\\n' }}{% set pending.system = [] %}"
    "{% else %}{{ '" + START_OF_TURN + "model\\n' + message['content'] + '" + END_OF_TURN + "\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + START_OF_TURN + "model\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Code extraction


FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
PYTHON_FENCES = {"", "python", "python3", "py"}
# An invented next turn: Gemma's marker, or the bare role line left when markers are stripped.
STRAY_TURN = re.compile(rf"{re.escape(START_OF_TURN)}|{re.escape(END_OF_TURN)}|<eos>|^(?:user|model)[ \t]*$",
                        re.MULTILINE)
PYTHON_KEYWORDS = {
    "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif", "else",
    "except", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal", "not",
    "or", "pass", "raise", "return", "try", "while", "with", "yield", "print",
}
# An unindented line of English: "Here is the code:", "This function uses recursion.", "Output:".
SENTENCE = re.compile(r"^[A-Za-z][A-Za-z']*[,:!.]?[ \t]+[A-Za-z]|^[A-Z][\w' ]*:[ \t]*$|^(?:[-*][ \t]|\d+\.[ \t])")


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The Python code in a model's answer (new tokens only), or "" when there is none.

    `entry_point`, when known, picks the fenced block that defines that function.
    """
    answer = STRAY_TURN.split(response, maxsplit=1)[0]
    blocks = FENCED_BLOCK.findall(answer)
    if blocks:
        return _choose_block(blocks, entry_point).strip("\n").rstrip()
    return _without_prose(answer)


def definition_of(name: str, top_level: bool = False) -> re.Pattern[str]:
    """Matches a line that defines the function `name` (at column 0 only, when `top_level`)."""
    indent = "" if top_level else r"\s*"
    return re.compile(rf"^{indent}(?:async\s+)?def\s+{re.escape(name)}\s*\(", re.MULTILINE)


def _choose_block(blocks: list[tuple[str, str]], entry_point: str | None) -> str:
    python_blocks = [code for language, code in blocks if language.lower() in PYTHON_FENCES] or [
        code for _, code in blocks
    ]
    if entry_point:
        defining = definition_of(entry_point)
        for code in python_blocks:
            if defining.search(code):
                return code
    return python_blocks[0]


def _without_prose(answer: str) -> str:
    """Drop English before the code, and everything from the first English line after it."""
    lines = answer.splitlines()
    start = 0
    while start < len(lines) and (not lines[start].strip() or _is_prose(lines[start])):
        start += 1
    end = start
    while end < len(lines) and not _is_prose(lines[end]):
        end += 1
    return "\n".join(lines[start:end]).strip("\n").rstrip()


def _is_prose(line: str) -> bool:
    if not line or line[0].isspace() or not SENTENCE.match(line):
        return False
    first_word = re.match(r"[A-Za-z_]\w*", line)
    return not (first_word and first_word.group() in PYTHON_KEYWORDS)
