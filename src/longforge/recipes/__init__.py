"""Shipped recipe presets: the four papers' recipes, PoSE, and the demo's."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from longforge.errors import LongforgeError


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of a preset, comments included."""
    if name not in preset_names():
        raise LongforgeError(f"no preset named {name!r}; `longforge recipes` lists them ({', '.join(preset_names())}).")
    return resources.files(__package__).joinpath(f"{name}.yaml").read_text()


def preset_summary(name: str) -> dict[str, object]:
    """Name, description and the main settings of a preset, for listing."""
    data = yaml.safe_load(preset_text(name))
    stages = [str(s.get("name")) for s in data.get("stages", [])]
    pos = data.get("positions", {})
    return {"name": name, "description": data.get("description", ""), "target_length": data.get("target_length"),
            "method": pos.get("method", "yarn"), "transform": pos.get("transform", "contiguous"),
            "plan": data.get("data", {}).get("plan", "upsample_long"), "stages": " -> ".join(stages)}


def context_length(n: object) -> str:
    """A context length as people write it: 131072 -> 128K, 1048576 -> 1M; other numbers as they are."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return str(n)
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def preset_table() -> Any:
    """The presets as a rich Table that fits 80 columns: names, settings and plans whole, only `stages` wrapped."""
    from rich.table import Table

    t = Table(title="longforge presets (recipes show NAME > my.yaml; run NAME --set key=value)")
    for col in ("name", "target", "RoPE", "positions", "data plan"):
        t.add_column(col, no_wrap=True, justify="right" if col == "target" else "left")
    t.add_column("stages", overflow="fold")
    for name in preset_names():
        p = preset_summary(name)
        t.add_row(name, context_length(p["target_length"]), str(p["method"]), str(p["transform"]), str(p["plan"]), str(p["stages"]))
    return t


def resolve_recipe_arg(arg: str) -> tuple[Path | None, str | None]:
    """(file, None) for a recipe file, (None, preset name) for a preset name."""
    p = Path(arg)
    if p.is_file():
        return p, None
    if arg in preset_names():
        return None, arg
    raise LongforgeError(f"{arg} is neither a recipe file nor a preset ({', '.join(preset_names())}); pass a YAML path or a preset name.")
