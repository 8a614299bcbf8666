"""Compatibility check: do the checkpoints longforge writes load alike in transformers 4.x and 5.x?

Usage: python benchmarks/compat_transformers.py --venvs DIR [--versions 4.57.* 5.17.*] [--json OUT]

Makes one venv per transformers version under DIR (pip install transformers==VERSION and this environment's torch
version, from the configured index; a venv already holding that version is reused), writes tiny longforge checkpoints
with this environment's longforge and transformers (a 64-token Llama taken to 256 tokens by every RoPE method that
changes frequencies: the rope stage, a two-step training export of it, and its merge with the base), then loads each
one in this environment and in every venv (a subprocess running this file with --probe) and compares what the rotary
embedding module holds (rope_type, inv_freq before and after a forward, attention scaling), the logits of a fixed
200-token input (past the base window, inside the new one) and the tokenizer (class, ids, model_max_length).
Every reading must also match longforge's own formula for the checkpoint's rope_parameters.
Control rows: the same checkpoints with the 4.x keys removed must differ in 4.x (the check sees the bug it guards).
Re-saved rows: the YaRN rope output loaded and saved again by each version (as a user would); only reported, except
that every 5.x must still read its rotary embedding and logits right.
Prints a table and exits 1 on any unexpected result.

The probe imports only the standard library, torch and transformers, so it runs in a venv without longforge.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 200  # past the base window (64), inside the new one (TARGET)
ROWS = (0, 31, 63, 64, 127, 160, LENGTH - 1)  # logits compared at these positions
TEXT = "<|a|> alpha beta 123 gamma. remember the pass key 4521 and the blue river <|b|>"
INV_RTOL = 1e-5  # float32 in transformers vs float64 in longforge's formula
LOGIT_ATOL = 1e-4
TARGET = 256  # the new window, from the base's 64
METHODS = {  # name -> (PositionSpec fields beyond beta_fast=4, beta_slow=1; the rope_type transformers must build)
    "yarn": ({"method": "yarn"}, "yarn"),
    "yarn-mscale": ({"method": "yarn", "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0}, "yarn"),
    "pi": ({"method": "pi"}, "linear"),
    "dynamic": ({"method": "dynamic"}, "dynamic"),
    "llama3": ({"method": "llama3"}, "llama3"),
    "ntk": ({"method": "ntk"}, "default"),
    "theta": ({"method": "theta", "theta": 1e6}, "default"),
}


# ----- the probe: runs in every environment, imports only torch and transformers ---------------------------------

def probe_one(path: Path) -> dict[str, Any]:
    """What transformers makes of one checkpoint folder: rotary module, logits, tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict[str, Any] = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rot = model.model.rotary_emb
        out.update(rope_type=str(rot.rope_type), inv_freq=rot.inv_freq.double().tolist(),
                   attention_scaling=float(rot.attention_scaling))
        ids = torch.randint(1, model.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits[0]
        out.update(inv_freq_after=rot.inv_freq.double().tolist(), logits=logits[list(ROWS)].double().tolist())
    except Exception as e:  # noqa: BLE001 - a load failure is a finding, reported in the table
        out["model_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        out.update(tokenizer_class=type(tok).__name__, tokens=tok(TEXT)["input_ids"], model_max_length=int(tok.model_max_length),
                   special=list(tok.all_special_tokens))
    except Exception as e:  # noqa: BLE001
        out["tokenizer_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return out


def resave(src: str, dst: str) -> None:
    """Load a checkpoint and its tokenizer with this environment's transformers and save them again (as a user would)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(dst)
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError):  # a tokenizer this version cannot load is carried over as it is (and probed as such)
        for f in Path(src).glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, Path(dst) / f.name)


def probe(folders: list[str], out: str) -> None:
    """Probe every folder and write {"transformers": version, "results": {folder: reading}} to `out`."""
    import transformers

    results = {f: probe_one(Path(f)) for f in folders}
    Path(out).write_text(json.dumps({"transformers": transformers.__version__, "results": results}))


# ----- environments -----------------------------------------------------------------------------------------------

def venv_python(venvs: Path, version: str) -> Path:
    """A venv under `venvs` with transformers==version and this environment's torch (made or reused)."""
    import torch

    folder = venvs / ("tf-" + re.sub(r"[^0-9A-Za-z.]+", "", version.replace("*", "x")))
    py = folder / "bin" / "python"
    if py.is_file():
        have = subprocess.run([str(py), "-c", "import transformers, torch; print(transformers.__version__)"],
                              capture_output=True, text=True)
        prefix = version.rstrip("*").rstrip(".")
        if have.returncode == 0 and (have.stdout.strip() == prefix or have.stdout.strip().startswith(prefix + ".")):
            return py
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(folder)], check=True)
    torch_version = torch.__version__.split("+")[0]
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"transformers=={version}", f"torch=={torch_version}"], check=True)
    return py


