"""Writing files: atomically, to paths checked before any work, several files as one change.

A reader (another process, a crashed run resumed later) sees either the old file or the
complete new one, never half of it: :func:`atomic_write` puts the content in a temporary file
in the same folder, which then replaces the target in one ``os.replace`` (atomic on POSIX and
Windows). It is the one way the package writes a file.

A saved model or adapter is several files (weights and their configuration) that only make
sense together. :func:`write_files_atomically` replaces them as one change, so that an
interrupted save leaves either every old file or every new one, never new weights with an
old configuration.

A run that trains for minutes and then cannot write its result has lost those minutes, so
every command checks where it will write first: :func:`check_output_file` for one file
(a checkpoint, a results file), :func:`check_output_dir` for a folder.

Reading is checked too: :func:`read_tensors` compares a safetensors file's keys and shapes
with what the caller expects before reading (so a hostile header cannot make it allocate),
then refuses non-float or non-finite values.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)``, then move the temporary file onto ``path``.

    The folder is created if needed; the file gets mode 0o644. If ``write`` raises, the
    temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def check_output_dir(path: str | os.PathLike, argument: str = "out") -> Path:
    """Create folder ``path`` if needed and check it is writable; returns it as a ``Path``.

    Raises ``ValueError`` naming ``argument`` when ``path`` is an existing file, cannot be
    created, or is not writable.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{argument} must be a folder, but {str(directory)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"{argument}: cannot create folder {str(directory)!r} ({error.strerror})"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}: folder {str(directory)!r} is not writable")
    return directory


def check_output_file(
    path: str | os.PathLike, argument: str = "path", overwrite: bool = True
) -> Path:
    """Check that file ``path`` can be written (its folder is created); returns it as a ``Path``.

    Raises ``ValueError`` naming ``argument`` when ``path`` is a folder, its folder cannot be
    created or written, or (with ``overwrite=False``) the file already exists.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{argument} must name a file, but {str(path)!r} is a folder")
    if path.exists() and not overwrite:
        raise ValueError(
            f"{argument}: {str(path)!r} exists; pass --force (overwrite=True) to replace it"
        )
    check_output_dir(path.parent, argument)
    return path


JOURNAL_NAME = ".pedapeft-commit.json"


def write_files_atomically(writes: dict[Path, Callable[[str], object]]) -> list[Path]:
    """Write several files of one folder as one atomic change: all old ones, or all new ones.

    Each ``write(temporary_path)`` fills a temporary file in the target folder. Only when every
    one has succeeded is a journal written (itself atomically) that lists the renames
    temporary -> target; then the renames are done and the journal is removed. A crash before
    the journal exists leaves every old file untouched; a crash after it leaves a journal that
    :func:`finish_interrupted_write` (called by every loader) completes, so a reader never sees
    new files mixed with old ones. Returns the target paths.
    """
    targets = [Path(path) for path in writes]
    folders = {path.parent.resolve() for path in targets}
    if len(folders) != 1:
        raise ValueError(f"writes must all go into one folder, got {sorted(map(str, folders))}")
    folder = check_output_dir(targets[0].parent, "path")
    finish_interrupted_write(folder)
    temporaries: list[str] = []
    try:
        for path, write in zip(targets, writes.values(), strict=True):
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.",
                                                 suffix=".tmp")
            os.close(handle)
            temporaries.append(temporary)
            write(temporary)
            os.chmod(temporary, 0o644)
        renames = [[Path(t).name, p.name] for t, p in zip(temporaries, targets, strict=True)]
        journal = folder / JOURNAL_NAME
        atomic_write_text(journal, json.dumps(renames))
    except BaseException:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise
    finish_interrupted_write(folder)
    return targets


def finish_interrupted_write(folder: str | os.PathLike) -> None:
    """Complete the renames of a :func:`write_files_atomically` that was interrupted, if any."""
    journal = Path(folder) / JOURNAL_NAME
    if not journal.exists():
        return
    try:
        renames = json.loads(journal.read_text())
        for temporary, target in renames:
            if (Path(folder) / temporary).exists():
                os.replace(Path(folder) / temporary, Path(folder) / target)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"{str(journal)!r}: an interrupted save could not be completed ({error})"
        ) from None
    journal.unlink()


def read_tensors(file: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
                 ) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``file``, checked against ``expected`` before any is read.

    ``expected`` maps each key to (shape, dtype or None for "any float"). The header's keys and
    shapes are compared first (nothing is allocated for a file that claims other shapes); then
    the tensors are read and every float one must be finite. Raises ``ValueError`` naming the
    file and the key.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for corrupt headers
        raise ValueError(f"{file}: truncated or not a safetensors file ({error})") from None
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{file}: keys do not match the model; missing keys: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; unexpected keys: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}"
        )
    wrong = [f"{key}: file {shapes[key]} vs model {shape}"
             for key, (shape, _) in expected.items() if shapes[key] != tuple(shape)]
    if wrong:
        raise ValueError(f"{file}: tensors of the wrong shape: " + "; ".join(wrong[:8]))
    try:
        tensors = load_file(str(file))
    except Exception as error:
        raise ValueError(f"{file}: truncated or not a safetensors file ({error})") from None
    for key, (_, dtype) in expected.items():
        tensor = tensors[key]
        if dtype is None and not tensor.is_floating_point():
            raise ValueError(f"{file}: {key} must be a float tensor, got {tensor.dtype}")
        if dtype is not None and tensor.dtype != dtype:
            raise ValueError(f"{file}: {key} must be {dtype}, got {tensor.dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{file}: {key} holds NaN or inf")
    return tensors
