"""What every start-up config check shares: the error, its message, the stage names.

`config_lib` and `config_distill` both build on these; neither imports the
other's callers, so the checks stay import-light (no jax, no models).
"""

import re
from typing import Any

import ml_collections

# Extra teachers of an ensemble: stage 'teacher_<n>', seed config.seed + n.
EXTRA_TEACHER = re.compile(r"^teacher_([1-9][0-9]*)$")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what was expected."""


def _expect(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: expected {expected}.")


def _positive_int(cfg: ml_collections.ConfigDict, prefix: str, *names: str) -> None:
    for name in names:
        value = cfg[name]
        _expect(isinstance(value, int) and value > 0, f"{prefix}.{name}", value, "an integer > 0")
