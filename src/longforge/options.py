"""Command-line options generated from the recipe schema: one flag per field, help from its description, defaults
from the schema only, and validation errors that name the flag."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined
from rich.markup import escape

from longforge.errors import LongforgeError


def flag(field: str) -> str:
    """The command-line flag of a schema field (`weight_decay` -> `--weight-decay`)."""
    return "--" + field.replace("_", "-")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp: Any) -> Any:
    """The scalar type of a field's annotation: int, float, bool, str or Path (Annotated constraints dropped)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def plain_type(tp: Any) -> Any:
    """The type of a field without None and Annotated marks (`InputPath | None` -> Path)."""
    return _scalar(_unwrap(_scalar(tp))[0])


def option_kind(tp: Any) -> str | None:
    """How a field becomes a flag: 'scalar', 'choice', 'bool', 'list' (comma-separated), or None (only via --set)."""
    tp = plain_type(tp)
    if tp is bool:
        return "bool"
    if get_origin(tp) is Literal:
        return "choice"
    if _number_or_choice(tp):
        return "number_or_choice"
    if tp in (int, float, str, Path):
        return "scalar"
    if get_origin(tp) in (list, tuple) and all(_scalar(a) in (int, float, str, Path, Ellipsis)
                                               or get_origin(_scalar(a)) is Literal for a in get_args(tp)):
        return "list"
    return None


def _number_or_choice(tp: Any) -> bool:
    """A union of named values and numbers (`Literal["auto"] | int`): a flag whose text the schema validates."""
    if get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    args = [_scalar(a) for a in get_args(tp) if a is not type(None)]
    return any(get_origin(a) is Literal for a in args) and all(get_origin(a) is Literal or a in (int, float) for a in args)


def _help(info: Any, default: Any, extra: str = "") -> str:
    """The field's description (and `extra`), then its default, as --help shows them."""
    # Escaped: --help renders rich markup, which would swallow a description's "[...]".
    text = escape(". ".join(t.rstrip(".") for t in (info.description or "", extra) if t))
    if default is not None and default is not PydanticUndefined and not isinstance(default, BaseModel):
        shown = ",".join(str(x) for x in default) if isinstance(default, (list, tuple)) else default
        text += f" (default: {shown})." if text else f"Default: {shown}."
    elif text:
        text += "."
    return text


def schema_parameters(model: type[BaseModel], skip: Iterable[str] = (), panels: dict[str, str] | None = None,
                      rename: dict[str, str] | None = None, hide_defaults: Iterable[str] = ()) -> list[inspect.Parameter]:
    """A typer keyword parameter for every settable field of `model` (None when not given, so defaults stay the schema's)."""
    params = []
    for name, info in model.model_fields.items():
        kind = option_kind(info.annotation)
        if name in set(skip) or kind is None:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        shown = None if name in set(hide_defaults) else default  # a flag that switches its section on has no default
        opt_name = flag(rename.get(name, name)) if rename else flag(name)
        decls = [opt_name]
        if kind == "bool":
            # A flag that is off by default needs no --no- form; one that is on by default needs it to turn off.
            decls = [f"{opt_name}/--no-{opt_name[2:]}"] if default is True else [opt_name]
            py: Any = bool | None
            opt = typer.Option(*decls, help=_help(info, shown), rich_help_panel=(panels or {}).get(name),
                               show_default=False)
        elif kind == "choice":
            # The values go into the help, not the metavar, so the option column stays narrow at 80 columns;
            # the schema validates them (an error names the flag and the values).
            values = ", ".join(str(v) for v in get_args(plain_type(info.annotation)))
            py = str | None
            opt = typer.Option(*decls, help=_help(info, shown, f"One of: {values}"), show_default=False,
                               rich_help_panel=(panels or {}).get(name), metavar="<choice>")
        elif kind == "number_or_choice":
            named = [str(v) for a in get_args(plain_type(info.annotation)) if get_origin(_scalar(a)) is Literal
                     for v in get_args(_scalar(a))]
            py = str | None
            opt = typer.Option(*decls, help=_help(info, shown, f"A number or one of: {', '.join(named)}"),
                               show_default=False, rich_help_panel=(panels or {}).get(name), metavar="<n|choice>")
        elif kind == "list":
            py = str | None
            opt = typer.Option(*decls, help=_help(info, shown, "Comma-separated"), show_default=False,
                               rich_help_panel=(panels or {}).get(name), metavar="A,B,...")
        else:
            py = plain_type(info.annotation) | None
            opt = typer.Option(*decls, help=_help(info, shown), rich_help_panel=(panels or {}).get(name),
                               show_default=False)
        params.append(inspect.Parameter(rename.get(name, name) if rename else name, inspect.Parameter.KEYWORD_ONLY,
                                        default=None, annotation=Annotated[py, opt]))
    return params


