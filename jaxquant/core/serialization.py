"""JSON for the frozen configs: ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json``.

A config (:class:`~jaxquant.core.spec.QuantSpec`,
:class:`~jaxquant.core.dot_config.DotGeneralConfig`, ``jaxquant.nn.QuantRule``, ...) becomes a
dict with one key per dataclass field and JSON-safe values only: nested configs as their own
dicts, tuples as lists, enums by value. ``from_dict`` is the exact inverse (``cls.from_dict(
c.to_dict()) == c``) and runs the class's validation; an unknown key raises ``ValueError``, so
a typo in a hand-written file does not pass silently. Python's ``json`` writes floats with
``repr``, so a JSON round trip is exact too.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping
from typing import Any


def encode(value: Any) -> Any:
    """A JSON-safe form of ``value``: scalars as they are, enums by value, sequences as lists,
    configs by their ``to_dict()``.

    Raises:
      TypeError: for a value of another type.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(
        f"Cannot serialize {type(value).__name__} {value!r}; a config field must hold None, a "
        "bool, int, float, str, enum, a sequence of those, or a config with to_dict()."
    )


def fields_to_dict(obj: Any) -> dict[str, Any]:
    """``{field name: encode(value)}`` for every field of the dataclass ``obj``."""
    return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def fields_from_dict(
    cls: type, d: Mapping[str, Any], decoders: Mapping[str, Callable[[Any], Any]] | None = None
):
    """``cls(**d)``, with ``decoders[name]`` applied to each non-None value that has one.

    Raises:
      ValueError: if ``d`` is not a mapping or has a key that is not a field of ``cls``.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}.")
    decoders = decoders or {}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} keys {unknown}; known: {names}. Fix or remove them."
        )
    return cls(
        **{k: decoders[k](v) if k in decoders and v is not None else v for k, v in d.items()}
    )


def as_tuple(v: Any) -> tuple:
    """Decoder of a tuple field (JSON has only lists)."""
    return tuple(v)


class JsonConfig:
    """Mixin of ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for a frozen config
    dataclass. A subclass whose fields hold other configs or tuples names their decoders in
    :meth:`_decoders`."""

    @classmethod
    def _decoders(cls) -> Mapping[str, Callable[[Any], Any]]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict, one key per field (nested configs as dicts)."""
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The inverse of :meth:`to_dict`; validates like the constructor."""
        return fields_from_dict(cls, d, cls._decoders())

    def to_json(self, **kwargs) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        """The inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
