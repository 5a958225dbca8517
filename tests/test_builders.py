"""The TFDS/ArrayRecord builder: round trip, caching by fingerprint, atomicity."""

import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from distill_jax.data import builders
from distill_jax.data.types import SequenceData


def _data(num_users: int = 7, num_items: int = 30, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    sequences = [
        rng.integers(1, num_items + 1, size=rng.integers(0, 12)).astype(np.int32)
        for _ in range(num_users)
    ]
    return SequenceData(num_items=num_items, sequences=sequences, name=f"toy(seed={seed})")


def _same(a: SequenceData, b: SequenceData) -> bool:
    return (
        a.num_items == b.num_items
        and a.name == b.name
        and len(a.sequences) == len(b.sequences)
        and all(
            x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in zip(a.sequences, b.sequences, strict=True)
        )
    )


def _incomplete_dirs(data_dir) -> list[str]:
    return [
        os.path.join(root, d)
        for root, dirs, _ in os.walk(data_dir)
        for d in dirs
        if d.startswith("incomplete.")
    ]


def test_round_trip_through_array_record(tmp_path):
    data = _data()
    timestamps = [
        np.arange(len(s), dtype=np.int64) * 1000 + u for u, s in enumerate(data.sequences)
    ]
    path = builders.build(
        data, name="toy", data_dir=tmp_path, fingerprint="f1", timestamps=timestamps
    )
    assert path == os.fspath(builders.dataset_dir("toy", tmp_path))
    assert _same(builders.load("toy", tmp_path), data)
    back, ts = builders.read("toy", tmp_path, fingerprint="f1")
    assert _same(back, data)
    assert all(
        np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(ts, timestamps, strict=True)
    )

    # The records are plain ArrayRecord files, in user order: grain's own
    # reader (no TFDS) finds one record per user.
    files = sorted(f for f in os.listdir(path) if ".array_record-" in f)
    assert files == ["sequences-users.array_record-00000-of-00001"]
    raw = grain.sources.ArrayRecordDataSource([os.path.join(path, f) for f in files])
    assert len(raw) == data.num_users
    assert "tensorflow" not in sys.modules


def test_without_timestamps_read_gives_none_and_metadata_round_trips(tmp_path):
    builders.build(
        _data(), name="toy", data_dir=tmp_path, fingerprint="f1", extra_metadata={"k": [1, "a"]}
    )
    assert builders.read("toy", tmp_path)[1] is None
    assert builders.metadata("toy", tmp_path)["k"] == [1, "a"]
    assert builders.metadata("other", tmp_path) is None


def test_fractional_timestamps_are_kept(tmp_path):
    data = _data()
    timestamps = [np.arange(len(s)) + 0.25 for s in data.sequences]
    builders.build(data, name="toy", data_dir=tmp_path, fingerprint="f1", timestamps=timestamps)
    _, ts = builders.read("toy", tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(ts, timestamps, strict=True))


def test_same_fingerprint_reuses_other_fingerprint_rebuilds(tmp_path):
    calls = []

    def make(seed):
        def produce():
            calls.append(seed)
            return _data(seed=seed)

        return produce

    builders.build(make(0), name="toy", data_dir=tmp_path, fingerprint="f0")
    builders.build(make(1), name="toy", data_dir=tmp_path, fingerprint="f0")
    assert calls == [0]  # Cached: the producer was not even called.
    assert _same(builders.load("toy", tmp_path), _data(seed=0))

    builders.build(make(1), name="toy", data_dir=tmp_path, fingerprint="f1")
    assert calls == [0, 1]
    assert _same(builders.load("toy", tmp_path, fingerprint="f1"), _data(seed=1))
    with pytest.raises(ValueError, match="fingerprint"):
        builders.load("toy", tmp_path, fingerprint="f0")


def _explode_after(monkeypatch, count: int) -> None:
    """Makes the builder's generator raise after `count` records."""
    original = builders.SequenceBuilder._generate_examples

    def exploding(self, data, timestamps):
        for i, example in enumerate(original(self, data, timestamps)):
            if i == count:
                raise RuntimeError("disk on fire")
            yield example

    monkeypatch.setattr(builders.SequenceBuilder, "_generate_examples", exploding)


def test_a_failed_build_leaves_no_data_set(tmp_path, monkeypatch):
    data = _data(num_users=20)
    with monkeypatch.context() as m:
        _explode_after(m, 5)
        with pytest.raises(RuntimeError, match="disk on fire"):
            builders.build(data, name="toy", data_dir=tmp_path, fingerprint="f1")
    assert not builders.dataset_dir("toy", tmp_path).exists()
    assert _incomplete_dirs(tmp_path) == []  # TFDS removed its temporary directory.
    with pytest.raises(FileNotFoundError):
        builders.load("toy", tmp_path)
    # A later build does not take anything half-written for a finished data set.
    builders.build(data, name="toy", data_dir=tmp_path, fingerprint="f1")
    assert _same(builders.load("toy", tmp_path), data)


def test_a_failed_rebuild_leaves_no_stale_data_set(tmp_path, monkeypatch):
    builders.build(_data(seed=0), name="toy", data_dir=tmp_path, fingerprint="old")
    with monkeypatch.context() as m:
        _explode_after(m, 3)
        with pytest.raises(RuntimeError):
            builders.build(_data(seed=1), name="toy", data_dir=tmp_path, fingerprint="new")
    # Neither the stale data set nor a partial new one is left to be read.
    with pytest.raises(FileNotFoundError):
        builders.load("toy", tmp_path)
    builders.build(_data(seed=1), name="toy", data_dir=tmp_path, fingerprint="new")
    assert _same(builders.load("toy", tmp_path), _data(seed=1))


def test_a_killed_build_leaves_only_an_ignored_incomplete_dir(tmp_path):
    # os._exit skips every `finally`: the closest thing to a SIGKILL mid-write.
    script = textwrap.dedent(
        f"""
        import os
        from distill_jax.data import builders
        from tests.test_builders import _data

        original = builders.SequenceBuilder._generate_examples

        def dying(self, data, timestamps):
            for i, example in enumerate(original(self, data, timestamps)):
                if i == 5:
                    os._exit(17)
                yield example

        builders.SequenceBuilder._generate_examples = dying
        builders.build(_data(num_users=20), name="toy", data_dir={str(tmp_path)!r},
                       fingerprint="f1")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    leftovers = _incomplete_dirs(tmp_path)
    assert len(leftovers) == 1  # The killed build's temporary directory...
    assert not builders.dataset_dir("toy", tmp_path).exists()  # ...and no data set.
    with pytest.raises(FileNotFoundError):
        builders.load("toy", tmp_path)
    builders.build(_data(num_users=20), name="toy", data_dir=tmp_path, fingerprint="f1")
    assert _same(builders.load("toy", tmp_path), _data(num_users=20))


@pytest.mark.parametrize(
    ("sequences", "timestamps", "match"),
    [
        ([np.array([1, 31], np.int32)], None, "user 0: item ids must lie in 1..30"),
        ([np.array([2], np.int32), np.array([0], np.int32)], None, "user 1: item ids"),
        ([np.array([1.0])], None, "1-D integer array"),
        ([np.array([1, 2], np.int32)], [np.array([5])], "1 timestamps for 2 items"),
        ([np.array([1], np.int32)], [], "0 timestamp arrays for 1 users"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, sequences, timestamps, match):
    data = SequenceData(num_items=30, sequences=sequences, name="bad")
    with pytest.raises(ValueError, match=match):
        builders.build(data, name="bad", data_dir=tmp_path, fingerprint="f", timestamps=timestamps)
    assert not builders.dataset_dir("bad", tmp_path).exists()


def test_invalid_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="name"):
        builders.build(_data(), name="a/b", data_dir=tmp_path, fingerprint="f")


def test_fingerprint_follows_contents_and_options(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("1 2 3\n")
    b.write_text("1 2 3\n")
    c.write_text("1 2 4\n")
    assert builders.fingerprint([a], k=5) == builders.fingerprint([b], k=5)  # Paths don't count.
    assert builders.fingerprint([a], k=5) != builders.fingerprint([c], k=5)
    assert builders.fingerprint([a], k=5) != builders.fingerprint([a], k=10)
    assert builders.fingerprint([a, c]) != builders.fingerprint([c, a])
    with pytest.raises(TypeError):
        builders.fingerprint(k=object())
