"""What every config section shares: the error type, strict parsing, and the unused-option check."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


class Strict(BaseModel):
    # extra="forbid": a misspelt key must fail loudly, never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

def _refuse_unused(section: BaseModel, used_by: dict[str, tuple[str, ...]]) -> None:
    """Refuses a field away from its default that the chosen ``name`` ignores (an arm identical to the
    default one would be trained and recorded as different)."""
    for field, names in used_by.items():
        value, default = getattr(section, field), type(section).model_fields[field].default
        if section.name not in names and value != default:
            raise PydanticCustomError(
                "unused_option", "{message}",
                {"message": f"'{field}: {value}' has no effect with name '{section.name}' (used by "
                            f"{' and '.join(names)} only); remove it, or bundle it with its name in one grid value",
                 "option": field})
