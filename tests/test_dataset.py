"""Real data through the main job's data path: counts, caching, clean failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import beauty, ml100k
from distill_jax.data import dataset, sources

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DISTILL_JAX_DATASETS", REPO.parent / "shared" / "datasets"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (set DISTILL_JAX_DATASETS to the datasets folder)")
    return path


def test_ml100k_counts(tmp_path):
    config = ml100k.get_config("tiny")
    config.data.path = str(_need(DATASETS / "ml-100k"))
    data = dataset.load(config, str(tmp_path))
    assert (data.info["users"], data.info["items"], data.info["interactions"]) == (
        943,
        1682,
        100_000,
    )
    assert data.info["steps"]["duplicates"]["removed_rows"] == 0
    assert len(data.split.test_targets) == 943
    # The TFDS dataset was built in WORKDIR/data and is reused by a second load.
    built = list((tmp_path / "data").rglob("dataset_info.json"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime
    dataset.load(config, str(tmp_path))
    assert built[0].stat().st_mtime == mtime


def test_beauty_counts(tmp_path):
    config = beauty.get_config("tiny")
    config.data.path = str(_need(DATASETS / "amazon-beauty" / "Beauty.txt"))
    data = dataset.load(config, str(tmp_path))
    assert (data.info["users"], data.info["items"], data.info["interactions"]) == (
        22_363,
        12_101,
        198_502,
    )


def test_cold_start_slices_are_evaluated(tmp_path):
    config = ml100k.get_config("tiny")
    config.data.path = str(_need(DATASETS / "ml-100k"))
    config.data.cold_user_fraction = 0.1
    config.data.cold_item_fraction = 0.05
    data = dataset.load(config, str(tmp_path))
    assert data.eval_splits == ("test", "valid", "cold_users", "cold_items")
    train_items = {int(i) for s in data.split.train for i in s}
    assert not train_items & {int(i) for i in data.split.cold_items}


def test_ml100k_tiny_main_job(tmp_path):
    path = _need(DATASETS / "ml-100k")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax.main",
            "--config=configs/ml100k.py:tiny",
            f"--config.data.path={path}",
            "--config.stages=popularity,report",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"]["interactions"] == 100_000
    assert list(report["dataset"]["steps"]) == [
        "read",
        "missing",
        "duplicates",
        "rating_threshold",
        "k_core",
        "short_users",
    ]
    assert report["models"]["popularity"]["metrics"]["test"]["users"] == 943


@pytest.mark.parametrize(
    "content,match",
    [
        ("1 2 3 4\n2 5 x 7\n", r"bad\.txt:2: expected an integer item id"),
        ("1 2 3 4\n2,5,6,7\n", r"bad\.txt:2: .*"),
        ("", r"bad\.txt: no interactions"),
    ],
)
def test_bad_input_stops_cleanly_and_leaves_no_dataset(tmp_path, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    config = beauty.get_config("tiny")
    config.data.path = str(bad)
    with pytest.raises(sources.DataError, match=match):
        dataset.load(config, str(tmp_path / "work"))
    # Nothing half-built that a later run could pick up.
    assert not list((tmp_path / "work").rglob("*.array_record*"))
    # After fixing the file, the same workdir builds and loads cleanly.
    bad.write_text("1 2 3 4\n2 5 6 7\n")
    data = dataset.load(config, str(tmp_path / "work"))
    assert data.info["interactions"] == 6


def test_missing_path_names_the_key(tmp_path):
    config = beauty.get_config("tiny")
    with pytest.raises(sources.DataError, match="config.data.path"):
        dataset.load(config, str(tmp_path))
    config.data.path = str(tmp_path / "nope.txt")
    with pytest.raises(sources.DataError, match="nope.txt"):
        dataset.load(config, str(tmp_path))


def test_users_too_short_are_dropped_and_counted(tmp_path):
    f = tmp_path / "seqs.txt"
    f.write_text("1 1 2 3 4\n2 5 6 7\n3 7\n4 2 3 5\n")
    config = beauty.get_config("tiny")
    config.data.path = str(f)
    data = dataset.load(config, str(tmp_path / "w"))
    assert data.info["users"] == 3
    assert data.info["steps"]["short_users"]["removed_users"] == 1
