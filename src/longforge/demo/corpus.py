"""The demo corpus, from files every Python install has: the standard library's source."""

from __future__ import annotations

import ast
import json
import sysconfig
import zlib
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError

SKIP_PACKAGES = {"site-packages", "test", "tests", "__pycache__", "idlelib", "lib2to3", "ensurepip", "turtledemo", "pydoc_data"}
HELDOUT_EVERY = 7  # one package in seven is held out for perplexity
MIN_HELDOUT_CHARS = 12_000


def stdlib_root() -> Path:
    """The folder holding the standard library's .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise LongforgeError(f"the standard library source is not at {root}; the demo needs a Python with its .py files.")
    return root


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _packages(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in SKIP_PACKAGES
                  and not p.name.startswith(("config-", "_")) and any(p.rglob("*.py")))


def _heldout(name: str) -> bool:
    # A stable hash, so the split does not depend on which packages this Python ships.
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def _repository(pkg: Path, root: Path) -> str:
    """All .py files of a package concatenated into one document, each under a path header (ProLong's repositories)."""
    parts = []
    for f in sorted(pkg.rglob("*.py")):
        if {"test", "tests"} & set(f.relative_to(root).parts):
            continue
        text = _read(f)
        if text and text.strip():
            parts.append(f"# file: {f.relative_to(root).as_posix()}\n{text}")
    return "\n\n".join(parts)


def _docstrings(text: str) -> list[str]:
    """Module, class and function docstrings of a Python source (English prose)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                out.append(doc)
    return out


def build_corpus(out: Path) -> dict[str, Any]:
    """Write long.jsonl (package repositories), short.jsonl (modules, docstrings), heldout.jsonl; return stats."""
    root = stdlib_root()
    out.mkdir(parents=True, exist_ok=True)
    long_docs, heldout, short_docs = [], [], []
    for pkg in _packages(root):
        if _heldout(pkg.name):
            for f in sorted(pkg.rglob("*.py")):
                text = _read(f)
                if text and len(text) >= MIN_HELDOUT_CHARS:
                    heldout.append({"text": text, "path": f.relative_to(root).as_posix()})
            continue
        doc = _repository(pkg, root)
        if doc:
            long_docs.append({"text": doc, "package": pkg.name})
    for f in sorted(root.glob("*.py")):
        text = _read(f)
        if not text or not text.strip():
            continue
        if _heldout(f.stem):
            if len(text) >= MIN_HELDOUT_CHARS:
                heldout.append({"text": text, "path": f.name})
            continue
        short_docs.append({"text": text, "module": f.stem})
        short_docs.extend({"text": d, "module": f.stem, "kind": "docstring"} for d in _docstrings(text))
    if len(heldout) < 4:
        raise LongforgeError(f"only {len(heldout)} held-out files in {root}; the demo needs a fuller standard library.")
    for name, docs in (("long", long_docs), ("short", short_docs), ("heldout", heldout)):
        with (out / f"{name}.jsonl").open("w") as fh:
            for d in docs:
                fh.write(json.dumps(d) + "\n")
    stats = {
        "root": str(root),
        "sources": {
            name: {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs)}
            for name, docs in (("long", long_docs), ("short", short_docs), ("heldout", heldout))
        },
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
