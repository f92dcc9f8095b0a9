"""The spec reference in docs/spec.md, generated from the pydantic models so it cannot drift from the code.

`render_spec_reference()` walks `JobSpec` and writes one markdown table per section: dotted key, type, default and the
field's description. A test regenerates it and compares with the checked-in docs. No I/O here.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hpcds.spec.job import JobSpec
from hpcds.spec.types import find_model


def _type_name(annotation: typing.Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{value!r}`" if value not in (None, [], {}) else ("null" if value is None else f"`{value!r}`")


def spec_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """Every (dotted key, field) of the spec, sections depth first."""
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        found.append((key, field))
        child = find_model(field.annotation)
        if child is not None:
            found += spec_fields(child, key + ("[]." if _is_list(field.annotation) else "."))
    return found


def _is_list(annotation: typing.Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) is list


def render_spec_reference() -> str:
    lines: list[str] = []
    current = None
    for key, field in spec_fields():
        section = key.split(".")[0] if "." in key else ""
        child = find_model(field.annotation)
        if child is not None and "." not in key:
            continue  # a section header, written below when its first field comes
        if section != current:
            current = section
            title = f"`{section}`" if section else "Top level"
            lines += ["", f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        kind = _type_name(field.annotation)
        if child is not None:
            kind = "list of mappings" if _is_list(field.annotation) else "mapping"
        lines.append(f"| `{key}` | {kind} | {_default(field)} | {field.description or ''} |")
    return "\n".join(lines).lstrip("\n") + "\n"
