"""Where a mistake was written and how it is told: ``file:line`` or ``--set 'item'``, the key, what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from zoo.registry import suggest


class Where:
    """Where a dotted key was written, for error messages: the file and line, or the ``--set`` item."""

    def __init__(self, source: str = "<config>", lines: dict[str, int] | None = None,
                 set_items: dict[str, str] | None = None):
        self.source, self.lines, self.set_items = source, lines or {}, set_items or {}

    def set_item(self, path: str) -> str | None:
        for key, item in self.set_items.items():
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return item
        return None

    def at(self, path: str) -> str:
        """``file:line`` of ``path`` (or of its nearest written parent), or ``--set 'item'``."""
        plain = path[len("grid."):] if path.startswith("grid.") else path
        item = self.set_item(plain)
        if item is not None:
            return f"--set '{item}'"
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:n]))
            if line:
                return f"{self.source}:{line}"
        return self.source


def _allowed_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str] | None:
    """Allowed keys of the section at ``loc`` (a path of field names from ``root``, the Experiment)."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return list(model.model_fields)


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[: n - 3]}... ({len(text)} characters)"


def _grid_key(path: str, values: dict[str, Any]) -> str | None:
    """The grid axis whose value of this arm set ``path`` (a bundle sets the keys it names), or None."""
    for key, value in values.items():
        if path == key:
            return key
        if path.startswith(key + "."):
            node = value
            for part in path[len(key) + 1:].split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                return key
    return None


def format_errors(err: ValidationError, where: Where, root: type[BaseModel], arm_id: str | None = None,
                   values: dict[str, Any] | None = None) -> str:
    """One line per pydantic error: where it was written, the dotted key, what was wrong and what is allowed.

    Args:
        err: the validation error of ``root`` (or of an arm built from it).
        where: file lines and ``--set`` items, to locate each key.
        root: the model whose fields the error's locations start from, for the allowed keys of a section.
        arm_id: the arm being built, named in each line.
        values: that arm's grid values, so an error caused by a grid value points at the grid axis.
    """
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        ctx = e.get("ctx") or {}
        path = ".".join(str(p) for p in loc + ((ctx["option"],) if "option" in ctx else ()))
        grid_key = _grid_key(path, values or {})
        at = where.at(("grid." + grid_key) if grid_key and not where.set_item(path) else path)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1], root) or []
            msg = f"unknown key '{path}'.{suggest(str(loc[-1]), allowed)} Allowed keys"
            msg += f" under '{'.'.join(map(str, loc[:-1]))}'" if len(loc) > 1 else ""
            msg += f": {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = f"'{path}' is required"
        elif e["type"] in ("model_option", "unused_option"):
            msg = f"'{path}': {ctx['message']}"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f" (got {_short(got)})"
            text = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's message
            msg = f"'{path}': {text}{shown}" if path else f"{text}{shown}"
        if grid_key:
            msg += " [value from grid]"
        msgs.append(f"{at}: {f'arm {arm_id}: ' if arm_id else ''}{msg}")
    return "\n".join(msgs)
