"""Config dataclasses from plain dicts (config.json, YAML): one rule for every config in the package.

Every key must be a field: an unknown one is refused with its dotted name (`prompt.usr`,
`trainer.max_stepz`), never dropped. Nested dataclass fields are built the same way; lists become
tuples for tuple fields, and ints or numeric strings ('2e-5': YAML 1.1 floats need a dot) become
floats for float fields; an int field takes only an integer (a damaged config.json is refused here,
not deep inside a layer's constructor). Upstream dialects (a Hugging Face config.json, a NeMo model config) are
read by each config's from_hf / from_nemo instead, which pick the fields they know on purpose.
"""
import dataclasses
import types
import typing


def refuse_unknown(d: dict, known, where: str = "") -> None:
    """ValueError naming every key of `d` that is not in `known`."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(f'{where}{k}' for k in unknown)}")


def build(cls, d, where: str = ""):
    """A (nested) dataclass from a dict, checking every key; errors name the dotted key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    refuse_unknown(d, [f.name for f in dataclasses.fields(cls)], where)
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_in(hints[k])
        if sub is not None and v is not None:
            kwargs[k] = build(sub, v, f"{where}{k}.")
            continue
        try:
            kwargs[k] = _coerce(hints[k], v)
        except ValueError as e:
            raise ValueError(f"{where}{k}: {e}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where.rstrip('.') or 'config'}: {e}") from None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(where.split(".")[0]) else f"{where}{e}") from None


def _coerce(hint, v):
    """YAML lists -> tuples for tuple fields; numbers written as '2e-5' (PyYAML reads a string:
    YAML 1.1 floats need a dot) or 1 -> float for float fields."""
    hint = _strip_none(hint)
    if isinstance(v, list) and typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, x) for x in v)
    if hint is float and isinstance(v, (int, str)) and not isinstance(v, bool):
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"expected a number, got {v!r}") from None
    if hint is int and v is not None and not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _strip_none(hint):
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _dataclass_in(hint):
    hint = _strip_none(hint)
    return hint if dataclasses.is_dataclass(hint) else None
