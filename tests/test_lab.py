"""The lab end to end at CI size, and its claim verdicts on hand-made numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longforge.errors import LongforgeError
from longforge.lab.arms import PROFILES, arms, schedule, theta_for, train_length
from longforge.lab.report import Claim, aggregate, verdict


def test_every_arm_trains_on_the_same_tokens_per_step() -> None:
    p = PROFILES["cuda"]
    for arm in arms(p):
        steps, batch = schedule(arm, p)
        total = steps * batch * train_length(arm, p)
        assert abs(total - p.ext_steps * p.tokens_per_step) <= 0.01 * p.ext_steps * p.tokens_per_step, arm.name
    assert p.pit_length == 4864 and p.target == 16384
    assert theta_for(5e5, 8) == pytest.approx(8e6, rel=0.01)  # ProLong's 64K base from Llama-3's 5e5


def _row(name: str, seed: int, pk: float, ppl: float) -> dict:
    ev = {"passkey": {"per_length": {"64": 1.0, "256": pk}}, "ruler": {"average": {"256": 100 * pk}, "per_task": {}},
          "ppl": {"64": ppl, "256": ppl}}
    return {"row": name, "arm": name, "label": name, "seed": seed, "tokens": 1, "train_seconds": 1.0,
            "eval_seconds": 1.0, "eval": ev}


def test_verdicts_follow_the_numbers_and_the_seed_spread() -> None:
    rows = [_row("a", 0, 0.9, 10.0), _row("a", 1, 0.8, 11.0), _row("b", 0, 0.5, 20.0), _row("b", 1, 0.6, 21.0),
            _row("c", 0, 0.82, 12.0), _row("c", 1, 0.9, 12.0)]
    agg = aggregate(rows, 64, 256)
    assert agg["a"]["metrics"]["passkey_extended"]["mean"] == pytest.approx(85.0)
    assert agg["a"]["metrics"]["passkey_extended"]["spread"] == pytest.approx(5.0)
    assert verdict(Claim("a beats b", "x", "long_score", "a", "b"), agg)["verdict"] == "holds"
    assert verdict(Claim("b beats a", "x", "long_score", "b", "a"), agg)["verdict"] == "does not hold"
    assert verdict(Claim("a beats c", "x", "long_score", "a", "c"), agg)["verdict"] == "within the seed spread"
    assert verdict(Claim("a lower ppl", "x", "ppl_window", "a", "b", lower_is_better=True), agg)["verdict"] == "holds"
    assert verdict(Claim("missing", "x", "long_score", "a", "zzz"), agg)["verdict"] == "not run"


def test_one_seed_verdicts_weigh_the_prompts_sampling_error() -> None:
    """With one seed, a difference inside two standard errors of the prompts behind each number is not a verdict."""
    from longforge.lab.report import prompt_counts, sampling_error

    def row(name: str, pk: float, ruler: float) -> dict:
        ev = {"passkey": {"per_length": {"64": 1.0, "128": pk, "256": pk, "512": 0.0},
                          "grid": [[1.0] * 5, [pk] * 5, [pk] * 5, [0.0] * 5]},
              "ruler": {"average": {"32": 50.0, "256": ruler},
                        "per_task": {"vt": {"32": 50.0, "256": ruler}, "niah_multikey_1": {"32": 50.0, "256": ruler}}},
              "ppl": {"64": 5.0, "256": 5.0}}
        return {"row": name, "arm": name, "label": name, "seed": 0, "tokens": 1, "train_seconds": 1.0,
                "eval_seconds": 1.0, "eval": ev}

    counts = prompt_counts(row("a", 0.5, 40.0)["eval"], 64, 256, trials=4, samples=4)
    assert counts == {"passkey_inside": 20, "passkey_extended": 40, "passkey_beyond": 20, "ruler_extended": 8,
                      "niah_m_extended": 4, "ruler_half": 8}
    # Agresti-Coull: 20 of 40 -> (20 + 2) / 44 = 0.5, sqrt(0.25 / 44) = 7.54 points.
    assert sampling_error(50.0, 40) == pytest.approx(100 * (0.25 / 44) ** 0.5)
    assert sampling_error(0.0, 40) > 0
    rows = [row("a", 0.6, 40.0), row("b", 0.55, 40.0), row("c", 1.0, 100.0), row("d", 0.0, 0.0)]
    agg = aggregate(rows, 64, 256, trials=4, samples=4)
    close = verdict(Claim("a beats b", "x", "long_score", "a", "b"), agg)
    assert close["verdict"].startswith("within the sampling error (±") and close["verdict"].endswith("(one seed)")
    assert close["difference"] == pytest.approx(2.5) and close["difference"] < close["sampling_margin"]
    assert verdict(Claim("c beats d", "x", "long_score", "c", "d"), agg)["verdict"] == "holds (one seed)"
    # Without the prompt counts (older results), the verdict stays as the numbers say.
    assert aggregate(rows, 64, 256)["a"]["metrics"]["long_score"].get("sampling_error") is None


def test_the_real_model_lab_judges_longrecipe_on_the_papers_metric() -> None:
    """LongRecipe's claim cites NIAH(M): a passkey lead alone must not make it hold."""
    from longforge.lab.report import BASE_CLAIMS

    claim = next(c for c in BASE_CLAIMS if c.a == "longrecipe" and c.b == "fu")
    assert claim.metric == "niah_m_extended"

    def row(name: str, pk: float, niah: float) -> dict:
        ev = {"passkey": {"per_length": {"128": pk, "256": pk}}, "ppl": {},
              "ruler": {"average": {"256": niah}, "per_task": {t: {"256": niah} for t in ("niah_multikey_1", "vt")}}}
        return {"row": name, "arm": name, "label": name, "seed": 0, "tokens": 1, "train_seconds": 1.0,
                "eval_seconds": 1.0, "eval": ev}

    agg = aggregate([row("longrecipe", 1.0, 10.0), row("fu", 0.2, 60.0)], 64, 256)
    assert agg["longrecipe"]["metrics"]["long_score"]["mean"] > agg["fu"]["metrics"]["long_score"]["mean"]
    assert verdict(claim, agg)["verdict"] == "does not hold (one seed)"


