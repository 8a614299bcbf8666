"""Recipes as files: reading YAML, `--set` overrides, presets, the paths a recipe reads, and one-sentence errors.

The schema itself is longforge.config; this module is the one place that turns text into it. Path fields are marked
in the schema (config.InputPath) and found here by walking it, for resolving, checking and stamping alike.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from longforge.config import Input, Recipe
from longforge.errors import LongforgeError

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------- reading


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to data, or one clear error naming the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LongforgeError(f"{source}: not valid YAML{where}; fix the syntax there.") from None


def read_yaml_file(path: Path, what: str, label: str | None = None) -> Any:
    """A YAML file's data; a missing or non-UTF-8 file is one sentence naming `what` it should be (and the file as
    `label`, e.g. with the flag that gave it)."""
    path = Path(path)
    name = label or str(path)
    if not path.is_file():
        raise LongforgeError(f"{name} does not exist; pass the path of {what}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LongforgeError(f"{name} is not UTF-8 text; save it as UTF-8 YAML.") from None
    return parse_yaml(text, str(path))


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """Apply `key.sub=value` settings (list items by index, values parsed as YAML) to recipe data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LongforgeError(f"--set {item!r} is not KEY=VALUE (e.g. --set model.path=/models/llama).")
        value = parse_yaml(raw, f"--set {key}")
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LongforgeError(f"--set {key}: {part!r} is not an index of the {len(node)} items at {'.'.join(parts[:depth])}.")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise LongforgeError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section.")
    return data


def validate(model: Any, data: Any, source: str, root: Any = None) -> Any:
    """Validate data with a schema type, turning every problem into one sentence per problem naming its key."""
    from pydantic import TypeAdapter

    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        raise LongforgeError("\n".join(_format_error(err, source, root or model) for err in e.errors())) from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping, turning every problem into one clear LongforgeError."""
    if not isinstance(data, dict):
        raise LongforgeError(f"{source}: a recipe must be a YAML mapping of keys to values, not {type(data).__name__}.")
    return validate(Recipe, data, source)


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe YAML file; relative paths inside it are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise LongforgeError(f"recipe file {path} does not exist; pass the path of a recipe YAML file.")
    data = apply_overrides(parse_yaml(path.read_text(), str(path)), overrides or [], str(path))
    recipe = parse_recipe(data, source=str(path))
    return resolve_paths(recipe, path.parent)


def load_preset(name: str, overrides: list[str] | None = None, base: Path | None = None) -> Recipe:
    """A shipped preset with overrides; its relative paths are taken from `base` (the working folder by default)."""
    from longforge.recipes import preset_text

    data = apply_overrides(parse_yaml(preset_text(name), f"preset {name}"), overrides or [], f"preset {name}")
    recipe = parse_recipe(data, source=f"preset {name}")
    return resolve_paths(recipe, base or Path.cwd())


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, with every default filled in."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)


# ---------------------------------------------------------------- paths


def _marker(annotation: Any) -> Input | None:
    """The Input mark of a field's annotation, looked for inside Optional and Annotated."""
    if typing.get_origin(annotation) is typing.Annotated:
        marks = [m for m in annotation.__metadata__ if isinstance(m, Input)]
        if marks:
            return marks[0]
    for arg in typing.get_args(annotation):
        found = _marker(arg)
        if found is not None:
            return found
    return None


