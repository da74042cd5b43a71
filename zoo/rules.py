"""What an option accepts: its type (from the annotation text of a signature) and a :class:`Rule` (range,
choices, or a registry's names). TensorFlow-free, so ``ablate validate`` checks every option up front.

Types are checked strictly (pydantic's strict mode): ``1`` is a valid ``float`` but ``true`` is not a number,
``1.0`` is not an ``int`` and the YAML text ``1e-3`` (a string to YAML 1.1) is not a number either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Union

from zoo.registry import Registry, suggest


class BadOptionError(ValueError):
    """A model option that its builder does not take, or a value it does not accept.

    Attributes:
        option: the dotted option path under ``model`` (e.g. ``activation_options.negative_slope``), or None.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class Rule:
    """Constraints beyond the type: numeric bounds, allowed strings, or the names of a registry.

    For a union such as ``float | str`` the bounds apply to numbers and ``choices`` to strings.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    registry: Registry | None = dataclasses.field(default=None, compare=False)

    def problem(self, label: str, value: Any, numbers_too: bool = False) -> str | None:
        """Why ``value`` breaks the rule (a sentence naming ``label``), or None when it is fine.

        Args:
            label: the option's name in messages.
            value: a value of the option's type.
            numbers_too: the type also takes numbers (``float | str``), which the message then mentions.

        Raises:
            UnknownNameError: a string that is not a name of :attr:`registry` (lists the known names).
        """
        if isinstance(value, str):
            if self.registry is not None:
                self.registry.get(value)
            if self.choices is not None and value not in self.choices:
                names = f"'{self.choices[0]}'" if len(self.choices) == 1 else "one of " + ", ".join(map(str, self.choices))
                allowed = ("a number or " if numbers_too else "") + names
                return f"{label} must be {allowed}, got {value!r}." + \
                    suggest(value, [c for c in self.choices if isinstance(c, str)])
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value):
            return f"{label} must be a finite number, got {value!r}"
        for bound, ok, word in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                return f"{label} must be {word} {bound:g}, got {value!r}"
        return None


_NAMESPACE = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list, "tuple": tuple,
              "Any": Any, "None": None, "Optional": Optional, "Union": Union}
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
          list: "a list", tuple: "a list"}


@functools.lru_cache(maxsize=None)
def _adapter(annotation: str) -> Any:
    from pydantic import TypeAdapter

    # Annotations come from this package's own source (signatures), never from user input.
    return TypeAdapter(eval(annotation, {"__builtins__": {}}, _NAMESPACE))  # noqa: S307


def describe(annotation: str) -> str:
    """``"float | None"`` -> ``"a number or null"``."""
    parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
    words = ["null" if p == "None" else _WORDS.get(_NAMESPACE.get(p.split("[")[0]), p) for p in parts]
    return " or ".join(dict.fromkeys(words))


def type_problem(label: str, annotation: str, value: Any) -> str | None:
    """Why ``value`` is not of the annotated type (strictly), or None."""
    from pydantic import ValidationError

    try:
        _adapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        msg = f"{label} must be {describe(annotation)}, got {value!r}"
        if isinstance(value, str) and _number_text(value) and "str" not in annotation:
            msg += f" (text: YAML reads {value} as a string; write it with a decimal point, e.g. 1.0e-3)"
        return msg
    return None


def _number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
