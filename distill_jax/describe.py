"""Every config key with its value, its type and its one-line meaning.

python -m distill_jax.describe [--config=configs/ml100k.py:tiny] [--config.student.embed_dim=8]
    [--match=distill] [--format=table|json]

The meanings live in configs/base.py, one per key, as a `#:` comment trailing
the key's assignment (`c.embed_dim = 64  #: Width D of ...`) or, where the
assignment leaves no room in 100 columns, alone on the line just above it.
This is Sphinx's mark for attribute doc comments. We chose it over a table of
meanings kept apart from the values (a dict, or help strings in the ConfigDict)
because such a table repeats every key name and drifts from the assignments;
a `#:` sits next to the value a reader is looking at, leaves plain `#` comments
free for the longer why, and reads back without ambiguity: `tokenize` finds the
comments and `ast` the assignments they belong to. An assignment
`config.X = f(...)` of another function of base.py mounts that function's keys
under X, so `model_config()`'s `c.embed_dim` gives `teacher.embed_dim` and
`student.embed_dim` their one meaning.

This module also holds what the command lines share about config keys: their
dotted paths, the nearest ones to a misspelled key, and `check_config_flags`,
which refuses a `--config` that does not load or a `--config.KEY=VALUE` naming
no key with one message. It runs before the config flag is defined: without
`--config` on the command line, ml_collections loads the default file and
applies the overrides as the flag is defined, and stops with a KeyError
traceback at a misspelled key.
"""

import ast
import dataclasses
import difflib
import functools
import importlib.util
import io
import json
import os
import pathlib
import re
import sys
import tokenize
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = str(_CONFIGS / "synthetic.py")
BASE_FILE = _CONFIGS / "base.py"
_ROOT_FUNCTION = "get_base_config"
# `--config.a.b=1`, `--noconfig.a.b`, `-config.a.b 1` (the forms ml_collections reads).
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_SPEC = re.compile(r"^--?config(?:=(.*))?$")
_VALUE_WIDTH = 20  # Longer values take their own line, so the other columns stay aligned.


class DescribeError(ValueError):
    """A config or configs/base.py that cannot be described; the message names the place."""


@dataclasses.dataclass(frozen=True)
class Declaration:
    """Where configs/base.py assigns a key, and its `#:` meaning (None: it has none)."""

    line: int
    meaning: str | None


@dataclasses.dataclass(frozen=True)
class Row:
    """One key of a described config."""

    key: str
    value: Any
    type: str
    meaning: str


def key_paths(config: ml_collections.ConfigDict, sections: bool = False) -> list[str]:
    """Dotted paths of the config's keys (with `sections`, of its subtrees too)."""
    out = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            if sections:
                out.append(name)
            out.extend(f"{name}.{p}" for p in key_paths(value, sections))
        else:
            out.append(name)
    return out


def _doc_comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line -> (text, alone on its line) for every `#:` comment of `source`."""
    out, code_lines = {}, set()
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if tok.string.startswith("#:"):
                out[tok.start[0]] = (tok.string[2:].strip(), tok.start[0] not in code_lines)
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return out


def _dotted(node: ast.expr) -> list[str] | None:
    """`config.a.b` -> ['a', 'b'] (the root variable dropped); None for other targets."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and names else None


def read_declarations(source: str, filename: str = "configs/base.py") -> dict[str, Declaration]:
    """The keys `get_base_config()` assigns in `source`, each with its line and meaning.

    Args:
      source: the text of configs/base.py.
      filename: how messages name it.

    Returns:
      Dotted key path -> Declaration, sections (`config.data = ConfigDict()`)
      included, with the keys of mounted functions under their mount point.

    Raises:
      DescribeError: a `#:` meaning that belongs to no assignment, two meanings
        for one assignment or one key, or a meaning over several lines.
    """
    comments = _doc_comments(source)
    used: set[int] = set()
    functions = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    assigns: dict[str, list[tuple[list[str], ast.Assign, str | None]]] = {}
    for name, fn in functions.items():
        found = assigns[name] = []
        nodes = [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and len(n.targets) == 1]
        for node in sorted(nodes, key=lambda n: n.lineno):
            path = _dotted(node.targets[0])
            if path is None:
                continue
            trailing = [
                r
                for r in range(node.lineno, node.end_lineno + 1)
                if r in comments and not comments[r][1]
            ]
            above = node.lineno - 1
            above = [above] if above in comments and comments[above][1] else []
            where = f"{filename}:{node.lineno}"
            if above and node.lineno - 2 in comments and comments[node.lineno - 2][1]:
                raise DescribeError(
                    f"{where}: the `#:` meaning of {'.'.join(path)} spans several lines; "
                    "expected one line (longer explanations go in plain `#` comments)."
                )
            if len(trailing + above) > 1:
                raise DescribeError(
                    f"{where}: {'.'.join(path)} has {len(trailing + above)} `#:` meanings; "
                    "expected one, after the assignment or on the line above."
                )
            used.update(trailing + above)
            meaning = comments[(trailing + above)[0]][0] if trailing + above else None
            if meaning == "":
                raise DescribeError(f"{where}: the `#:` meaning of {'.'.join(path)} is empty.")
            found.append((path, node, meaning))
    orphans = sorted(set(comments) - used)
    if orphans:
        raise DescribeError(
            f"{filename}:{orphans[0]}: a `#:` meaning that belongs to no key assignment; "
            "expected it after `config.KEY = VALUE` or on the line just above it."
        )

    def mount(name: str, prefix: str, seen: tuple[str, ...]) -> dict[str, Declaration]:
        out: dict[str, Declaration] = {}
        for path, node, meaning in assigns[name]:
            key = prefix + ".".join(path)
            if key in out and out[key].meaning and meaning:
                raise DescribeError(
                    f"{filename}:{node.lineno}: a second `#:` meaning for {key} "
                    f"(the first is on line {out[key].line}); expected one per key."
                )
            if key not in out or meaning:
                out[key] = Declaration(node.lineno, meaning)
            value = node.value
            if (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id in functions
                and value.func.id not in seen
            ):
                out.update(mount(value.func.id, key + ".", (*seen, value.func.id)))
        return out

    return mount(_ROOT_FUNCTION, "", (_ROOT_FUNCTION,))


