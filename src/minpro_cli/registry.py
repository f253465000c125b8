"""Plugin discovery through entry points, for built-ins and third-party packages alike.

Groups: `minpro.objectives`, `minpro.verifiers`, `minpro.samplers`. Each entry point names
a Pydantic model class: its fields are the plugin's options, and an instance is the
configured plugin (callable objective / verifier, sampler with `generate`).
"""

from __future__ import annotations

import difflib
import functools
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from minpro_cli.errors import PluginError
from minpro_cli.objectives import Objective

Kind = Literal["objectives", "verifiers", "samplers"]
KINDS: tuple[Kind, ...] = ("objectives", "verifiers", "samplers")
OWN_PACKAGE = "minpro"
REQUIRED_BASE: dict[Kind, type[BaseModel]] = {"objectives": Objective}


@dataclass(frozen=True)
class PluginEntry:
    kind: Kind
    name: str
    value: str  # "module:attr"
    package: str

    def load(self) -> type[BaseModel]:
        try:
            cls = _entry_point(self).load()
        except Exception as exc:  # any import-time failure of a plugin is the plugin's, not ours
            raise PluginError(
                f"{self.kind[:-1]} plugin '{self.name}' from package '{self.package}' failed to import "
                f"({type(exc).__name__}: {exc}); reinstall or uninstall that package"
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise PluginError(
                f"{self.kind[:-1]} plugin '{self.name}' from package '{self.package}' points at "
                f"{self.value}, which is not a Pydantic model class"
            )
        return cls


def _entry_point(entry: PluginEntry) -> EntryPoint:
    return EntryPoint(name=entry.name, value=entry.value, group=f"minpro.{entry.kind}")


def discover(kind: Kind) -> dict[str, PluginEntry]:
    """Installed plugins of one kind. A name registered twice keeps the built-in (or the first
    package seen) and warns, naming both packages: a plugin never silently replaces another.
    Scanning the installed distributions takes tens of ms, so it happens once per process and
    `sys.path` (what decides which distributions are installed)."""
    return dict(_discover(kind, tuple(sys.path)))


@functools.cache
def _discover(kind: Kind, search_path: tuple[str, ...]) -> dict[str, PluginEntry]:
    found: dict[str, PluginEntry] = {}
    eps = sorted(entry_points(group=f"minpro.{kind}"), key=lambda ep: _package(ep) != OWN_PACKAGE)
    for ep in eps:
        entry = PluginEntry(kind=kind, name=ep.name, value=ep.value, package=_package(ep))
        if ep.name in found:
            if found[ep.name].value != entry.value:
                warnings.warn(
                    f"{kind[:-1]} '{ep.name}' from package '{entry.package}' is ignored: the name "
                    f"is already provided by '{found[ep.name].package}'",
                    stacklevel=2,
                )
            continue
        found[ep.name] = entry
    return found


def _package(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def load_plugin(kind: Kind, name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate plugin `name` with validated options; errors name the plugin and option."""
    available = discover(kind)
    if name not in available:
        known = ", ".join(sorted(available)) or "none installed"
        raise PluginError(f"unknown {kind[:-1]} '{name}'; installed: {known}")
    cls = available[name].load()
    base = REQUIRED_BASE.get(kind)
    if base is not None and not issubclass(cls, base):
        raise PluginError(
            f"{kind[:-1]} plugin '{name}' from package '{available[name].package}' must subclass "
            f"{base.__module__}.{base.__name__} (it gives the plugin the shared options and hooks)"
        )
    try:
        return cls(**(options or {}))
    except ValidationError as exc:
        raise PluginError(f"bad options for {kind[:-1]} '{name}': {format_validation_error(exc, model=cls)}") from None


def format_validation_error(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line per problem: `dotted.key: message`; an unknown key of `model` (or of a section
    within it) with the known key it is closest to."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            close = closest_key(model, err["loc"]) if model is not None else None
            parts.append(f"unknown key '{key}'" + (f" (did you mean '{close}'?)" if close else ""))
        else:
            parts.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def closest_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The known key nearest to the unknown last element of `loc`, with the section path before it."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    for part in loc[:-1]:  # walk down the nested sections
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None


def load_objective(name: str, **options: Any) -> Objective:
    return load_plugin("objectives", name, options)


def load_verifier(name: str, **options: Any) -> Any:
    return load_plugin("verifiers", name, options)


def load_sampler(name: str, **options: Any) -> Any:
    return load_plugin("samplers", name, options)
