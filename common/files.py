"""The toolkit's own files: JSON lines read with the file and line named in every error, files and
folders written so that a failure never leaves half of one, and one-line error texts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# Where runs and evaluations are written, and where the evaluation and the server look for adapters,
# unless told otherwise.
OUTPUTS = Path("outputs")


class FileError(ValueError):
    """A file cannot be read as what it should be; the message names it, in one line."""


def read_jsonl(path: Path, what: str) -> list[tuple[str, object]]:
    """(where, value) for each non-blank line of a JSON-lines file, where = "FILE line N".
    Raises FileError for an unreadable file, a line that is not JSON, or no `what` at all."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FileError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError:
            raise FileError(f"{path} line {number}: not valid JSON") from None
    if not records:
        raise FileError(f"{path} holds no {what}")
    return records


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON object per line, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def check_writable(path: Path, folder: bool = False) -> None:
    """Raises FileError unless `path` can be written as a file (or, with `folder`, used as a folder):
    checked before long work starts, so a bad output path costs nothing."""
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise FileError(f"{path} is a {'file' if folder else 'folder'}, not a {kind}: choose another path")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileError(f"{path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FileError(f"{path} cannot be written: no permission to write in {ancestor}")


def check_new_folder(path: Path, what: str) -> None:
    """Raises FileError unless `path` is new and can be created as a folder: nothing is overwritten."""
    if path.exists():
        raise FileError(f"{path} already exists; choose a new folder for the {what}")
    check_writable(path, folder=True)


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary path) in path's folder, fsync, then rename over path. The file gets the
    mode a plain open() would give it (mkstemp's temporary file is private to its owner)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_folder(directory: Path, write: Callable[[Path], object], what: str, replace: bool = False) -> None:
    """Call write(staging folder) beside `directory`, then rename the staging folder to `directory`: the
    folder appears whole or not at all. An existing `directory` is refused (FileError), or with `replace`
    removed only once its successor is complete. The staging folder's name starts with a dot."""
    if directory.exists() and not replace:
        raise FileError(f"{directory} already exists; choose a new folder for the {what}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    os.chmod(staging, 0o777 & ~_umask())  # as mkdir would make it (mkdtemp's is private to its owner)
    try:
        write(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
