"""YAML for configs, read defensively: bounded alias expansion and nesting, duplicate keys refused.

PyYAML's ``safe_load`` refuses Python objects but accepts three things that hurt a config tool: a "billion
laughs" document (a few lines of nested aliases that expand to 10^9 values: cheap for PyYAML, which shares
the objects, but every later copy, validation or error message expands them), nesting deep enough to
overflow Python's stack, and a key given twice (YAML keeps the last one, silently). :func:`load` composes
the document once, checks it, then constructs it, and returns each mapping key's line for error messages.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 200_000  # values after alias expansion (a 10,000-arm grid of 5-key bundles is ~100,000)
MAX_CHARS = 20_000_000  # characters of scalars after alias expansion
MAX_DEPTH = 50  # nesting levels (configs use fewer than 10)
_MERGE = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """YAML text that is malformed or unsafe to expand; the message names the source and line.

    Attributes:
        detail: the message without the location.
    """

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.detail = detail


def load(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parses one YAML document.

    Args:
        text: the YAML text.
        source: what to call it in messages (a file name, or ``--set 'key=value'``).

    Returns:
        ``(data, lines)``: the constructed value and ``{dotted mapping key: 1-based line}``.

    Raises:
        YAMLInputError: a syntax error, a duplicate key, aliases expanding past the limits, too deep nesting,
            or a tag that safe loading refuses (``!!python/object``).
    """
    _check_flow_depth(text, source)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLInputError(source, f"nested too deeply to parse (more than {MAX_DEPTH} levels allowed)") \
                from None
        except yaml.YAMLError as err:
            raise YAMLInputError(*_syntax(err, source)) from None
        if node is None:
            return None, {}
        _check_size(node, source)
        lines: dict[str, int] = {}
        _walk(node, "", source, lines, set())
        try:
            return loader.construct_document(node), lines
        except yaml.YAMLError as err:
            raise YAMLInputError(*_syntax(err, source)) from None
    finally:
        loader.dispose()


def _check_flow_depth(text: str, source: str, limit: int = 2 * MAX_DEPTH) -> None:
    """Refuses ``[[[[...`` nested past ``limit`` before PyYAML scans it (its scanner is quadratic in the
    flow depth: 3000 levels take seconds, then overflow the stack). Quoted text and comments are skipped;
    only a block scalar full of unmatched brackets could trip it."""
    depth = 0
    for number, line in enumerate(text.splitlines(), 1):
        quote = None
        for ch in line:
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                if depth > limit:
                    raise YAMLInputError(f"{source}:{number}", f"nested more than {MAX_DEPTH} levels deep")
            elif ch in "]}":
                depth = max(depth - 1, 0)


def _syntax(err: yaml.YAMLError, source: str) -> tuple[str, str]:
    mark = getattr(err, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return where, f"YAML syntax error: {problem}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_size(root: yaml.Node, source: str) -> None:
    """Counts values, scalar characters and depth after alias expansion, without expanding anything
    (each distinct node is visited once; an alias is a second reference to the same node)."""
    memo: dict[int, tuple[int, int, int]] = {}  # id -> (nodes, chars, depth)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = [memo[id(c)] for c in _children(node)]
            nodes = 1 + sum(k[0] for k in kids)
            chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(k[1] for k in kids)
            depth = 1 + max((k[2] for k in kids), default=0)
            memo[key] = (nodes, chars, depth)
            active.discard(key)
            line = node.start_mark.line + 1
            if nodes > MAX_NODES or chars > MAX_CHARS:
                raise YAMLInputError(
                    f"{source}:{line}", f"this YAML expands to more than {MAX_NODES:,} values or {MAX_CHARS:,} "
                    f"characters through its aliases (*name); a config never needs that many (an alias bomb?)")
            if depth > MAX_DEPTH:
                raise YAMLInputError(f"{source}:{line}", f"nested more than {MAX_DEPTH} levels deep")
            continue
        if key in memo:
            continue
        if key in active:
            raise YAMLInputError(f"{source}:{node.start_mark.line + 1}", "an alias refers to a value that contains "
                                 "it (a recursive structure); configs must be trees")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in memo)


def _walk(node: yaml.Node, prefix: str, source: str, lines: dict[str, int], seen: set[int]) -> None:
    """Records the line of every mapping key and refuses a key given twice in one mapping (both lines)."""
    if id(node) in seen:  # an alias: its keys were checked where the anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{prefix}[{i}]", source, {}, seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            continue
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
        line = key_node.start_mark.line + 1
        ident = (key_node.tag, name)
        if ident in first:
            under = f" under '{prefix}'" if prefix else ""
            raise YAMLInputError(f"{source}:{line}", f"duplicate key '{name}'{under} (first at line {first[ident]}): "
                                 f"YAML would keep only the last one; remove one of them")
        first[ident] = line
        path = f"{prefix}.{name}" if prefix else str(name)
        lines.setdefault(path, line)
        _walk(value_node, path, source, lines, seen)
