"""The notebooks of notebooks/: stored clean, and each one runs on its tiny settings.

Each notebook is executed headless with nbclient (kernel `python3`, in the
notebooks folder) after a cell inserted right below its `parameters` cell
(the papermill convention) that overrides the parameters: tiny configs, a
temporary WORKDIR, the shared data sets. A cell that raises fails the test
with that cell's source and error. With DISTILL_JAX_NOTEBOOKS_OUT set to a
folder, the executed notebooks are written there (to read their outputs).
"""

import ast
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DATASETS = Path(os.environ.get("DISTILL_JAX_DATASETS", REPO.parent / "shared" / "datasets"))
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the terminal colours of kernel tracebacks
# Each cell's limit in seconds; a notebook's tiny run takes 15-75 s on 2 cores.
CELL_TIMEOUT = 300
# ML-100K's tiny variant, cut further: one batch shape per stage, 10 steps, a
# 20-item window, 100 validation users, one latency measurement.
ML100K_CUTS = {
    "data.fixed_shapes": True,
    "teacher.num_steps": 10,
    "student.num_steps": 10,
    "teacher.max_len": 20,
    "student.max_len": 20,
    "eval.every_steps": 10,
    "checkpoint.every_steps": 10,
    "eval.max_valid_users": 100,
    "eval.latency_batch_sizes": (1,),
    "eval.latency_repeats": 1,
}


def _parameters(tmp_path: Path) -> dict[str, dict]:
    """The parameters each notebook runs with here; one not listed runs on its defaults."""
    return {
        "quickstart": {"VARIANT": "tiny", "WORKDIR": str(tmp_path / "quickstart")},
        "real_data": {
            "DATASET": "ml100k",
            "DATA_PATH": str(DATASETS / "ml-100k"),
            "DOWNLOAD": False,
            "VARIANT": "tiny",
            "OVERRIDES": ML100K_CUTS,
            "WORKDIR": str(tmp_path / "real_data"),
        },
        # A missing artefact: the notebook makes its own in WORKDIR.
        "serve": {"ARTIFACT": str(tmp_path / "absent"), "WORKDIR": str(tmp_path / "serve")},
    }


def _parameters_cell(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged 'parameters', found {len(found)}"
    return found[0]


def _assigned(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def _kernel_env() -> dict[str, str]:
    """The test process's XLA/JAX settings (tests/conftest.py), on one CPU device.

    One device compiles each train step faster than conftest's 8 virtual ones
    (as tests/test_pipeline.py's subprocess does); the persistent compilation
    cache is shared with the rest of the session. Progress shows as log lines.
    """
    return dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=1"),
        JAX_PLATFORMS="cpu",
        DISTILL_JAX_PROGRESS="log",
    )


def _failure(name: str, nb, error: Exception) -> str:
    """The failing cell's source and its error, without terminal colours."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                trace = ANSI.sub("", "\n".join(out.get("traceback", [])))
                streams = "".join(o.get("text", "") for o in cell.outputs if "text" in o)
                return (
                    f"{name}: cell {i} raised {out['ename']}: {out['evalue']}\n"
                    f"--- source ---\n{cell.source}\n--- output (tail) ---\n{streams[-3000:]}"
                    f"\n--- traceback ---\n{trace[-6000:]}"
                )
    return f"{name}: {type(error).__name__}: {ANSI.sub('', str(error))[-6000:]}"


def test_there_are_notebooks():
    assert {p.stem for p in PATHS} >= {"quickstart", "real_data", "serve"}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    params = nb.cells[_parameters_cell(nb)]
    assert params.cell_type == "code"
    # Every parameter this test overrides is one the notebook declares.
    missing = set(_parameters(tmp_path).get(path.stem, {})) - _assigned(params.source)
    assert not missing, f"{path.name}: the parameters cell does not set {sorted(missing)}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    params = _parameters(tmp_path).get(path.stem, {})
    if path.stem == "real_data" and not (DATASETS / "ml-100k").is_dir():
        pytest.skip(
            f"{DATASETS / 'ml-100k'} is absent (set DISTILL_JAX_DATASETS to the datasets folder)"
        )
    nb = nbformat.read(path, as_version=4)
    lines = ["# Inserted by tests/test_notebooks.py: the test's settings."]
    lines += [f"{key} = {value!r}" for key, value in params.items()]
    nb.cells.insert(_parameters_cell(nb) + 1, nbformat.v4.new_code_cell("\n".join(lines)))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    t0 = time.time()
    try:
        client.execute(env=_kernel_env())
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(_failure(path.name, nb, e), pytrace=False)
    finally:
        if out := os.environ.get("DISTILL_JAX_NOTEBOOKS_OUT"):
            os.makedirs(out, exist_ok=True)
            nbformat.write(nb, os.path.join(out, path.name))
    print(f"{path.name}: {time.time() - t0:.1f} s")
