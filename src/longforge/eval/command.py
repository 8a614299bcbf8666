"""`longforge eval`'s options and the EvalSpec they make.

Every field of the eval spec is a flag (longforge.options): a task section's fields are prefixed with the task's
name (`--niah-needle`, `--ruler-threshold`, `--ppl-num-docs`), the grid fields passkey and NIAH share are plain
(`--lengths`, `--num-lengths`, `--depths`, `--trials`) and set both, and the inference settings are plain
(`--prefill-chunk`). The tasks are the eval spec's optional sections; which run is `--tasks`, else the --spec file's
(or passkey) plus every task one of whose own flags is given. A task that does not run is off (its section None),
never its default: `--tasks ruler` runs RULER alone.

Imported when the command line is built, so it imports the schema only, not the tasks' code.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, create_model
from pydantic.fields import FieldInfo

from longforge.config import EvalSpec, InferenceSpec
from longforge.errors import LongforgeError
from longforge.options import flag, option_kind, plain_type, spec_from_options

GRID = ("lengths", "num_lengths", "depths", "trials")  # fields of every grid task, set together by the plain flags
GRID_TASKS = ("passkey", "niah")
# Fields whose flag keeps the name it had before every field had one (scripts use them).
PLAIN = {("niah", "haystack"): "haystack", ("ruler", "samples"): "samples", ("ruler", "essays"): "essays",
         ("ruler", "squad"): "squad", ("ruler", "hotpotqa"): "hotpotqa", ("inference", "gpu_memory_gib"): "gpu_memory"}
SKIP = {("eval", "models")}  # a recipe's choice of which models to evaluate; the command evaluates the one it is given


@dataclass(frozen=True)
class Flag:
    """Where a flag's value goes: a field of a task section, of the shared grid, of `inference` or of the spec."""

    section: str  # a task's name, "grid", "inference" or "eval"
    field: str


