"""Freeze the ``pydocs`` corpus: Python's own documentation, extracted once, stored in the package.

    python tools/freeze_pydocs.py     # writes pedaPEFT/texts/pydocs.json.xz, PSF-LICENSE.txt

This is the only place that reads the running interpreter's documentation. The package reads
the frozen file (``pedaPEFT.corpus``), so the corpus, and every number derived from it, stays
the same whatever Python runs the course. Rerunning this script with another Python version
gives another corpus; the file records the version it came from.

Two kinds of document:

* ``topic``: every entry of ``pydoc_data.topics`` (the language reference and the built-in
  types, the text behind ``help("for")``), one document per topic;
* ``module``: the docstrings of the public names of a fixed list of standard-library modules,
  one document per module, written as ``name(signature)`` followed by the indented docstring
  (what ``help(module)`` shows, without inherited members), each capped at MODULE_CAP characters.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import lzma
import os
import pkgutil
import re
import sys
import tempfile
import warnings
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "pedaPEFT" / "texts"
MODULE_CAP = 40_000
"""Characters kept of one module's document (a few modules would otherwise dominate)."""

# Pure-Python modules whose import has no side effects; packages bring their submodules.
MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd code codecs collections colorsys "
    "compileall concurrent configparser contextlib copy csv dataclasses datetime decimal difflib "
    "dis doctest email enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext "
    "glob graphlib gzip hashlib heapq hmac html http imaplib importlib inspect io ipaddress "
    "json keyword linecache locale logging lzma mailbox mimetypes modulefinder netrc numbers "
    "operator optparse pathlib pdb pickle pkgutil platform plistlib poplib pprint profile pstats "
    "queue quopri random re reprlib runpy sched secrets selectors shelve shlex shutil signal "
    "smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable "
    "sysconfig tabnanny tarfile tempfile textwrap threading timeit token tokenize tomllib trace "
    "traceback tracemalloc types typing unittest urllib uuid warnings wave weakref wsgiref xml "
    "xmlrpc zipapp zipfile zipimport zoneinfo"
).split()
SKIP = ("__main__", ".test", "idlelib", "tkinter", "turtle", "antigravity", "this")


def module_names() -> list[str]:
    """The modules to read: MODULES and, for packages, every importable submodule, sorted."""
    names = set()
    for name in MODULES:
        module = importlib.import_module(name)
        names.add(name)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, prefix=f"{name}.",
                                              onerror=lambda _name: None):
                if not any(part in info.name for part in SKIP):
                    names.add(info.name)
    return sorted(names)


def signature(obj: object) -> str:
    """The call signature, without memory addresses or this machine's paths (not reproducible)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", text).replace(sys.executable, "python")


def describe(name: str, obj: object, indent: str = "") -> list[str]:
    """``name(signature)`` and the cleaned docstring indented four spaces; [] if no docstring."""
    doc = inspect.getdoc(obj) if callable(obj) else None
    if not doc:
        return []
    head = f"class {name}{signature(obj)}" if inspect.isclass(obj) else f"{name}{signature(obj)}"
    body = "\n".join(f"{indent}    {line}".rstrip() for line in doc.splitlines())
    return [f"{indent}{head}\n{body}"]


def module_document(name: str) -> str:
    """The public docstrings defined in module ``name`` (not those it imports), as one text."""
    module = importlib.import_module(name)
    parts = [f"Module {name}\n\n{inspect.getdoc(module) or ''}".rstrip()]
    public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for attr in sorted(set(public)):
        obj = getattr(module, attr, None)
        if getattr(obj, "__module__", None) != name:
            continue
        parts += describe(attr, obj)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    parts += describe(f"{attr}.{member_name}", member, indent="    ")
    return "\n\n".join(parts)[:MODULE_CAP]


def documents() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    docs = [{"id": f"topic:{key}", "kind": "topic", "text": topics[key].strip() + "\n"}
            for key in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in module_names():
            try:
                text = module_document(name)
            except Exception:  # a module that cannot be imported here is skipped
                continue
            if len(text) > 200:
                docs.append({"id": f"module:{name}", "kind": "module", "text": text + "\n"})
    return docs


def write_atomic(path: Path, payload: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as f:
        f.write(payload)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    docs = documents()
    version = ".".join(map(str, sys.version_info[:3]))
    corpus = {"python_version": version, "documents": docs}
    raw = json.dumps(corpus, ensure_ascii=False, sort_keys=True).encode()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(OUT_DIR / "pydocs.json.xz", lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    licence = Path(inspect.getfile(os)).parent / "LICENSE.txt"
    notice = (
        f"The pydocs corpus (pydocs.json.xz) is text from the documentation of Python {version}:\n"
        "the pydoc topics (pydoc_data.topics) and the docstrings of standard-library modules.\n"
        "Copyright (c) 2001 Python Software Foundation; All Rights Reserved.\n"
        "It is distributed under the PSF License Agreement, reproduced below.\n\n"
    )
    write_atomic(OUT_DIR / "PSF-LICENSE.txt", (notice + licence.read_text()).encode())
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {chars:,} characters, sha256 "
          f"{hashlib.sha256(raw).hexdigest()[:16]}, written to {OUT_DIR}")


if __name__ == "__main__":
    main()
