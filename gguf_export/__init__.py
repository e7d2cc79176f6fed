"""A merged model as one GGUF file (llama.cpp, Ollama, LM Studio): Gemma 2 / Gemma 3 tensors and
hyperparameters, the SentencePiece vocabulary, the chat template with <end_of_turn> as an
end-of-generation token, and an Ollama Modelfile beside it. (Command line: export.py --gguf.)"""

from .errors import GGUFExportError
from .modelfile import modelfile_text
from .tensors import OUTTYPES
from .writer import write_gguf_folder

__all__ = ["GGUFExportError", "OUTTYPES", "modelfile_text", "write_gguf_folder"]
