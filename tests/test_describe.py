"""Every config key has one meaning, and the command lines describe keys and refuse unknown ones."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

from configs import base
from distill_jax import describe

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "base")
)


def _variants(path: pathlib.Path) -> list[str | None]:
    """No variant, each one alone, and all of them together (one method variant at a time:
    'ensemble' and 'cached' exclude each other)."""
    known = importlib.import_module(f"configs.{path.stem}").VARIANTS
    together = [",".join(v for v in known if v != other) for other in ("cached", "ensemble")]
    return [None, *known, *together]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_every_base_key_has_exactly_one_meaning():
    # A key added to configs/base.py without a `#:` one-liner fails here, naming its line.
    assert describe.meaning_problems() == []
    decls = describe.declarations()
    keys = describe.key_paths(base.get_base_config())
    assert all(decls[k].meaning for k in keys)


def test_model_config_gives_teacher_and_student_one_meaning():
    decls = describe.declarations()
    assert decls["teacher.embed_dim"] == decls["student.embed_dim"]
    assert decls["teacher.embed_dim"].meaning.startswith("Width D")
    # The longer block comments stay; the one-liner is only the `#:`.
    assert decls["teacher.item_rank"].meaning.startswith("Item table rank")


_SOURCE = """
def sub():
    c = ConfigDict()
    c.width = 4  #: Width.
    return c


def get_base_config():
    config = ConfigDict()
    # A longer explanation, which is not the meaning.
    #: Above its assignment.
    config.a = 1
    config.b = 2
    config.s = sub()
    return config
