"""Shipped recipe presets: the four papers' recipes, PoSE, and the demo's."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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


def resolve_recipe_arg(arg: str) -> tuple[Path | None, str | None]:
    """(file, None) for a recipe file, (None, preset name) for a preset name."""
    p = Path(arg)
    if p.is_file():
        return p, None
    if arg in preset_names():
        return None, arg
    raise LongforgeError(f"{arg} is neither a recipe file nor a preset ({', '.join(preset_names())}); pass a YAML path or a preset name.")