@functools.cache
def declarations() -> dict[str, Declaration]:
    """`read_declarations` of this checkout's configs/base.py."""
    return read_declarations(BASE_FILE.read_text(), "configs/base.py")


def meaning_problems(
    config: ml_collections.ConfigDict | None = None,
    decls: dict[str, Declaration] | None = None,
    filename: str = "configs/base.py",
) -> list[str]:
    """What stops every key of the base config from having exactly one meaning.

    Args:
      config: the base config (default: `get_base_config()`).
      decls: its declarations (default: those of configs/base.py).
      filename: how messages name base.py.

    Returns:
      One message per key without a `#:` meaning and per meaning of no key; empty if none.
    """
    if config is None:
        from configs import base

        config = base.get_base_config()
    decls = declarations() if decls is None else decls
    keys = key_paths(config)
    problems = []
    for key in keys:
        d = decls.get(key)
        if d is None:
            problems.append(
                f"{filename}: {key} is set without a `config.{key} = VALUE` assignment, "
                "so it has no `#:` meaning; expected one such assignment with its meaning."
            )
        elif d.meaning is None:
            problems.append(
                f"{filename}:{d.line}: {key} has no `#:` meaning; expected "
                "`#: <one line>` after its assignment or on the line just above it."
            )
    for key, d in decls.items():
        if key not in keys and d.meaning is not None:
            problems.append(
                f"{filename}:{d.line}: a `#:` meaning for {key}, which is no key (a section "
                "or a key get_base_config() drops); expected meanings on keys only."
            )
    return problems


def _type_name(value: Any) -> str:
    """`int`, `str`, ...; a tuple with its elements' types, e.g. `tuple[str | None, ...]`."""
    if not isinstance(value, tuple | list):
        return "None" if value is None else type(value).__name__
    if not value:
        return type(value).__name__
    if all(isinstance(v, tuple | list) for v in value):
        inner = _type_name(type(value)(x for v in value for x in v))
    else:
        names = {_type_name(v) for v in value}
        inner = " | ".join(sorted(names - {"None"}) + (["None"] if "None" in names else []))
    return f"{type(value).__name__}[{inner}, ...]"


def describe(config: ml_collections.ConfigDict, source: str = "the config") -> list[Row]:
    """One row per key of `config`, with the meaning configs/base.py gives it.

    Raises:
      DescribeError: a key configs/base.py does not declare (named with `source`).
    """
    decls, rows = declarations(), []
    for key in key_paths(config):
        if key not in decls:
            raise DescribeError(
                f"{source} sets {key}, which configs/base.py does not declare; "
                "variants override the base keys, never add any."
            )
        value = config[key]
        meaning = decls[key].meaning or f"(no `#:` meaning: configs/base.py:{decls[key].line})"
        rows.append(Row(key, value, _type_name(value), meaning))
    return rows


def format_table(rows: list[Row]) -> str:
    """Aligned columns KEY VALUE TYPE MEANING; a long value gets a line of its own."""
    if not rows:
        return ""
    values = [repr(r.value) for r in rows]
    wk = max(len("KEY"), *(len(r.key) for r in rows))
    wv = max([len("VALUE"), *(len(v) for v in values if len(v) <= _VALUE_WIDTH)])
    wt = max([len("TYPE"), *(len(r.type) for r in rows if len(r.type) <= _VALUE_WIDTH)])
    lines = [f"{'KEY':<{wk}}  {'VALUE':<{wv}}  {'TYPE':<{wt}}  MEANING"]
    for r, v in zip(rows, values, strict=True):
        key = r.key
        if len(v) > wv:
            lines.append(f"{key:<{wk}}  {v}")
            key = v = ""
        lines.append(f"{key:<{wk}}  {v:<{wv}}  {r.type:<{wt}}  {r.meaning}")
    return "\n".join(line.rstrip() for line in lines)