def task_sections() -> dict[str, type[BaseModel]]:
    """The eval spec's task sections (its optional sub-models), by task name, in the schema's order."""
    out = {}
    for name, info in EvalSpec.model_fields.items():
        tp = info.annotation
        if get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp):
            model = next((a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if model is not None:
                out[name] = model
    return out


def _sections() -> dict[str, type[BaseModel]]:
    """Every section a flag can set: the tasks, the shared grid (as the first grid task has it), inference, the spec."""
    tasks = task_sections()
    return {**tasks, "grid": tasks[GRID_TASKS[0]], "inference": InferenceSpec, "eval": EvalSpec}


def flag_table() -> dict[str, Flag]:
    """Every generated option's name (its flag without `--`, underscores for dashes) and where its value goes."""
    tasks = task_sections()
    table: dict[str, Flag] = {}
    for section, model in _sections().items():
        for field, info in model.model_fields.items():
            if (section, field) in SKIP or option_kind(_flag_type(info.annotation)) is None:
                continue
            if section == "grid" and field not in GRID or section in GRID_TASKS and field in GRID:
                continue
            if section in tasks:
                name = PLAIN.get((section, field), f"{section}_{field}")
            else:
                name = PLAIN.get((section, field), field)
            table[name] = Flag(section, field)
    return table


def _flag_type(tp: Any) -> Any:
    """A field's type as its flag takes it, None allowed (a flag not given is None); a list holds plain values (its
    items' constraints and choices are the section's to check)."""
    tp = plain_type(tp)
    if get_origin(tp) is list:
        item = plain_type(get_args(tp)[0])
        tp = list[str] if get_origin(item) is Literal else list[item]  # type: ignore[valid-type]
    return tp | None


def _flag_info(info: FieldInfo) -> FieldInfo:
    """A field's description, default and constraints as its flag shows and checks them (None for a required field:
    a flag may be absent)."""
    out = copy.copy(info)
    if out.is_required():
        out.default = None
    tp = plain_type(info.annotation)
    if get_origin(tp) is list:
        out.metadata = []  # the list's own constraints (its length) are the section's to check
        item = plain_type(get_args(tp)[0])
        if get_origin(item) is Literal:
            out.description = f"{(info.description or '').rstrip('.')}. Of: {', '.join(get_args(item))}"
    return out


def options_model() -> type[BaseModel]:
    """A flat model of every option (the fields' descriptions, defaults and constraints), for with_schema_options;
    validating a flag's value with it names the flag."""
    sections = _sections()
    fields = {}
    for name, f in flag_table().items():
        info = sections[f.section].model_fields[f.field]
        fields[name] = (_flag_type(info.annotation), _flag_info(info))
    return create_model("EvalOptions", **fields)  # type: ignore[call-overload, no-any-return]


def panels() -> dict[str, str]:
    """The help panel of each option: its task, the grid, or the engine."""
    titles = {"grid": "Passkey and NIAH grid", "inference": "Inference engine", "eval": "Evaluation"}
    return {name: titles.get(f.section, f"Task {f.section}") for name, f in flag_table().items()}


def _task_names(text: str) -> list[str]:
    """The tasks `--tasks` names, each known."""
    known = list(task_sections())
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for t in names:
        if t not in known:
            raise LongforgeError(f"--tasks: unknown task {t!r}; choose from {', '.join(known)}.")
    if not names:
        raise LongforgeError(f"--tasks is empty; name tasks from {', '.join(known)}.")
    return names


def read_spec_file(path: Path) -> EvalSpec:
    """The `eval` section of a YAML file (or the whole file), validated; relative paths are relative to the file."""
    from longforge.recipe import read_yaml_file

    data = read_yaml_file(path, "a YAML file holding the recipe's `eval` section", f"--spec {path}") or {}
    data = data.get("eval", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise LongforgeError(f"--spec {path}: the eval section must be a mapping of keys to values, not "
                             f"{type(data).__name__}.")
    # Validated as written: a section set to null is off, not its default.
    spec = spec_from_options(EvalSpec, {}, str(path), base=data)
    assert isinstance(spec, EvalSpec)
    spec.resolve_paths(lambda p: None if p is None else (p if Path(p).is_absolute() else (path.parent / p).resolve()))
    return spec


def build_spec(values: dict[str, Any], tasks: str | None = None, spec_file: Path | None = None) -> EvalSpec:
    """The EvalSpec the flags ask for (`values`: the options given, by name), over a --spec file's."""
    table = flag_table()
    flat = spec_from_options(options_model(), values, "eval")  # lists parsed, each value checked alone
    given: dict[str, dict[str, Any]] = {}
    for name in values:
        f = table[name]
        given.setdefault(f.section, {})[f.field] = getattr(flat, name)
    base = read_spec_file(spec_file) if spec_file is not None else EvalSpec(passkey=None)
    sections = task_sections()
    flagged = [t for t in sections if t in given]
    if tasks is not None:
        names = _task_names(tasks)
        for t in flagged:
            if t not in names:
                raise LongforgeError(f"{_flag_of(t, given[t])} sets the {t} task, which --tasks leaves out; add {t} to "
                                     "--tasks or drop the flag.")
    else:
        start = [t for t in sections if getattr(base, t) is not None] if spec_file is not None else ["passkey"]
        names = list(dict.fromkeys(start + flagged))
    data: dict[str, Any] = {t: None for t in sections}
    for t in names:
        data[t] = _section(t, sections[t], getattr(base, t), {**(given.get("grid", {}) if t in GRID_TASKS else {}),
                                                              **given.get(t, {})}, table)
    data["inference"] = _validate(InferenceSpec, given.get("inference", {}), base.inference, "inference", table)
    data["models"] = base.models
    data["seed"] = given.get("eval", {}).get("seed", base.seed)
    return EvalSpec.model_validate(data)


def _section(task: str, model: type[BaseModel], base: BaseModel | None, values: dict[str, Any],
             table: dict[str, Flag]) -> BaseModel:
    """One task's settings: the file's (or the defaults), with the flags given over them."""
    missing = [f for f, info in model.model_fields.items() if info.is_required() and f not in values and base is None]
    if missing:
        field = missing[0]
        what = model.model_fields[field].description or field
        raise LongforgeError(f"task {task} needs {_flag(task, field, table)} ({what.rstrip('.')}).")
    return _validate(model, values, base, task, table)


def _validate(model: type[BaseModel], values: dict[str, Any], base: BaseModel | None, section: str,
              table: dict[str, Flag]) -> BaseModel:
    """`values` over `base`, validated; an error names the flag that set the value."""
    rename = {f: _flag(section, f, table)[2:].replace("-", "_") for f in values}
    data = base.model_dump(exclude_unset=True) if base is not None else {}
    return spec_from_options(model, values, f"eval.{section}", base=data, rename=rename)


def _flag(section: str, field: str, table: dict[str, Flag]) -> str:
    """The flag that sets a field of a section (the shared grid flag for a grid task's grid fields)."""
    for name, f in table.items():
        if f.field == field and (f.section == section or (f.section == "grid" and section in GRID_TASKS)):
            return flag(name)
    return f"`{section}.{field}`"


def _flag_of(task: str, values: dict[str, Any]) -> str:
    """The flag of one of the values given for a task (for a message)."""
    return _flag(task, next(iter(values)), flag_table())
