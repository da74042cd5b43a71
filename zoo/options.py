"""Checks a model's options before anything is built (TensorFlow-free): every option of the builder, of
its activation and of its initializer, by name, type, range, and whether the chosen function uses it.

:func:`check_model` is what ``zoo.check_options`` and the config layer call; the data it checks against is
in :mod:`zoo.signatures` (names, types, defaults) and :mod:`zoo.schema` (ranges, choices, dependencies).
"""

from __future__ import annotations

from typing import Any

from zoo import schema
from zoo.registry import Registry, UnknownNameError, suggest
from zoo.rules import BadOptionError, Rule, type_problem
from zoo.signatures import BuilderSpec, Param, builders, factory_params


def spec(name: str) -> BuilderSpec:
    """The builder ``name``; unknown names fail listing the known ones."""
    specs = builders()
    if name not in specs:
        raise UnknownNameError("model", name, list(specs))
    return specs[name]


def check_model(name: str, opts: dict[str, Any]) -> None:
    """Raises :class:`BadOptionError` (or :class:`UnknownNameError` for an unknown model, activation,
    initializer or norm name, with ``.option`` set) for the first option ``name``'s builder cannot use.
    """
    builder = spec(name)
    allowed = builder.params
    for key in opts:
        if key not in allowed:
            raise BadOptionError(f"model '{name}' has no option '{key}'.{suggest(key, list(allowed))} "
                                 f"Options of {name}: {', '.join(sorted(allowed))}", option=key)
    for key, value in opts.items():
        _check_value(key, allowed[key].annotation, schema.rule(name, key), value)
    resolved = {k: opts.get(k, p.default) for k, p in allowed.items()}
    for key, (chooser, registry) in schema.SUB_OPTIONS.items():
        if key in allowed and opts.get(key):
            _check_sub_options(key, resolved.get(chooser), registry, opts[key])
    for need in schema.NEEDS:
        if need.option in allowed and need.other in allowed and need.option in opts \
                and opts[need.option] != allowed[need.option].default and not need.when(resolved[need.other]):
            raise BadOptionError(
                f"'{need.option}: {opts[need.option]}' has no effect with '{need.other}: {resolved[need.other]}' "
                f"(it needs {need.needed}); remove it, or bundle it with its {need.other} in one grid value",
                option=need.option)
    for check in schema.CHECKS.get(name, ()):
        found = check(resolved)
        if found:
            raise BadOptionError(found[1], option=found[0])


def _check_value(label: str, annotation: str, rule: Rule | None, value: Any) -> None:
    problem = type_problem(label, annotation, value)
    if problem is None and rule is not None:
        try:
            problem = rule.problem(label, value, numbers_too="float" in annotation or "int" in annotation)
        except UnknownNameError as err:
            err.option = label  # type: ignore[attr-defined]  # where the config layer points
            raise
    if problem:
        raise BadOptionError(problem, option=label)


def _check_sub_options(key: str, chosen: Any, registry: Registry, opts: Any) -> None:
    """``activation_options`` / ``initializer_options``: the keys the chosen function takes, valid values."""
    if not isinstance(chosen, str) or chosen not in registry:
        return  # the chooser's own check names the problem
    meta_rules = registry.meta(chosen).get("rules", {})
    params = factory_params(registry.get(chosen))
    for option, value in opts.items():
        label = f"{key}.{option}"
        if option not in params:
            takes = f"takes {', '.join(sorted(params))}" if params else "takes no options"
            raise BadOptionError(f"{registry.kind} '{chosen}' has no option '{option}' ({takes})."
                                 f"{suggest(str(option), list(params))}", option=label)
        _check_value(label, params[option].annotation, meta_rules.get(option), value)


def sub_options(registry: Registry, name: str) -> dict[str, Param]:
    """The options of a registered activation or initializer (for ``ablate zoo``)."""
    return factory_params(registry.get(name))