def with_schema_options(model: type[BaseModel], skip: Iterable[str] = (), panels: dict[str, str] | None = None,
                        rename: dict[str, str] | None = None, into: str = "schema_values",
                        hide_defaults: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so it also takes one option per field of `model`, passed to it as `schema_values`.

    The command's own parameters come first; `schema_values` holds only the fields the user gave (by field name).
    Decorators stack, one per section (e.g. data build's data, sentence filter and replay), each passing its values
    by its own `into` name; `rename` gives a field another flag (`token_budget` -> `--budget`).
    """
    extra = schema_parameters(model, skip, panels, rename, hide_defaults)
    back = {v: k for k, v in (rename or {}).items()}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)  # real types, also under `from __future__ import annotations`
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()
               if p.name != into]
        taken = {p.name for p in own}
        fields = [p for p in extra if p.name not in taken]

        def command(**kwargs: Any) -> Any:
            values = {back.get(p.name, p.name): kwargs.pop(p.name) for p in fields}
            return fn(**kwargs, **{into: {k: v for k, v in values.items() if v is not None}})

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__signature__ = inspect.Signature(own + fields)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + fields}
        return command

    return wrap


def _parse_list(model: type[BaseModel], name: str, text: str) -> list[Any]:
    """A comma-separated flag value as a list of the field's item type (validation checks the values)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    args = [a for a in get_args(plain_type(model.model_fields[name].annotation)) if a is not Ellipsis]
    item = _scalar(args[0]) if args else str
    if item in (int, float):
        try:
            return [item(x) for x in items]
        except ValueError:
            kind = "integers" if item is int else "numbers"
            raise LongforgeError(f"{flag(name)} {text!r} is not a comma-separated list of {kind}.") from None
    return items


def spec_from_options(model: type[BaseModel], values: dict[str, Any], where: str, base: dict[str, Any] | None = None,
                      rename: dict[str, str] | None = None) -> BaseModel:
    """Validate flag values (over `base`, e.g. a --spec file) with the schema; an error names the flag it came from."""
    data = dict(base or {})
    for name, value in values.items():
        if option_kind(model.model_fields[name].annotation) == "list" and isinstance(value, str):
            value = _parse_list(model, name, value)
        data[name] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise LongforgeError("\n".join(_flag_error(err, values, where, rename or {}, model)
                                       for err in _one_per_union(e.errors()))) from None


def _one_per_union(errors: list[Any]) -> list[Any]:
    """A value that fits no branch of a union (`'auto' | int`) fails once per branch: one error saying every branch."""
    out: list[Any] = []
    for err in errors:
        loc = err.get("loc", ())
        last = out[-1] if out else None
        if last is not None and len(loc) == 2 and last.get("loc", ())[:1] == loc[:1] and len(last["loc"]) == 2:
            also = err.get("msg", "").removeprefix("Input should be ")
            out[-1] = {**last, "msg": f"{last.get('msg', '')} or {also}"}
            continue
        out.append(err)
    return out


def _flag_error(err: dict[str, Any], given: dict[str, Any], where: str, rename: dict[str, str], model: Any) -> str:
    """One validation error, naming the flag when a flag set the value (or must), else the key in `where`."""
    from longforge.recipe import _format_error

    loc = err.get("loc", ())
    name = loc[0] if loc and isinstance(loc[0], str) else None
    if not loc:  # a check across several fields (a model validator): its message names them
        return f"{where}: {err.get('msg', 'invalid settings').removeprefix('Value error, ')}."
    if name in given:
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        got = err.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        return f"{flag(rename.get(name, name))}: {msg}{shown}."
    if err.get("type") == "missing" and len(loc) == 1 and name in model.model_fields and option_kind(
            model.model_fields[name].annotation) is not None:
        return f"{where} needs {flag(rename.get(name, name))}."
    return _format_error(err, where, model)