def test_tiny_lab_runs_every_kind_of_arm_and_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.lab.run import run_lab

    monkeypatch.setenv("LONGFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lab"
    run_lab(out, device="cpu", profile_name="tiny", seeds=[0], arm_names=["base", "yarn-0", "pose", "longrecipe"])
    res = json.loads((out / "results.json").read_text())
    names = [r["row"] for r in res["rows"]]
    # LongRecipe brings the NTK arm its analysis needs, and reports each of its stages.
    assert names == ["base", "yarn-0", "ntk", "pose", "longrecipe", "longrecipe+replay", "longrecipe+replay+merge"]
    trained = {r["row"]: r["tokens"] for r in res["rows"]}
    assert trained["base"] == 0 and trained["ntk"] == trained["pose"] > 0
    assert trained["longrecipe+replay"] > trained["longrecipe"]
    assert (out / "seed0" / "impactful" / "profile.json").is_file()
    md = (out / "report" / "LAB.md").read_text()
    assert "| longrecipe+replay+merge |" in md and "The papers' claims" in md and (out / "report" / "lab_curves.png").is_file()
    with pytest.raises(LongforgeError, match="unknown lab arm 'nope'"):
        run_lab(out, device="cpu", profile_name="tiny", seeds=[0], arm_names=["nope"])


def _fake_site_packages(root: Path) -> Path:
    """A site-packages tree: packages with modules, docs, licences and metadata (and one file a link points to)."""
    import random

    from conftest import random_text

    rng = random.Random(3)
    sp = root / "site-packages"
    for i, name in enumerate(["alpha", "beta_pkg", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]):
        pkg = sp / name
        (pkg / "sub").mkdir(parents=True)
        for j in range(3):
            body = "\n".join(f"x{k} = {k}  # {random_text(rng, 8)}" for k in range(60 + 20 * i))
            doc = random_text(rng, 30)
            (pkg / ("sub" if j else ".") / f"m{j}.py").write_text(f'"""{doc}"""\n\n\ndef f():\n    """{doc}"""\n    return 1\n{body}\n')
        (pkg / "README.md").write_text(random_text(rng, 400))
        meta = sp / f"{name}-1.0.dist-info"
        meta.mkdir()
        (meta / "LICENSE").write_text("Permission is hereby granted. " + random_text(rng, 100))
        (meta / "METADATA").write_text("Name: " + name + "\n\n" + random_text(rng, 200))
    (sp / "__pycache__").mkdir()
    (sp / "__pycache__" / "x.pyc").write_bytes(b"\x00\x01")
    return sp


def _corpus(tmp_path: Path, tokenizer_dir: Path | None = None) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_corpus", Path(__file__).parents[1] / "benchmarks" / "real_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "corpus"
    tok = None
    if tokenizer_dir is not None:
        from longforge.hf import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    mod.build([_fake_site_packages(tmp_path)], out, tok, heldout_every=3)
    return out


def test_real_corpus_script_writes_domains_heldout_and_counts(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = _corpus(tmp_path, tokenizer_dir)
    m = json.loads((out / "corpus.json").read_text())
    code = [json.loads(x) for x in (out / "code.jsonl").read_text().splitlines()]
    prose = [json.loads(x) for x in (out / "prose.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "heldout_code.jsonl").read_text().splitlines()]
    assert code and prose and held and m["heldout_packages"]
    # One repository document per package with path headers; the held-out packages are in neither training file.
    assert all(d["text"].startswith("# file: ") for d in code)
    assert any("# file: alpha/sub/m1.py" in d["text"] for d in code + held)
    assert not {d["package"] for d in code + prose} & set(m["heldout_packages"])
    assert any("Permission is hereby granted" in d["text"] for d in prose)
    assert m["domains"]["code"]["tokens"] > 0 and m["tokens"]["prose"] == m["domains"]["prose"]["tokens"]
    # Deterministic: a second build writes the same bytes.
    first = (out / "code.jsonl").read_bytes()
    _corpus(tmp_path / "again")
    assert (tmp_path / "again" / "corpus" / "code.jsonl").read_bytes() == first


@pytest.fixture
def tiny_base(tmp_path: Path, tokenizer_dir: Path, tokenizer) -> Path:
    """A tiny Llama checkpoint with a 128-token window."""
    from conftest import make_tiny_model

    from longforge.hf import copy_tokenizer

    out = tmp_path / "base"
    make_tiny_model(len(tokenizer), window=128).save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return out


def test_lab_from_a_given_base_runs_two_arms_in_slices_and_lists_the_rest(tmp_path: Path, tiny_base: Path,
                                                                           one_thread: None) -> None:
    from longforge.lab.run import run_lab

    corpus = _corpus(tmp_path)
    out = tmp_path / "lab"
    common = dict(device="cpu", profile_name="tiny", seeds=[0], base=tiny_base, data=corpus, factor=2, tokens=1024)
    run_lab(out, arm_names=["yarn-0"], **common)
    run_lab(out, arm_names=["ultralong"], **common)  # a second slice: the first arm's rows are kept
    res = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in res["rows"]] == ["yarn-0", "ultralong"]
    ev = res["rows"][1]["eval"]
    # Passkey to 2x the target, perplexity on code and prose from a quarter of the window, RULER from half of it.
    assert max(map(int, ev["passkey"]["per_length"])) == 512 and "32" in ev["ppl"] and "32" in ev["ppl_prose"]
    assert res["rows"][1]["tokens"] >= 1024 and res["window"] == 128 and res["target"] == 256
    # The budget curve: the held-out loss at the target length while training (tiny profile: 2 steps, each one),
    # ending at the arm's tokens; a zero-shot arm has none.
    curve = res["rows"][1]["val_curve"]
    assert len(curve) == 2 and curve[-1][0] == res["rows"][1]["tokens"] and all(loss > 0 for _, loss in curve)
    assert "val_curve" not in res["rows"][0]
    md = (out / "report" / "LAB.md").read_text()
    assert "## The budget: held-out loss while training" in md and (out / "report" / "lab_budget.png").is_file()
    assert "| ultralong |" in md and "| yarn-0 |" in md and str(tiny_base) in md
    assert "## Retention at the original window" in md and "## Arms not run" in md
    assert "| prolong | 0 |" in md and "not run yet" in md
    # --report-only rebuilds the table from what is recorded, training nothing.
    (out / "report" / "LAB.md").unlink()
    run_lab(out, report_only=True, **common)
    assert "| ultralong |" in (out / "report" / "LAB.md").read_text()
    # Rows carried to a fresh folder (another machine) are used as they are: nothing is trained or evaluated again.
    fresh = tmp_path / "lab2"
    for f in out.glob("seed0/*/rows.json"):
        (fresh / f.parent.relative_to(out)).mkdir(parents=True)
        (fresh / f.relative_to(out)).write_bytes(f.read_bytes())
    run_lab(fresh, arm_names=["yarn-0", "ultralong"], **common)
    assert json.loads((fresh / "results.json").read_text())["rows"] == res["rows"]
    assert not (fresh / "seed0" / "ultralong" / "train").exists()


def test_lab_refuses_a_bad_base_in_one_sentence(tmp_path: Path, tiny_base: Path) -> None:
    import shutil

    from longforge.lab.run import run_lab

    corpus = _corpus(tmp_path)
    kw = dict(device="cpu", profile_name="tiny", seeds=[0], data=corpus)
    with pytest.raises(LongforgeError, match="does not exist"):
        run_lab(tmp_path / "l1", base=tmp_path / "nowhere", **kw)
    no_tok = tmp_path / "no-tok"
    shutil.copytree(tiny_base, no_tok)
    for f in no_tok.glob("tok*"):
        f.unlink()
    with pytest.raises(LongforgeError, match="no tokenizer files"):
        run_lab(tmp_path / "l2", base=no_tok, **kw)
    bert = tmp_path / "bert"
    shutil.copytree(tiny_base, bert)
    cfg = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**cfg, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(LongforgeError, match="not a causal language model"):
        run_lab(tmp_path / "l3", base=bert, **kw)
    own = tmp_path / "own"
    shutil.copytree(tiny_base, own)
    (own / "config.json").write_text(json.dumps({**cfg, "model_type": "mything", "auto_map": {"AutoConfig": "x.Cfg"}}))
    with pytest.raises(LongforgeError, match="runs no code from checkpoints"):
        run_lab(tmp_path / "l4", base=own, **kw)
    with pytest.raises(LongforgeError, match="real_corpus.py"):
        run_lab(tmp_path / "l5", base=tiny_base, **{**kw, "data": tmp_path / "none"})
    for bad in ("l1", "l2", "l3", "l4", "l5"):
        assert not (tmp_path / bad).exists()  # refused before anything was written


def test_prose_share_is_cut_to_what_the_corpus_holds_for_every_arm() -> None:
    from longforge.lab.arms import BASE_PROFILES, base_arms, for_base
    from longforge.lab.given import PROSE_MARGIN, prose_share
    from longforge.lab.run import data_spec

    def manifest(prose: int) -> dict:
        return {"domains": {"code": {"tokens": 10**9}, "prose": {"tokens": prose}}}

    assert prose_share(manifest(10**9), 20_000_000) == 0.4  # plenty of prose: ProLong's 60/40
    assert prose_share(manifest(4_000_000), 20_000_000) == round(PROSE_MARGIN * 0.2, 3)
    assert prose_share({}, 20_000_000) == 0.4  # not counted: the recipe's share, checked by the data stage
    prof = for_base(BASE_PROFILES["cuda"], 8192, 1e5, 4, 20_000_000)
    assets = {"corpus": Path("c"), "prose_share": 0.14}
    specs = {a.name: data_spec(prof, assets, a, 32768, None) for a in base_arms(prof) if a.train}
    for name, spec in specs.items():  # the same mix in every arm; ProLong's long share grows to match it
        assert [s["weight"] for s in spec["sources"]] == [0.86, 0.14], name
    assert specs["prolong"]["long_share"] == 0.86 and specs["prolong"]["plan"] == "long_short_mix"


def test_longrecipe_uses_the_carried_impactful_profile_in_another_lab_folder(tmp_path: Path, tiny_base: Path,
                                                                             one_thread: None) -> None:
    """The analysis runs right after the Fu et al. arm; a later call elsewhere (another machine's lab folder) gets only
    the small results (rows, the profile) and runs LongRecipe from them, without Fu et al.'s checkpoint."""
    import shutil

    from longforge.lab.run import run_lab

    corpus = _corpus(tmp_path)
    common = dict(device="cpu", profile_name="tiny", seeds=[0], base=tiny_base, data=corpus, factor=2, tokens=1024)
    first = tmp_path / "lab-a"
    run_lab(first, arm_names=["fu"], **common)
    assert (first / "seed0" / "impactful" / "profile.json").is_file()
    second = tmp_path / "lab-b"
    for f in [*first.glob("seed0/*/rows.json"), *(first / "seed0" / "impactful").rglob("*")]:
        if f.is_file():
            (second / f.parent.relative_to(first)).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, second / f.relative_to(first))
    run_lab(second, arm_names=["longrecipe"], **common)
    rows = [r["row"] for r in json.loads((second / "results.json").read_text())["rows"]]
    assert rows == ["fu", "longrecipe", "longrecipe+replay", "longrecipe+replay+merge"]
    assert not (second / "seed0" / "fu" / "train").exists()  # Fu et al. was not trained again


def test_the_budget_reading_names_the_best_arm_and_its_last_quarter() -> None:
    from longforge.lab.report import budget_reading, last_quarter

    flat = [[1e6, 2.0], [2e6, 1.6], [3e6, 1.5], [4e6, 1.47]]  # 3/4 of 4M is 3M: 1.5 -> 1.47, -2%
    assert last_quarter(flat) == pytest.approx(-0.02)
    assert last_quarter([[1e6, 2.0]]) is None
    rows = [{"row": "a", "val_curve": flat}, {"row": "b", "val_curve": [[1e6, 2.1], [4e6, 1.9]]}, {"row": "c"}]
    text = budget_reading(rows)
    assert text.startswith("The lowest held-out loss at the end is a's (1.4700 after 4.0M tokens)") and "-2.0%" in text
    assert budget_reading([{"row": "c"}]) == ""
