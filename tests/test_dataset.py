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
    config.data.cold_valid_fraction = 0.5
    held = dataset.load(config, str(tmp_path))
    assert held.eval_splits == (
        "test",
        "valid",
        "cold_users",
        "cold_users_valid",
        "cold_items",
        "cold_items_valid",
    )
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


def _interactions_config(path: Path, **data):
    config = ml100k.get_config("tiny")
    config.data.update(source="interactions", path=str(path), **data)
    return config


def _write_log(path: Path, users: int = 40, seed: int = 0) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,timestamp"]
    for u in range(users):
        for t in range(int(rng.integers(4, 12))):
            rows.append(f"u{u},i{int(rng.integers(0, 30))},{1000 * t + u}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _same_dataset(a: dataset.Dataset, b: dataset.Dataset) -> None:
    import numpy as np

    assert a.info == b.info and a.eval_splits == b.eval_splits
    for split in a.eval_splits:
        (ha, ta), (hb, tb) = a.split.eval_examples(split), b.split.eval_examples(split)
        np.testing.assert_array_equal(ta, tb)
        assert len(ha) == len(hb) and all(np.array_equal(x, y) for x, y in zip(ha, hb, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.split.train, b.split.train, strict=True))


@pytest.mark.parametrize("cold", [False, True])
def test_a_current_cache_reads_no_raw_file_and_gives_the_same_data(tmp_path, monkeypatch, cold):
    extra = {"cold_user_fraction": 0.1, "cold_item_fraction": 0.1} if cold else {}
    config = _interactions_config(_write_log(tmp_path / "log.csv"), **extra)
    fresh = dataset.load(config, str(tmp_path / "work"))

    def refuse(*args, **kwargs):
        raise AssertionError("the raw files were read or cleaned")

    monkeypatch.setattr(sources, "read_source", refuse)
    monkeypatch.setattr(dataset.preprocess, "preprocess", refuse)
    cached = dataset.load(config, str(tmp_path / "work"))
    _same_dataset(fresh, cached)
    if cold:
        assert "cold_users" in cached.eval_splits
    # Touched, same contents: the hash matches, still no read.
    os.utime(tmp_path / "log.csv", ns=(1, 1))
    _same_dataset(fresh, dataset.load(config, str(tmp_path / "work")))


def test_the_cache_keeps_id_mappings_and_features(tmp_path):
    from distill_jax.data import builders, cache, preprocess

    config = _interactions_config(_write_log(tmp_path / "log.csv"))
    dataset.load(config, str(tmp_path / "work"))
    raw = sources.read_source("interactions", tmp_path / "log.csv", delimiter=",")
    want = preprocess.preprocess(raw, min_user_interactions=3)
    (name,) = os.listdir(tmp_path / "work" / "data" / "sequences")
    data, ts = builders.read(name, tmp_path / "work" / "data")
    got = cache.processed(builders.metadata(name, tmp_path / "work" / "data"), data, ts)
    assert got.item_id_to_original.tolist() == want.item_id_to_original.tolist()
    assert got.user_original_to_id == want.user_original_to_id
    assert got.item_original_to_id == want.item_original_to_id
    assert got.stats == want.stats and list(got.stats) == list(want.stats)
    assert got.item_features == want.item_features


def test_changed_contents_or_options_rebuild(tmp_path, monkeypatch):
    log = _write_log(tmp_path / "log.csv")
    config = _interactions_config(log)
    first = dataset.load(config, str(tmp_path / "work"))
    calls = []
    real = sources.read_source
    monkeypatch.setattr(sources, "read_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    _write_log(log, users=30, seed=1)
    changed = dataset.load(config, str(tmp_path / "work"))
    assert calls and changed.info["users"] != first.info["users"]
    config.data.k_core = 2
    dataset.load(config, str(tmp_path / "work"))
    assert len(calls) == 2
