"""A corpus from what a machine holds, for `longforge lab --base` and `longforge demo --model`: installed Python
packages' sources as repository documents (code) and their documentation, licences and docstrings (prose).

    python benchmarks/real_corpus.py --out corpus/ [--tokenizer smollm2-135m] [--site-packages DIR ...]

Writes under --out only (it reads the package folders and never writes there):
  code.jsonl, prose.jsonl                  training documents, one per package: {"text", "package"}
  heldout_code.jsonl, heldout_prose.jsonl  the held-out packages (one in --heldout-every by a stable hash), for perplexity
  corpus.json                              packages, documents, characters and tokens per domain (tokens with
                                           --tokenizer, else characters only), held-out names, the roots read

Each code document is a package's .py files concatenated under `# file: <path>` headers (ProLong's repositories);
each prose document is the package's .rst/.md/.txt files, licences and metadata, then its docstrings. The same
packages are held out of both domains. Deterministic: files in sorted order, symbolic links not followed.
"""

from __future__ import annotations

import argparse
import ast
import json
import site
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Any

PROSE_SUFFIXES = {".rst", ".md", ".txt"}
LICENCE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
SKIP_DIRS = {"__pycache__", ".git", "node_modules"}
MIN_DOCSTRING = 80


def default_roots() -> list[Path]:
    """This Python's site-packages folders (purelib, platlib, site's list), existing ones, without repeats."""
    names = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"), *getattr(site, "getsitepackages", lambda: [])()]
    out: list[Path] = []
    for n in names:
        if n and Path(n).is_dir() and Path(n).resolve() not in [p.resolve() for p in out]:
            out.append(Path(n))
    return out


def read_text(path: Path, limit: int) -> str | None:
    """A file's UTF-8 text (None when unreadable, binary or larger than `limit` bytes)."""
    try:
        if path.is_symlink() or path.stat().st_size > limit:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if "\x00" not in text else None


def walk(folder: Path) -> list[Path]:
    """Every regular file under a folder, sorted, not following symbolic links, skipping caches."""
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or p.name in SKIP_DIRS:
            continue
        if p.is_dir():
            out += walk(p)
        elif p.is_file():
            out.append(p)
    return out


def packages(roots: list[Path]) -> dict[str, dict[str, list[Path]]]:
    """Per top-level package name: its source folder or module, and its .dist-info/.egg-info folders."""
    found: dict[str, dict[str, list[Path]]] = {}
    for root in roots:
        for p in sorted(root.iterdir()):
            if p.is_symlink() or p.name in SKIP_DIRS or p.name.startswith((".", "_")):
                continue
            if p.is_dir() and p.suffix in (".dist-info", ".egg-info"):
                name = p.name.split("-")[0].lower().replace("_", "-")
                found.setdefault(name, {"src": [], "meta": []})["meta"].append(p)
            elif (p.is_dir() and any(p.glob("*.py"))) or p.suffix == ".py":
                name = p.stem.lower().replace("_", "-")
                found.setdefault(name, {"src": [], "meta": []})["src"].append(p)
    return {k: v for k, v in sorted(found.items()) if v["src"]}


