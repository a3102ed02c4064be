"""Settings sections: each component owns a small frozen section; processes compose them.

A section is a pydantic model with `extra="forbid"`. Its leaf fields are read from
`EDGEML_<SECTION PREFIX><NAME>` (the field's alias when it has one, else its name), so a
component's own vocabulary (`max_rows`) and the variable users set (`EDGEML_MAX_BATCH`) can
differ without a converter restating the default. A field whose type is itself a section is
composed: its fields are read under that section's prefix. A process's settings are one
section of sections; `from_environment` refuses any `EDGEML_*` name that no field declares.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

ENV_PREFIX = "EDGEML_"
S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """The base of every settings section: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Prepended to every leaf's variable name below `EDGEML_` (the module's is `module_`).
    env_prefix: ClassVar[str] = ""

    @classmethod
    def environment_names(cls) -> dict[str, tuple[str, ...]]:
        """Every variable this section reads -> the field path it fills."""
        names: dict[str, tuple[str, ...]] = {}
        for variable, path in _leaves(cls, cls.env_prefix, ()):
            if variable in names:  # two sections would fight over one variable
                raise TypeError(f"{variable} is read by {names[variable]} and {path}")
            names[variable] = path
        return names

    @classmethod
    def from_environment(
        cls: type[S],
        environ: Mapping[str, str] = os.environ,
        *,
        overrides: Mapping[str, object] = MappingProxyType({}),
        defaults: Mapping[str, object] = MappingProxyType({}),
    ) -> S:
        """The section from `environ`; a misspelt `EDGEML_*` name is an error, not a default.

        Both mappings are keyed by variable name without `EDGEML_` (`http_port`): `overrides`
        (command-line flags) win over the environment, None leaving its value; `defaults`
        are a process's own defaults, used where the environment says nothing.
        """
        names = cls.environment_names()
        unknown = sorted(
            k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in names
        )
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]}; known: {', '.join(sorted(names))}")
        from_env = {
            k[len(ENV_PREFIX) :].lower(): v
            for k, v in environ.items()
            if k.upper().startswith(ENV_PREFIX)
        }
        values: dict[str, Any] = {}
        for layer in (defaults, from_env, overrides):
            for key, value in layer.items():
                variable = ENV_PREFIX + key.upper()
                if variable not in names:
                    raise ValueError(f"unknown setting {variable}")
                if value is not None:
                    _put(values, names[variable], value)
        return cls.model_validate(values)


def _leaves(
    section: type[Section], prefix: str, path: tuple[str, ...]
) -> Iterator[tuple[str, tuple[str, ...]]]:
    for name, info in section.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            yield from _leaves(kind, prefix + kind.env_prefix, (*path, name))
            continue
        variable = ENV_PREFIX + (prefix + (info.alias or name)).upper()
        yield variable, (*path, info.alias or name)


def _put(values: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        values = values.setdefault(key, {})
    values[path[-1]] = value