def run_here(python: Path | str, *args: str) -> None:
    """Run this file in another interpreter (which needs only torch and transformers) with the given arguments."""
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                               "TOKENIZERS_PARALLELISM": "false", "HOME": str(Path.home())})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed in {python}:\n{proc.stderr[-3000:]}")


def run_probe(python: Path | str, folders: list[Path], out: Path) -> dict[str, Any]:
    """Run the probe in another interpreter; its readings."""
    run_here(python, "--probe", *map(str, folders), "--probe-out", str(out))
    return json.loads(out.read_text())


# ----- the checkpoints ----------------------------------------------------------------------------------------------

class RandomSource:
    """Deterministic random one-document micro-batches, enough for a two-step training export."""

    def __init__(self, vocab: int, seq: int):
        self.vocab, self.seq = vocab, seq

    def batch(self, step: int, micro: int) -> Any:
        import torch
        from longforge.train.batches import Batch

        ids = torch.randint(1, self.vocab, (1, self.seq), generator=torch.Generator().manual_seed(10 * step + micro))
        return Batch(ids, torch.zeros_like(ids), torch.arange(self.seq)[None])


def base_checkpoint(work: Path) -> Path:
    """A tiny Llama (window 64, head dim 16) and a 300-token tokenizer (model_max_length 2048, two extra special tokens)."""
    import random

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longforge.demo.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud green blue pass key remember the and of to".split()
    texts = [" ".join(str(rng.randint(0, 9999)) if rng.random() < 0.1 else rng.choice(words) for _ in range(200))
             for _ in range(40)]
    base = work / "base"
    train_tokenizer(texts, 300, base, model_max_length=2048)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]})
    tok.save_pretrained(base)  # as transformers 5 saves them: a list under extra_special_tokens
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    return base