def docstrings(text: str) -> list[str]:
    """Module, class and function docstrings of a Python source longer than MIN_DOCSTRING characters."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > MIN_DOCSTRING:
                out.append(doc)
    return out


def package_documents(name: str, where: dict[str, list[Path]], max_chars: int, file_limit: int) -> tuple[str, str]:
    """(code document, prose document) of one package, each cut at a file boundary before `max_chars`."""
    code: list[str] = []
    prose: list[str] = []
    docs: list[str] = []
    size_code = size_prose = 0
    for src in where["src"]:
        base = src.parent
        for f in ([src] if src.is_file() else walk(src)):
            rel = f.relative_to(base).as_posix()
            if f.suffix == ".py":
                text = read_text(f, file_limit)
                if text and text.strip() and size_code + len(text) <= max_chars:
                    code.append(f"# file: {rel}\n{text}")
                    size_code += len(text)
                    docs += docstrings(text)
            elif f.suffix in PROSE_SUFFIXES or f.name.upper().startswith(LICENCE_NAMES):
                text = read_text(f, file_limit)
                if text and text.strip() and size_prose + len(text) <= max_chars:
                    prose.append(f"# {rel}\n{text}")
                    size_prose += len(text)
    for meta in where["meta"]:
        for f in walk(meta):
            if f.name in ("METADATA", "PKG-INFO", "DESCRIPTION.rst") or f.name.upper().startswith(LICENCE_NAMES) \
                    or f.suffix in PROSE_SUFFIXES:
                text = read_text(f, file_limit)
                if text and text.strip() and size_prose + len(text) <= max_chars:
                    prose.append(f"# {meta.name}/{f.relative_to(meta).as_posix()}\n{text}")
                    size_prose += len(text)
    for d in docs:
        if size_prose + len(d) > max_chars:
            break
        prose.append(d)
        size_prose += len(d)
    return "\n\n".join(code), "\n\n".join(prose)


def held_out(name: str, every: int) -> bool:
    """A stable choice of held-out packages (the same on every machine that has them)."""
    return zlib.crc32(name.encode()) % every == 0


def build(roots: list[Path], out: Path, tokenizer: Any = None, heldout_every: int = 7, max_chars: int = 8_000_000,
          file_limit: int = 2_000_000, min_chars: int = 200) -> dict[str, Any]:
    """Write the four JSONL files and corpus.json under `out`; returns the manifest."""
    for r in roots:
        if out.resolve().is_relative_to(r.resolve()):
            raise SystemExit(f"error: --out {out} lies inside {r}, which this script reads; write the corpus elsewhere.")
    out.mkdir(parents=True, exist_ok=True)
    files = {k: (out / f"{k}.jsonl").open("w") for k in ("code", "prose", "heldout_code", "heldout_prose")}
    stats: dict[str, dict[str, int]] = {k: {"documents": 0, "characters": 0, "tokens": 0} for k in files}
    held: list[str] = []
    pending: list[tuple[str, str]] = []  # (file key, text) whose tokens are not counted yet

    def count() -> None:
        # One batched call: the fast tokenizer encodes a batch on all cores (one document at a time used one core).
        if tokenizer is not None and pending:
            ids = tokenizer([t for _, t in pending], add_special_tokens=False)["input_ids"]
            for (key, _), row in zip(pending, ids):
                stats[key]["tokens"] += len(row)
        pending.clear()

    try:
        for name, where in packages(roots).items():
            code, prose = package_documents(name, where, max_chars, file_limit)
            hold = held_out(name, heldout_every)
            if hold and (len(code) >= min_chars or len(prose) >= min_chars):
                held.append(name)
            for domain, text in (("code", code), ("prose", prose)):
                if len(text) < min_chars:
                    continue
                key = f"heldout_{domain}" if hold else domain
                files[key].write(json.dumps({"text": text, "package": name}) + "\n")
                s = stats[key]
                s["documents"] += 1
                s["characters"] += len(text)
                pending.append((key, text))
                if len(pending) >= 32:
                    count()
        count()
    finally:
        for fh in files.values():
            fh.close()
    manifest = {"roots": [str(r) for r in roots], "heldout_every": heldout_every, "heldout_packages": held,
                "tokenizer": getattr(tokenizer, "name_or_path", None), "domains": stats,
                "tokens": {k: (v["tokens"] if tokenizer is not None else None) for k, v in stats.items()}}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module's docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the JSONL files and corpus.json.")
    ap.add_argument("--site-packages", type=Path, action="append", help="A folder of installed packages (repeat); "
                    "this Python's site-packages when absent.")
    ap.add_argument("--tokenizer", type=Path, help="Tokenizer (or model) folder to count tokens per domain with.")
    ap.add_argument("--heldout-every", type=int, default=7, help="Hold out one package in this many (stable hash).")
    ap.add_argument("--max-chars", type=int, default=8_000_000, help="Cap on each document's characters (whole files).")
    args = ap.parse_args(argv)
    roots = args.site_packages or default_roots()
    missing = [r for r in roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"error: --site-packages {missing[0]} is not a folder; pass a site-packages folder.")
    tok = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)  # a local folder; its files are read, no code is run
    m = build(roots, args.out, tok, args.heldout_every, args.max_chars)
    for k, v in m["domains"].items():
        print(f"{k}: {v['documents']} documents, {v['characters']:,} characters"
              + (f", {v['tokens']:,} tokens" if tok is not None else ""))
    print(f"held out: {len(m['heldout_packages'])} packages; wrote {args.out}/corpus.json", file=sys.stderr)


if __name__ == "__main__":
    main()