def input_fields(spec: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str]]:
    """Every path the spec reads that is set: (its key, e.g. data.sources.0.path; the section; the field's name)."""
    for name, info in type(spec).model_fields.items():
        value = getattr(spec, name)
        key = f"{prefix}.{name}" if prefix else name
        # pydantic keeps a plain field's Annotated marks in `metadata`, an Optional one's in its annotation
        mark = next((m for m in info.metadata if isinstance(m, Input)), None) or _marker(info.annotation)
        if mark is not None:
            if value is not None and str(value) not in mark.keep:
                yield key, spec, name
        elif isinstance(value, BaseModel):
            yield from input_fields(value, key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from input_fields(item, f"{key}.{i}")


def input_paths(spec: BaseModel, prefix: str = "") -> dict[str, Path]:
    """Every file or folder the spec reads, by key."""
    return {key: Path(getattr(section, name)) for key, section, name in input_fields(spec, prefix)}


def map_paths(spec: M, fix: Callable[[Path], Path]) -> M:
    """Replace every path the spec reads by `fix(path)` (a word such as merge.other's 'base' is left alone)."""
    for _, section, name in list(input_fields(spec)):
        value = getattr(section, name)
        fixed = fix(Path(value))
        setattr(section, name, str(fixed) if isinstance(value, str) else fixed)
    return spec


def resolve_paths(spec: M, base: Path) -> M:
    """Make every relative path the spec reads relative to `base` (and expand ~)."""

    def fix(p: Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (Path(base) / p).resolve()

    return map_paths(spec, fix)


def resolve_data_paths(root: Any, data: Any, base: Path) -> Any:
    """The same for data not validated yet (a --spec file, before flags are added): its relative paths, found by
    walking the schema type `root` alongside it, are made relative to `base`."""
    if isinstance(data, list):
        return [resolve_data_paths(root, item, base) for item in data]
    models = _models_in(root)
    if not isinstance(data, dict) or not models:
        return data
    # A union of stage kinds: the member this mapping's kind names (pretrain when none).
    model = next((m for m in models if _kind(m) == data.get("kind", "pretrain")), models[0])
    out = dict(data)
    for key, value in data.items():
        info = model.model_fields.get(key)
        if info is None:
            continue  # validation names the unknown key
        mark = next((m for m in info.metadata if isinstance(m, Input)), None) or _marker(info.annotation)
        if mark is not None and isinstance(value, str) and value not in mark.keep:
            p = Path(value).expanduser()
            out[key] = str(p if p.is_absolute() else (Path(base) / p).resolve())
        elif isinstance(value, (dict, list)):
            out[key] = resolve_data_paths(info.annotation, value, base)
    return out


# ---------------------------------------------------------------- errors


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema sections an annotation can hold (inside Optional, list, Annotated and unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += [m for m in _models_in(arg) if m not in out]
    return out


def _kind(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    return field.default if field is not None else None


def locate(loc: tuple[Any, ...], root: Any = Recipe) -> tuple[tuple[Any, ...], list[type[BaseModel]]]:
    """An error's location as the user wrote it (the union tags pydantic adds, e.g. a stage's kind, dropped), and
    the sections its last key can belong to."""
    where: list[Any] = []
    models = _models_in(root)
    for part in loc:
        if isinstance(part, int):
            where.append(part)
            continue
        tagged = [m for m in models if _kind(m) == part]
        if len(models) > 1 and tagged:
            models = tagged
            continue
        where.append(part)
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        models = _models_in(field.annotation) if field is not None else []
    return tuple(where), models


def _format_error(err: dict[str, Any], source: str, root: Any = Recipe) -> str:
    """One sentence for one pydantic error, naming the key and the fix."""
    loc, _ = locate(tuple(err["loc"]), root)
    kind = err["type"]
    if kind == "union_tag_invalid":  # a stage kind that is none of the registered ones
        loc = (*loc, "kind")
    key = ".".join(str(p) for p in loc) or "(top level)"
    if kind == "extra_forbidden":
        parents = locate(tuple(err["loc"])[:-1], root)[1]
        name = str(loc[-1])
        kinds = _kinds_with(name, parents)
        if kinds:
            return (f"{source}: `{key}` is a setting of {' and '.join(kinds)} stages, not of {_kind(parents[0])} ones; "
                    "remove it, or change the stage's `kind`.")
        allowed = list(dict.fromkeys(k for m in parents for k in m.model_fields))
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed keys here: {', '.join(allowed)}."
        return f"{source}: unknown key `{key}`; {hint}"
    if kind == "missing":
        return f"{source}: `{key}` is required; add it to the recipe."
    if kind == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        return f"{source}: `{key}` must be one of {tags} (got {err.get('ctx', {}).get('tag')!r}); fix that value in the recipe."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: `{key}` {msg[0].lower() + msg[1:]}{got_s}; fix that value in the recipe."


def _kinds_with(name: str, parents: list[type[BaseModel]]) -> list[str]:
    """The stage kinds that have the key `name`, when it was written in a stage of another kind (sft: in a pretrain one)."""
    from longforge.config import STAGE_SPECS

    if len(parents) != 1 or parents[0] not in STAGE_SPECS.values():
        return []
    return [kind for kind, spec in STAGE_SPECS.items() if name in spec.model_fields]
