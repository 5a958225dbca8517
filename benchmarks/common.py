"""What the benchmark scripts share: flag parsing, config loading and overrides.

Every script defines its flags in a function `define_flags(flag_values, argv)`
and parses them with `parse_flags`. A config is loaded the way
`distill_jax/main.py` loads it (`--config=FILE[:variants]`, then
`--config.KEY=VALUE` overrides, by `ml_collections.config_flags`), and values
given some other way (search.py's grid points) go through the same parser with
`apply_overrides`: one grammar for every script.
"""

import copy
import logging
import sys
from collections.abc import Callable, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

# Deliberately light (absl and ml_collections only): large_catalog.py's
# memory-measuring workers import it before anything else.

DefineFlags = Callable[[flags.FlagValues, Sequence[str]], None]


def parse_flags(argv: Sequence[str], define: DefineFlags, doc: str = "") -> flags.FlagValues:
    """Defines a script's flags in a fresh FlagValues and parses `argv` into it.

    A FlagValues of its own (not absl's global FLAGS) lets one process import
    several scripts whose flags share names (`--workdir`, `--seeds`) and run a
    script's `main` more than once, as the tests do.

    Args:
      argv: the command line, program name first (`sys.argv`).
      define: `define(flag_values, argv)` defines the script's flags;
        `argv` is what the config flag reads its `--config.KEY` overrides from.
      doc: printed above the flags by `--help` (the script's docstring).

    Returns:
      The parsed flags (`flag_values.config`, `flag_values.workdir`, ...).

    Raises:
      SystemExit: after `--help`, or for a flag that is unknown, missing or
        malformed, with a message naming it and what it expected.
    """
    argv = list(argv)
    flag_values = flags.FlagValues()
    define(flag_values, argv)
    if any(a in ("-h", "-help", "--help", "--helpfull") for a in argv[1:]):
        print(doc)
        print(flag_values.get_help())
        sys.exit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        sys.exit(f"{argv[0]}: {e} (--help lists the flags)")
    except (AttributeError, KeyError) as e:
        # config_flags reports a --config.KEY the config does not have as a
        # bare AttributeError/KeyError naming only the last part of KEY.
        overrides = [a for a in argv[1:] if a.lstrip("-").startswith("config.")]
        sys.exit(
            f"{argv[0]}: a --config.KEY override names no key of the config ({e} in "
            f"{overrides}); every key is declared in configs/base.py"
        )
    if len(rest) > 1:
        sys.exit(f"{argv[0]}: unexpected arguments {rest[1:]}; every setting is a --flag=value")
    return flag_values


def config_args(argv: Sequence[str]) -> list[str]:
    """The `--config` and `--config.KEY` flags of `argv`, as `--flag=value`.

    For a script that runs the main job (`python -m distill_jax.main`) in a
    process of its own with the config it was given.
    """
    out, args = [], list(argv[1:])
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name in ("--config", "-config") or name.lstrip("-").startswith(("config.", "noconfig.")):
            if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("-"):
                # `--config FILE` (a bare `--config.FLAG` is a boolean set to true).
                a = f"{a}={args[i + 1]}"
                i += 1
            out.append("--" + a.lstrip("-"))
        i += 1
    return out


def main_job_command(argv: Sequence[str], overrides: Sequence[str], workdir: str) -> list[str]:
    """`python -m distill_jax.main` with the config of `argv`, then `overrides`, in `workdir`.

    `overrides` are further `--config.KEY=VALUE` flags (they win over `argv`'s);
    `--fresh` moves earlier work in `workdir` aside, so every stage runs anew.
    """
    return [
        sys.executable,
        "-m",
        "distill_jax.main",
        *config_args(argv),
        *overrides,
        f"--workdir={workdir}",
        "--fresh",
    ]


def define_config(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """`--config=FILE[:variants]` (required) and its `--config.KEY=VALUE` overrides."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file[:variants], as for distill_jax.main; then --config.KEY=VALUE overrides.",
        flag_values=flag_values,
        sys_argv=list(argv),
    )
    flags.mark_flag_as_required("config", flag_values)


def _key_exists(config: ml_collections.ConfigDict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, str], flag: str
) -> ml_collections.ConfigDict:
    """A copy of `config` with `overrides` applied by config_flags' own rules.

    Each `KEY: TEXT` is parsed exactly as `--config.KEY=TEXT` would be on the
    command line (by `ml_collections.config_flags`): the text takes the type of
    the field it replaces, booleans read true/false (or 1/0), tuples a Python
    literal such as `(5, 10)`. `config` itself is left unchanged.

    Args:
      config: the config to start from.
      overrides: dotted config key to the text of its new value, applied in order.
      flag: the command-line flag the values came from, for error messages.

    Returns:
      The new config (locked, like a config loaded by `--config`).

    Raises:
      ValueError: a key the config does not have, or a text its field's type
        does not accept; the message names the flag, key and value.
    """
    for key, text in overrides.items():
        if not _key_exists(config, key):
            raise ValueError(
                f"{flag} {key}={text}: the config has no key {key!r} "
                "(every key is declared in configs/base.py)"
            )
    argv = ["apply_overrides"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", copy.deepcopy(config), flag_values=flag_values, sys_argv=argv
    )
    try:
        flag_values(argv)
    except flags.Error as e:
        raise ValueError(f"{flag}: {e}") from None
    return flag_values.config


def log_progress() -> None:
    """The pipeline's progress (INFO) on stdout; other libraries' only from WARNING."""
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
    logging.getLogger("distill_jax").setLevel(logging.INFO)


def data_and_mesh(config: ml_collections.ConfigDict):
    """The data (prepared in a temporary directory), the mesh and the sharding rules.

    What a script that times steps outside a workdir needs.
    """
    import tempfile

    from distill_jax import sharding
    from distill_jax.data import dataset

    with tempfile.TemporaryDirectory() as work:
        data = dataset.load(config, work)
    return data, sharding.make_mesh(config.mesh), sharding.rules(config)