def write_checkpoints(work: Path, pythons: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Every checkpoint to check: name -> {path, written_by, method, kind, expect (formula readings)}.

    kind: written (by longforge: every version must read it alike), control (the 4.x keys removed: 4.x must read it
    differently), resaved (longforge's rope output loaded and saved again by a transformers version: reported).
    """
    import torch

    from longforge.config import PositionSpec, StageSpec
    from longforge.hf import load_model
    from longforge.merge import merge
    from longforge.positions.rope import apply_rope, inv_freq, rope_info
    from longforge.train.loop import train_model

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base = base_checkpoint(work)
    out: dict[str, dict[str, Any]] = {}
    for name, (fields, _) in METHODS.items():
        spec = PositionSpec(beta_fast=4, beta_slow=1, **fields)
        rope = work / f"rope-{name}"
        apply_rope(base, rope, spec, TARGET)
        train = work / f"train-{name}"
        model = load_model(rope)
        final = train_model(model, RandomSource(302, 96), StageSpec(steps=2, lr=1e-3, save_every=2), train,
                            torch.device("cpu"), tokenizer_from=rope).final
        merged = work / f"merge-{name}"
        merge([base, final], [0.5, 0.5], merged)
        for stage, path in (("rope", rope), ("train export", final), ("merge", merged)):
            out[f"{stage.split()[0]}-{name}"] = {"path": path, "written_by": stage, "method": name, "kind": "written"}
    for label, py in pythons.items():  # a user loads the rope output and saves it again with their transformers
        dst = work / f"resaved-{re.sub(r'[^0-9A-Za-z.]+', '', label)}"
        run_here(py, "--resave", str(work / "rope-yarn"), str(dst))
        out[dst.name] = {"path": dst, "written_by": f"rope-yarn re-saved by transformers {label}", "method": "yarn",
                         "kind": "resaved"}
    for name in ("yarn", "ntk"):  # the bug the portable keys fix: 4.x must read these differently
        ctrl = work / f"control-{name}"
        shutil.copytree(work / f"rope-{name}", ctrl)
        cfg = json.loads((ctrl / "config.json").read_text())
        for key in ("rope_scaling", "rope_theta"):
            cfg.pop(key, None)
        (ctrl / "config.json").write_text(json.dumps(cfg, indent=2))
        tok = json.loads((ctrl / "tokenizer_config.json").read_text())
        tok["tokenizer_class"] = "TokenizersBackend"
        (ctrl / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
        out[f"control-{name}"] = {"path": ctrl, "written_by": "rope, 4.x keys removed", "method": name, "kind": "control"}
    for row in out.values():  # longforge's formula for the rope_parameters each checkpoint carries
        cfg = json.loads((row["path"] / "config.json").read_text())
        params, max_pos = cfg["rope_parameters"], cfg["max_position_embeddings"]
        info = rope_info(SimpleNamespace(**cfg))
        at_init, att = inv_freq(params, info.rotary_dim, max_pos)
        after, _ = inv_freq(params, info.rotary_dim, max_pos, seq_len=LENGTH)
        # The rope_type and window are the method's, not read back from the config: a merge that kept the base's
        # config, or a window left at 64, would otherwise pass.
        row["expect"] = {"rope_type": METHODS[row["method"]][1], "inv_freq": at_init.tolist(), "attention_scaling": att,
                         "inv_freq_after": after.tolist(), "model_max_length": TARGET}
    return out


# ----- comparing ----------------------------------------------------------------------------------------------------

ROPE_CHECKS = ("model:", "rope_type", "inv_freq", "attention factor", "logits")  # the problems a 5.x reader must not have


def major(version: str) -> int:
    """The major version number of a transformers version string."""
    return int(version.split(".")[0])


def max_rel(a: list[float], b: list[float]) -> float:
    """Largest relative difference of two frequency lists (inf when their lengths differ)."""
    if len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def max_abs(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest absolute difference of two logit tables."""
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def differences(got: dict[str, Any], ref: dict[str, Any], expect: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
    """What in one environment's reading differs from the formula and from the reference environment's logits/tokens."""
    if "model_error" in got:
        return [f"model: {got['model_error']}"], {}
    bad = []
    nums = {"inv": max(max_rel(got["inv_freq"], expect["inv_freq"]), max_rel(got["inv_freq_after"], expect["inv_freq_after"])),
            "att": abs(got["attention_scaling"] - expect["attention_scaling"]),
            "logits": max_abs(got["logits"], ref["logits"]) if "logits" in ref else float("inf")}
    if got["rope_type"] != expect["rope_type"]:
        bad.append(f"rope_type {got['rope_type']}")
    if nums["inv"] > INV_RTOL:
        bad.append(f"inv_freq off by {nums['inv']:.2g}")
    if nums["att"] > 1e-6:
        bad.append(f"attention factor {got['attention_scaling']:.4f}")
    if nums["logits"] > LOGIT_ATOL:
        bad.append(f"logits off by {nums['logits']:.2g}")
    if "tokenizer_error" in got:
        bad.append(f"tokenizer fails ({got['tokenizer_error'].split(': ', 1)[-1][:48]})")
    else:
        if got["tokens"] != ref.get("tokens"):
            bad.append("token ids differ")
        if got["special"] != ref.get("special"):
            bad.append(f"special tokens {got['special']}")
        if got["model_max_length"] != expect["model_max_length"]:
            bad.append(f"model_max_length {got['model_max_length']}")
    return bad, nums


def report(rows: dict[str, dict[str, Any]], readings: dict[str, dict[str, Any]]) -> tuple[list[str], bool]:
    """The markdown table (one row per checkpoint) and whether every row is as expected."""
    envs = list(readings)
    head = ["checkpoint", "written by"] + [f"rope_type / att. factor ({e})" for e in envs] + \
           ["max rel. dinv_freq", "max dlogits", "model_max_length", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok_all = True
    ref_env = envs[0]
    for name, row in rows.items():
        key = str(row["path"])
        ref = readings[ref_env]["results"][key]
        cells, inv, logit, problems, failed = [], 0.0, 0.0, [], set()
        for env in envs:
            got = readings[env]["results"][key]
            bad, nums = differences(got, ref, row["expect"])
            problems += [f"{env}: {b}" for b in bad]
            failed |= {env} if bad else set()
            inv, logit = max(inv, nums.get("inv", 0.0)), max(logit, nums.get("logits", 0.0))
            cells.append(f"{got.get('rope_type', 'error')} / {got['attention_scaling']:.4f}" if "attention_scaling" in got else "error")
        mml = {readings[e]["results"][key].get("model_max_length") for e in envs}
        if row["kind"] == "control":
            ok = failed == {e for e in envs if major(e) < 5}  # every 4.x reads it wrong, every 5.x right
            verdict = ("4.x differs, as expected: " if ok else "CONTROL NOT DETECTED: ") + "; ".join(
                p.split(": ", 1)[1] for p in problems)
        elif row["kind"] == "resaved":
            # Not longforge's output, so only reported, except that every 5.x must still read the rotary embedding
            # and the logits right (transformers 5 writes back rope_parameters alone).
            hard = [p for p in problems if major(p.split(":")[0]) >= 5 and p.split(": ", 1)[1].startswith(ROPE_CHECKS)]
            ok = not hard
            verdict = ("same" if not problems else "reported: " + "; ".join(problems)) if ok else "MISMATCH: " + "; ".join(hard)
        else:
            ok = not problems
            verdict = "same" if ok else "MISMATCH: " + "; ".join(problems)
        ok_all &= ok
        lines.append(f"| {name} | {row['written_by']} | " + " | ".join(cells) +
                     f" | {inv:.1e} | {logit:.1e} | {', '.join(str(m) for m in sorted(mml, key=str))} | {verdict} |")
    return lines, ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venvs", type=Path, help="folder for the venvs (one per version) and the checkpoints")
    ap.add_argument("--versions", nargs="+", default=["4.57.*", "5.17.*"], help="transformers versions to compare against")
    ap.add_argument("--json", type=Path, help="write every reading and the table here")
    ap.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", help=argparse.SUPPRESS)
    ap.add_argument("--resave", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.probe_out)
        return
    if args.resave:
        resave(*args.resave)
        return
    if args.venvs is None:
        ap.error("--venvs DIR is required")
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("LONGFORGE_QUIET", "1")
    import torch
    import transformers

    venvs = args.venvs.resolve()
    venvs.mkdir(parents=True, exist_ok=True)
    pythons = {transformers.__version__: Path(sys.executable)}
    for v in args.versions:
        py = venv_python(venvs, v)
        have = subprocess.run([str(py), "-c", "import transformers; print(transformers.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
        pythons[have] = py
    rows = write_checkpoints(venvs / "checkpoints", pythons)
    folders = [row["path"] for row in rows.values()]
    readings = {}
    for label, py in pythons.items():
        got = run_probe(py, folders, venvs / f"probe-{re.sub(r'[^0-9A-Za-z.]+', '', label)}.json")
        readings[got["transformers"]] = got
    lines, ok = report(rows, readings)
    header = [f"date: {dt.date.today()}", f"machine: {platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
              f"transformers: {', '.join(readings)} (first = reference for logits and token ids)",
              f"checks: rope_type, inv_freq at load and after a {LENGTH}-token forward (rel. tol {INV_RTOL:g}) and attention "
              f"factor against longforge's formula; logits at positions {list(ROWS)} (abs. tol {LOGIT_ATOL:g}) and "
              "token ids against the reference; model_max_length = the checkpoint's window"]
    print("\n".join(header + [""] + lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "table": lines, "ok": ok,
                                         "readings": {e: {"transformers": r["transformers"], "results": {
                                             k: {f: v for f, v in res.items() if f != "logits"} for k, res in r["results"].items()}}
                                             for e, r in readings.items()}}, indent=1))
    print("\nevery checkpoint longforge wrote loads alike in every version" if ok else "\nMISMATCH: see the table")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