def format_json(rows: list[Row]) -> str:
    """{key: {value, type, meaning}}; tuples become lists."""
    return json.dumps(
        {r.key: {"value": r.value, "type": r.type, "meaning": r.meaning} for r in rows}, indent=1
    )


def _likeness(typed: str, name: str) -> float:
    """How much one name looks like another: 1 equal, 0.9 an abbreviation, else difflib's ratio."""
    if typed == name:
        return 1.0
    if len(typed) >= 3 and name.startswith(typed):
        return 0.9
    return difflib.SequenceMatcher(None, typed, name).ratio()


def nearest_keys(key: str, keys: list[str], n: int = 3) -> list[str]:
    """The valid keys most like `key`, best first; empty when none is close.

    A key of the same depth scores its least alike part (`studnet.embed_dim`
    is close to `student.embed_dim`, not to `teacher.embed_dim`); when none is
    close, keys ending in a part like `key`'s last one (a missing section:
    `embed_dim` -> `student.embed_dim`, `teacher.embed_dim`). Kept: at least
    0.6 and within 0.1 of the best.
    """
    parts = key.split(".")
    same_depth = [k for k in keys if k.count(".") == len(parts) - 1]
    scored = [
        (min(_likeness(a, b) for a, b in zip(parts, k.split("."), strict=True)), k)
        for k in same_depth
    ]
    if not any(score >= 0.6 for score, _ in scored):
        scored = [(_likeness(parts[-1], k.rsplit(".", 1)[-1]), k) for k in keys]
    scored.sort(key=lambda sk: (-sk[0], sk[1].count(".")))  # ties: the shallower key first
    best = scored[0][0] if scored else 0.0
    return [k for score, k in scored if score >= max(0.6, best - 0.1)][:n]


def unknown_key_message(flag: str, key: str, config: ml_collections.ConfigDict, source: str) -> str:
    """The message for `flag` (e.g. `--config.studnet.embed_dim=8`) naming no key of config."""
    near = [repr(k) for k in nearest_keys(key, key_paths(config, sections=True))]
    if len(near) > 1:
        hint = f"did you mean {', '.join(near[:-1])} or {near[-1]}?"
    elif near:
        hint = f"did you mean {near[0]}?"
    else:
        hint = "expected one of its keys."
    return (
        f"flag {flag}: {source} has no key {key!r}; {hint} "
        f"(python -m distill_jax.describe --config={source} lists them.)"
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config `FILE[:ARG]` names, as ml_collections loads it (`get_config(ARG)`)."""
    path, *arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_described_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise DescribeError(f"flag --config={spec}: no config file {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*arg)


def _shown(path: str) -> str:
    """A path as messages show it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_config_flags(argv: list[str], default: str = DEFAULT_CONFIG) -> None:
    """Fails with one message if `--config` does not load or a `--config.KEY` names no key.

    Call it before `config_flags.DEFINE_config_file` (see the module docstring).

    Args:
      argv: the command line, program name first.
      default: the config file when argv has no `--config`.

    Raises:
      SystemExit: the message, naming the flag, the file and the nearest valid keys.
    """
    try:
        argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except flags.Error:
        return  # absl reports a bad --flagfile itself.
    spec, overrides = _shown(default), []
    for i, arg in enumerate(argv[1:], 1):
        if m := _CONFIG_SPEC.match(arg):
            if m.group(1) is not None:
                spec = m.group(1)
            elif i + 1 < len(argv):
                spec = argv[i + 1]
        elif m := _OVERRIDE.match(arg):
            overrides.append((arg, m.group(1)))
    try:
        config = load_config(spec)
    except ValueError as e:  # DescribeError, and the variant errors of configs/*.py
        raise SystemExit(
            str(e) if isinstance(e, DescribeError) else f"flag --config={spec}: {e}"
        ) from None
    keys = set(key_paths(config, sections=True))
    source = spec.split(":", 1)[0]
    bad = [
        unknown_key_message(arg, path.split("[", 1)[0], config, source)
        for arg, path in overrides
        if path.split("[", 1)[0] not in keys
    ]
    if bad:
        raise SystemExit("\n".join(bad))


def run() -> None:
    """The command line. Its flags are defined here, so importing this module defines none."""
    # Without --config, defining the flag already loads the default file and applies the
    # --config.KEY overrides, so they are checked before it exists.
    check_config_flags(sys.argv)
    config_flag = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file[:variant] to describe."
    )
    match = flags.DEFINE_string("match", "", "Show only the keys containing this substring.")
    fmt = flags.DEFINE_enum("format", "table", ["table", "json"], "Output format.")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; filter with --match=TEXT.")
        source = _shown(config_flags.get_config_filename(flags.FLAGS["config"]))
        try:
            rows = describe(config_flag.value, source)
        except DescribeError as e:
            raise SystemExit(str(e)) from None
        rows = [r for r in rows if match.value in r.key]
        if not rows:
            raise SystemExit(f"flag --match={match.value}: no key of {source} contains it.")
        print(format_table(rows) if fmt.value == "table" else format_json(rows))

    app.run(main)


if __name__ == "__main__":
    run()
