"""Request validation: every field's type, range and size is checked before it touches state.

A `Schema` maps field names to `Field`s. `validate` returns a new dict holding the declared fields
(defaults filled in); fields it does not declare are ignored, so newer clients can talk to older
daemons. The first bad field raises a `MistudioError` (code `bad_request`) that names it and says
what it must be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mistudio_core.errors import MistudioError

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a map"}


@dataclass(frozen=True)
class Field:
    kind: type
    required: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    max_length: int | None = None
    pattern: str | None = None
    item: type | None = None

    def check(self, name: str, value: Any) -> Any:
        if not _is_kind(value, self.kind):
            raise _bad(name, f"must be {_TYPE_NAMES[self.kind]}, not {_describe(value)}")
        if self.kind is float:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise _bad(name, "must be a finite number")
        if self.min is not None and value < self.min:
            raise _bad(name, f"must be at least {self.min:g}, got {value}")
        if self.max is not None and value > self.max:
            raise _bad(name, f"must be at most {self.max:g}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise _bad(name, f"must be one of {', '.join(map(str, self.choices))}, "
                             f"got {_describe(value)}")
        if self.max_length is not None and len(value) > self.max_length:
            raise _bad(name, f"is {len(value)} long; the limit is {self.max_length}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _bad(name, f"{value!r} is not allowed here")
        if self.item is not None and not all(_is_kind(v, self.item) for v in value):
            raise _bad(name, f"must hold only {_TYPE_NAMES[self.item]} values")
        return value


class Schema:
    def __init__(self, **fields: Field) -> None:
        self.fields = fields

    def validate(self, content: dict) -> dict:
        valid = {}
        for name, spec in self.fields.items():
            value = content.get(name)
            if value is None:
                if spec.required:
                    raise _bad(name, "is required")
                valid[name] = spec.default
            else:
                valid[name] = spec.check(name, value)
        return valid


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _bad(name: str, problem: str) -> MistudioError:
    return MistudioError(f"field `{name}` {problem}",
                         hint="`mistudio COMMAND --help` describes each option; the daemon's "
                              "`daemon.info` lists its operations and job kinds",
                         code="bad_request", field=name)
