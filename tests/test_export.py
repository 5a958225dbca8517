"""The exported artefact and `distill_jax.recommend`: same top-K as in process, clear answers."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import synthetic
from distill_jax import models, recommend
from distill_jax.compress import export, quantize
from distill_jax.data import pipeline
from distill_jax.evaluation import evaluator as evaluator_lib
from distill_jax.evaluation import metrics

V, L, K = 60, 16, 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scorer(name: str, int8: bool):
    cfg = synthetic.get_config("tiny").student
    cfg.name = name
    model = models.build_model(cfg, num_items=V, max_len=L, key_prefix="student")
    x = np.ones((1, L), np.int32)
    params = nn.unbox(model.init({"params": jax.random.key(7)}, x, train=False))["params"]
    if int8:
        model, params = quantize.ptq(model, params)
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return evaluator_lib.model_scorer(model, params, jax.tree.map(lambda _: rep, params))


def _write(tmp_path, scorer, ids=None, user_ids=None):
    ids = np.array([None] + [f"item-{i}" for i in range(1, V + 1)], object) if ids is None else ids
    out = str(tmp_path / "export")
    export.write_artifact(
        out,
        scorer,
        num_items=V,
        top_k=K,
        exclude_history=True,
        item_id_to_original=ids,
        popular_items=np.arange(V, 0, -1),
        provenance={"model": "test"},
        user_id_to_original=user_ids,
    )
    return out


def _histories(rng, n=40):
    # Lengths from 1 to 2 L: longer than the window too.
    return [rng.integers(1, V + 1, rng.integers(1, 2 * L + 1)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_artifact_returns_the_in_process_top_k_on_random_histories(tmp_path, name, int8):
    scorer = _scorer(name, int8)
    out = _write(tmp_path, scorer)
    art = recommend.load(out)
    histories = _histories(np.random.default_rng(0))
    # In process: the evaluator's inputs (newest L items, mask token for
    # BERT4Rec, trimmed windows) and its top-k with the whole history excluded.
    batch = next(
        pipeline.eval_batches(
            histories,
            np.ones(len(histories), np.int32),
            num_items=V,
            max_len=L,
            batch_size=len(histories),
            causal=scorer.causal,
        )
    )
    order = np.argsort([len(h) for h in histories], kind="stable")
    scores = scorer.score_fn(scorer.params, batch["inputs"])
    want = np.asarray(metrics.top_k_items(scores, batch["history"], K))
    got, got_scores = art.call(export._padded([histories[i] for i in order]))
    np.testing.assert_array_equal(got, want)
    for row, i in enumerate(order):
        assert not set(got[row]) & set(histories[i].tolist())  # the history is excluded
    # Through the user-facing function, in original ids.
    rec = art.recommend([f"item-{j}" for j in histories[order[0]]])
    assert rec.items == [f"item-{j}" for j in got[0]] and not rec.fallback
    np.testing.assert_allclose(rec.scores, got_scores[0], rtol=1e-6)


def test_int8_artifact_is_smaller_and_holds_int8_constants(tmp_path):
    f = _write(tmp_path / "f", _scorer("sasrec", False))
    q = _write(tmp_path / "q", _scorer("sasrec", True))

    def size(d):  # bytes of the stored arrays (the archive adds a header per array)
        arrays = json.loads(open(os.path.join(d, export.MANIFEST_FILE)).read())["weights"]["arrays"]
        return sum(np.dtype(a["stored"]).itemsize * int(np.prod(a["shape"])) for a in arrays)

    assert size(q) < 0.5 * size(f)
    text = recommend.load(q).exported.mlir_module()
    assert "xi8>" in text  # int8 weights go into the module as int8
    # The int8 table is stored as int8, its per-row scales as bfloat16 bits.
    arrays = json.loads(open(os.path.join(q, "artifact.json")).read())["weights"]["arrays"]
    rows = [a for a in arrays if a["shape"][:1] == [V + 1]]
    assert {(a["stored"], a["dtype"]) for a in rows} >= {("int8", "int8"), ("uint16", "bfloat16")}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("art"), _scorer("sasrec", False))


def test_unknown_empty_and_long_histories_get_clear_answers(artifact):
    art = recommend.load(artifact)
    r = art.recommend(["item-3", "nope", "item-5"])
    assert r.unknown == ["nope"] and not r.fallback and len(r.items) == K
    assert "item-3" not in r.items and "item-5" not in r.items
    for h, why in (([], "empty history"), (["x", "y"], "no known item")):
        r = art.recommend(h)
        assert r.fallback and why in r.note and r.scores == [None] * K
        assert r.items == [f"item-{i}" for i in range(V, V - K, -1)]
    long = [f"item-{i}" for i in range(1, 2 * L + 1)]
    r = art.recommend(long)
    assert r.truncated and f"newest {L}" in r.note
    assert not set(r.items) & set(long)  # every item of the history is excluded


def test_integer_original_ids_round_trip(tmp_path):
    ids = np.arange(V + 1, dtype=np.int64) * 10
    ids[0] = -1
    art = recommend.load(_write(tmp_path, _scorer("sasrec", False), ids))
    r = art.recommend(["10", 20, "30"])
    assert all(isinstance(i, int) and i % 10 == 0 and i not in (10, 20, 30) for i in r.items)


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "distill_jax.recommend", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_recommend_imports_neither_flax_nor_the_models(artifact):
    code = (
        "import sys\n"
        "from distill_jax import recommend\n"
        f"r = recommend.load({artifact!r}).recommend(['item-1', 'item-2'])\n"
        "assert len(r.items) == 10, r\n"
        "bad = sorted(m for m in sys.modules if m == 'flax' or m.startswith(('flax.', "
        "'distill_jax.models', 'distill_jax.compress', 'qwix', 'optax')))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_cli_history_file_and_csv(artifact, tmp_path):
    out = _cli(f"--artifact={artifact}", "--history=item-1,item-2,bogus")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "unknown ids skipped: bogus"
    assert [x.split("\t")[0] for x in lines[1:]] == [str(i) for i in range(1, K + 1)]
    hist = tmp_path / "h.txt"
    hist.write_text("item-1,item-2\n\nitem-7 item-8 item-9\n")
    res = tmp_path / "r.jsonl"
    out = _cli(f"--artifact={artifact}", f"--input={hist}", f"--output={res}")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert [r["line"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["fallback"] and not rows[0]["fallback"]
    csv = tmp_path / "h.csv"
    csv.write_text("user,item_id\nu1,item-1\nu2,item-4\nu1,item-2\n")
    out = _cli(f"--artifact={artifact}", f"--input={csv}", "--user_col=user")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert [r["user"] for r in rows] == ["u1", "u2"]
    assert "item-1" not in rows[0]["items"] and "item-2" not in rows[0]["items"]


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("item-1,,item-2\n", [], r"h\.in, line 1: an empty id between two commas"),
        ("user,item_id\nu1\n", ["--user_col=user"], r"h\.in, line 2: 1 fields, the header has 2"),
        ("item,x\n", ["--user_col=user"], r"h\.in, line 1: expected a header"),
        (b"\xff\xfe", [], r"h\.in: not UTF-8"),
    ],
)
def test_cli_errors_are_one_message_naming_file_and_line(
    artifact, tmp_path, content, args, message
):
    path = tmp_path / "h.in"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    out = _cli(f"--artifact={artifact}", f"--input={path}", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    import re

    assert re.search(message, out.stderr), out.stderr


def test_missing_or_damaged_artifact_is_a_clear_error(tmp_path, artifact):
    out = _cli(f"--artifact={tmp_path}", "--history=1")
    assert out.returncode == 2 and "artifact.json does not exist" in out.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in (export.MANIFEST_FILE, export.WEIGHTS_FILE):
        (bad / name).write_bytes(open(os.path.join(artifact, name), "rb").read())
    (bad / export.FUNCTION_FILE).write_bytes(b"not flatbuffers")
    with pytest.raises(recommend.ArtifactError, match="is not a jax.export artefact"):
        recommend.load(str(bad))


def _user_scorer():
    from distill_jax.data import features as data_features
    from distill_jax.models.features import ItemFeatures

    cfg = synthetic.get_config("tiny").student
    items = data_features.encode({"kind": {i: f"k{i % 4}" for i in range(1, V + 1)}}, V + 1)
    users = data_features.encode({"group": {u: f"g{u % 3}" for u in range(1, 6)}}, 6)
    model = models.build_model(cfg, num_items=V, max_len=L, key_prefix="student").clone(
        item_features=ItemFeatures.from_encoded(items, np.arange(1, V + 1), V + 1),
        user_features=ItemFeatures.from_encoded(users, np.arange(1, 6), 6),
    )
    x = np.ones((1, L), np.int32)
    params = nn.unbox(model.init({"params": jax.random.key(7)}, x, train=False))["params"]
    # Large user rows, so that the user visibly changes the ranking.
    enc = params["user_encoder"]
    enc["group_embedding"] = enc["group_embedding"] * 30.0
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return evaluator_lib.model_scorer(model, params, jax.tree.map(lambda _: rep, params))


def test_an_artifact_with_user_features_takes_the_user(tmp_path, capsys):
    scorer = _user_scorer()
    assert scorer.reads_users
    user_ids = np.array([None, "ann", "bob", "cy", "dee", "eve"], object)
    with pytest.raises(ValueError, match="pass user_id_to_original"):
        _write(tmp_path / "no_users", scorer)
    out = _write(tmp_path, scorer, user_ids=user_ids)
    art = recommend.load(out)
    assert art.manifest["version"] == 2 and art.manifest["user_ids"][1:] == [
        "ann",
        "bob",
        "cy",
        "dee",
        "eve",
    ]
    histories = _histories(np.random.default_rng(1), n=12)
    ids = np.arange(12) % 6  # user 0: none
    same = export.compare(out, scorer, histories, V, _export_config(), user_ids=ids)
    assert same["identical_share"] == 1.0 and same["users"] == 12
    h = [f"item-{j}" for j in histories[0]]
    by_user = {u: art.recommend(h, user=u).items for u in ("ann", "bob", "cy")}
    assert len({tuple(v) for v in by_user.values()}) > 1  # the user changes the list
    plain = art.recommend(h)
    assert "no user given" in plain.note
    assert "unknown user zed" in art.recommend(h, user="zed").note
    assert art.recommend(h, user="zed").items == plain.items
    # The CLI: --user, and a CSV's user column.
    assert recommend._main([f"--artifact={out}", f"--history={','.join(h)}", "--user=bob"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == by_user["bob"]


def _export_config():
    config = synthetic.get_config("tiny")
    config.eval.batch_size = 8
    return config
