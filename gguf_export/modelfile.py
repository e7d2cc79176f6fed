"""An Ollama Modelfile for an exported GGUF: `ollama create NAME -f Modelfile`.

Ollama formats chats with its own Go template, not the GGUF's Jinja one, so the template here writes
the same turns as gemma.chat_format.conversation: a system text at the top of the next user turn,
assistant turns as "model". The stop parameter ends an answer at <end_of_turn> (and at an invented
<start_of_turn>), as generate.py does. Decoding is greedy, as generate.py's default.
"""

from __future__ import annotations

from gemma.chat_format import END_OF_TURN, START_OF_TURN, STOP_MARKERS

TEMPLATE = (  # no {{- trimming: every character outside the actions is part of the prompt
    '{{ $system := "" }}'
    "{{ range .Messages }}"
    '{{ if eq .Role "system" }}{{ $system = printf "%s%s\\n\\n" $system .Content }}'
    '{{ else if eq .Role "user" }}' + START_OF_TURN + "user\n{{ $system }}{{ .Content }}" + END_OF_TURN
    + '\n{{ $system = "" }}'
    '{{ else if eq .Role "assistant" }}' + START_OF_TURN + "model\n{{ .Content }}" + END_OF_TURN + "\n"
    "{{ end }}"
    "{{ end }}" + START_OF_TURN + "model\n"
)


def modelfile_text(gguf_name: str) -> str:
    """The Modelfile for the GGUF file `gguf_name` in the same folder."""
    stops = "".join(f"PARAMETER stop {marker}\n" for marker in STOP_MARKERS)
    return (f"# ollama create NAME -f Modelfile   (run in this folder)\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{TEMPLATE}"""\n'
            f"{stops}"
            f"PARAMETER temperature 0\n")
