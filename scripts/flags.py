"""Checks of configuration values that the command line can get subtly wrong."""

from __future__ import annotations


def require_bool(value, key: str) -> bool:
    """Return ``value`` if it is a bool, else explain how to write one.

    `python -m monai.bundle` parses ``--key True`` / ``--key False`` as booleans but ``--key false`` as the
    string ``"false"``, which Python treats as true; this turns that mistake into an error.

    Raises:
        ValueError: ``value`` is not a bool; the message names the configuration key.
    """
    if not isinstance(value, bool):
        raise ValueError(
            f"{key} must be True or False, got {value!r}; on the command line write --{key} True or --{key} False"
        )
    return value
