"""No load path unpickles: the run's files are read with pickle made to fail.

A pickle runs code of whoever wrote the file, so nothing the main job reads
back may be one: the dataset (ArrayRecord + JSON), the checkpoints (Orbax:
tensorstore + JSON), the soft labels (ArrayRecord), feature matrices
(`np.load(..., allow_pickle=False)`) and the exported artefact (StableHLO,
an .npz without objects, JSON). The module runs the tiny main job once on an
S3-Rec file, then reads everything back in this process with `pickle.load`,
`pickle.loads`, `pickle.Unpickler` and numpy's `allow_pickle=True` raising.
"""

import _pickle
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import synthetic
from distill_jax import pipeline, recommend
from distill_jax.data import dataset as dataset_lib
from distill_jax.data import features, soft_labels
from distill_jax.data import synthetic as synthetic_data
from distill_jax.data.types import DataError

STAGES = "teacher,soft_labels,student_kd,export"


def _config(data_path: Path):
    config = synthetic.get_config("tiny,cached")
    config.data.source = "s3rec"
    config.data.path = str(data_path)
    config.stages = STAGES
    config.export.model = "student_kd"
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(the S3-Rec file, the workdir of a finished main job on it)."""
    root = tmp_path_factory.mktemp("no_pickle")
    config = synthetic.get_config("tiny")
    data = synthetic_data.generate(config.data.synthetic, config.seed)
    path = root / "Toy.txt"
    path.write_text(
        "".join(f"{u} {' '.join(map(str, s))}\n" for u, s in enumerate(data.sequences, 1))
    )
    work = root / "run"
    cmd = [
        sys.executable,
        "-m",
        "distill_jax.main",
        "--config=configs/synthetic.py:tiny,cached",
        "--config.data.source=s3rec",
        f"--config.data.path={path}",
        f"--config.stages={STAGES}",
        "--config.export.model=student_kd",
        f"--workdir={work}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return path, work


class Unpickled(AssertionError):
    """Raised instead of unpickling."""


def _refuse(*args, **kwargs):
    raise Unpickled("a load path tried to unpickle")


class _RefusingUnpickler:
    def __init__(self, *args, **kwargs):
        _refuse()


@pytest.fixture
def no_pickle(monkeypatch):
    """pickle.load/loads/Unpickler and np.load(allow_pickle=True) raise `Unpickled`."""
    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", _refuse)
        monkeypatch.setattr(module, "loads", _refuse)
        monkeypatch.setattr(module, "Unpickler", _RefusingUnpickler)
    np_load = np.load

    def load(*args, allow_pickle=False, **kwargs):
        if allow_pickle:
            _refuse()
        return np_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", load)


def test_the_guard_catches_pickles(tmp_path, no_pickle):
    with pytest.raises(Unpickled):
        pickle.loads(pickle.dumps({"a": 1}))
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(Unpickled):
        np.load(path, allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):  # np.load refuses by default
        np.load(path)


def test_every_load_path_of_a_finished_run_reads_without_pickle(run, tmp_path, no_pickle):
    path, finished = run
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    # The distillation stage has its checkpoint but no result: the run resumes
    # it (state, best params, meta and the data iterator's position), reads
    # the soft labels, evaluates, and exports again.
    (work / "student_kd" / "result.json").unlink()
    shutil.rmtree(work / "export")
    config = _config(path)
    report = pipeline.run(config, str(work))
    assert report is None  # no report stage; what counts is that it ran through
    assert json.loads((work / "student_kd" / "result.json").read_text())["metrics"]["test"]
    # The dataset comes from its ArrayRecord cache, not the raw file.
    data = dataset_lib.load(config, str(work))
    assert data.split.num_items > 0
    assert any((work / "data").rglob("*.array_record*"))
    # The soft labels, read directly.
    fingerprint = json.loads((work / "soft_labels" / "result.json").read_text())
    labels = soft_labels.SoftLabels(
        soft_labels.directory(str(work)), fingerprint["fingerprint"], in_memory_bytes=0
    )
    assert labels.k == config.distill.cache_k
    # The exported artefact.
    served = recommend.load(str(work / "export"))
    history = [str(data.item_id_to_original[i]) for i in data.split.full[0][:3]]
    got = served.recommend(history)
    assert not got.fallback and len(got.items) == config.export.top_k


def test_feature_matrices_load_without_pickle(tmp_path, no_pickle):
    path = tmp_path / "emb.npy"
    np.save(path, np.eye(2, dtype=np.float32))
    features.vectors_ids_path(path).write_text("7\n8\n")
    got = features.read_vectors(path)
    assert sorted(got) == [7, 8]
    # A matrix of objects would need unpickling: refused as bad data, never loaded.
    np.save(path, np.array([[1.0, "x"]], dtype=object), allow_pickle=True)
    features.vectors_ids_path(path).write_text("7\n")
    with pytest.raises(DataError, match="not a NumPy .npy matrix"):
        features.read_vectors(path)


def test_no_module_loads_with_pickle():
    """The source holds no pickle, joblib, torch.load or allow_pickle=True at all."""
    root = Path(__file__).resolve().parents[1]
    words = ("import pickle", "cPickle", "joblib", "torch.load", "allow_pickle=True", "dill")
    found = []
    for folder in ("distill_jax", "benchmarks", "configs"):
        for file in sorted((root / folder).rglob("*.py")):
            text = file.read_text(encoding="utf-8")
            found += [f"{file.relative_to(root)}: {w}" for w in words if w in text]
            for line in text.splitlines():
                if "np.load(" in line and "allow_pickle=False" not in line:
                    found.append(f"{file.relative_to(root)}: {line.strip()}")
    assert not found, found