"""


def test_a_key_without_a_meaning_is_named_with_its_line():
    import ml_collections

    decls = describe.read_declarations(_SOURCE, "base.py")
    assert decls["a"].meaning == "Above its assignment."
    assert decls["s.width"].meaning == "Width."
    config = ml_collections.ConfigDict({"a": 1, "b": 2, "s": {"width": 4}, "c": 3})
    problems = describe.meaning_problems(config, decls, "base.py")
    assert len(problems) == 2
    assert problems[0].startswith("base.py:13: b has no `#:` meaning")
    assert "c is set without a `config.c = VALUE` assignment" in problems[1]
    decls = describe.read_declarations(
        _SOURCE.replace("= sub()", "= sub()  #: Section."), "base.py"
    )
    assert describe.meaning_problems(config, decls, "base.py")[2].startswith(
        "base.py:14: a `#:` meaning for s, which is no key"
    )


@pytest.mark.parametrize(
    "old,new,match",
    [
        ("    return config\n", "    #: Stray.\n    return config\n", r"base\.py:15: .*no key"),
        ("    config.b = 2\n", "    #: One.\n    config.b = 2  #: Two.\n", r"base\.py:14: b has 2"),
        ("    # A longer", "    #: A longer", r"base\.py:12: .* several lines"),
    ],
)
def test_misplaced_meanings_are_refused(old, new, match):
    with pytest.raises(describe.DescribeError, match=match):
        describe.read_declarations(_SOURCE.replace(old, new), "base.py")


@pytest.mark.parametrize(
    "path,variant",
    [(p, v) for p in CONFIG_FILES for v in _variants(p)],
    ids=lambda x: x.name if isinstance(x, pathlib.Path) else str(x),
)
def test_every_variant_of_every_config_file_describes(path, variant):
    config = importlib.import_module(f"configs.{path.stem}").get_config(variant)
    rows = describe.describe(config, f"configs/{path.name}")
    assert [r.key for r in rows] == describe.key_paths(base.get_base_config())
    assert all(r.meaning and not r.meaning.startswith("(no") for r in rows)
    assert describe.format_table(rows)
    json.loads(describe.format_json(rows))


def test_a_key_base_does_not_declare_is_refused():
    config = base.get_base_config()
    config.data.colour = "blue"
    with pytest.raises(describe.DescribeError, match=r"configs/x\.py sets data\.colour"):
        describe.describe(config, "configs/x.py")


def test_table_columns_are_aligned():
    rows = describe.describe(base.get_base_config())
    table = describe.format_table(rows).splitlines()
    col = table[0].index("MEANING")
    lines = iter(table[1:])
    for r in rows:
        line = next(lines)
        assert line.startswith(r.key + " ")
        if len(repr(r.value)) > 20:  # a long value: on its own line, the rest below it
            assert line.endswith(repr(r.value))
            line = next(lines)
        if len(r.type) > 20:  # so is a long type, pushing its meaning right
            assert line.endswith(f"{r.type}  {r.meaning}")
        else:
            assert line[col:] == r.meaning, line
    row = next(line for line in table if line.startswith("student.embed_dim "))
    assert row.split()[:3] == ["student.embed_dim", "16", "int"]


def test_type_names():
    assert describe._type_name(3) == "int"
    assert describe._type_name((5, 10)) == "tuple[int, ...]"
    assert describe._type_name((("a", "b"), ("c", None))) == "tuple[tuple[str | None, ...], ...]"


@pytest.mark.parametrize(
    "typed,expected",
    [
        ("studnet.embed_dim", ["student.embed_dim"]),
        ("student.embed_dimm", ["student.embed_dim"]),
        ("distill.temp", ["distill.temperature"]),
        ("evl.ks", ["eval.ks"]),
        ("studnet", ["student"]),
        ("embed_dim", ["student.embed_dim", "teacher.embed_dim", "click.student.embed_dim"]),
        ("zzzz", []),
    ],
)
def test_nearest_keys(typed, expected):
    keys = describe.key_paths(base.get_base_config(), sections=True)
    assert describe.nearest_keys(typed, keys) == expected


def test_check_config_flags_names_the_flag_file_and_nearest_key():
    argv = ["prog", "--config=configs/ml100k.py:tiny", "--config.student.embed_dimm=8"]
    with pytest.raises(SystemExit) as e:
        describe.check_config_flags(argv)
    assert str(e.value) == (
        "flag --config.student.embed_dimm=8: configs/ml100k.py has no key 'student.embed_dimm'; "
        "did you mean 'student.embed_dim'? "
        "(python -m distill_jax.describe --config=configs/ml100k.py lists them.)"
    )
    with pytest.raises(SystemExit, match=r"configs/synthetic\.py: unknown variant 'huge'"):
        describe.check_config_flags(["prog", "--config=configs/synthetic.py:huge"])
    with pytest.raises(SystemExit, match=r"no config file 'nope\.py'"):
        describe.check_config_flags(["prog", "--config=nope.py"])
    # Valid keys, sections, indexed tuples and --noBOOL pass.
    describe.check_config_flags(
        ["prog", "--config.student.embed_dim=8", "--config.eval.ks[0]=3", "--noconfig.data.k_core"]
    )


def test_cli_prints_value_type_and_meaning():
    out = _run(
        "distill_jax.describe",
        "--config=configs/ml100k.py:tiny",
        "--config.student.embed_dim=8",
        "--match=embed_dim",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["KEY", "VALUE", "TYPE", "MEANING"]
    student = next(line for line in lines if line.startswith("student.embed_dim"))
    assert student.split()[:3] == ["student.embed_dim", "8", "int"]
    assert "Width D of the item and position embeddings" in student
    assert all("embed_dim" in line for line in lines[1:])
    out = _run("distill_jax.describe", "--format=json", "--match=eval.ks")
    assert json.loads(out.stdout)["eval.ks"]["value"] == [5, 10, 20]


@pytest.mark.parametrize(
    "module,args",
    [
        ("distill_jax.describe", ["--config.studnet.embed_dim=8"]),
        ("distill_jax.main", ["--workdir=WORKDIR", "--config.studnet.embed_dim=8"]),
    ],
)
def test_cli_misspelled_key_is_one_message(module, args, tmp_path):
    out = _run(module, *(a.replace("WORKDIR", str(tmp_path / "w")) for a in args))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "flag --config.studnet.embed_dim=8: configs/synthetic.py has no key 'studnet.embed_dim'; "
        "did you mean 'student.embed_dim'? "
        "(python -m distill_jax.describe --config=configs/synthetic.py lists them.)"
    ]
    assert not (tmp_path / "w").exists()
