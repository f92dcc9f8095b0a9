"""Plain spec trees (nested dicts, before validation): dotted paths read and written, layers merged. No I/O here."""

from __future__ import annotations

from typing import Any


def deep_merge(base: dict, over: dict) -> dict:
    """`over` wins; nested dicts merge key by key; lists and scalars are replaced whole."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def get_path(tree: dict, dotted: str) -> Any:
    """The value at `a.b.c`, or None where the path does not exist."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c`, making (or replacing with) dicts on the way."""
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[keys[-1]] = value
