"""benchmarks/peers/: the data RecBole reads is our dataset, split as ours is."""

import importlib.util

import numpy as np
import pytest

from benchmarks.peers import recbole_sasrec
from configs import beauty
from distill_jax.data import dataset as dataset_lib

PEERS = importlib.util.find_spec("torch") and importlib.util.find_spec("recbole")
needs_recbole = pytest.mark.skipif(
    not PEERS,
    reason="the peers extra (torch, recbole) is not installed: pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu && pip install recbole",
)


def test_atomic_files_hold_every_interaction_in_order_and_the_whole_catalogue(tmp_path):
    # Imported without torch: the conversion is plain Python.
    rows = recbole_sasrec.write_atomic_files([[3, 1, 2], [2, 2, 4, 5]], 6, str(tmp_path), "d")
    assert rows == 7
    inter = (tmp_path / "d.inter").read_text().splitlines()
    assert inter[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert [tuple(line.split("\t")) for line in inter[1:]] == [
        ("1", "3", "0"),
        ("1", "1", "1"),
        ("1", "2", "2"),
        ("2", "2", "0"),
        ("2", "2", "1"),
        ("2", "4", "2"),
        ("2", "5", "3"),
    ]
    assert (tmp_path / "d.item").read_text().splitlines() == ["item_id:token"] + [
        str(i) for i in range(1, 7)
    ]


def _tiny_beauty(tmp_path):
    """A Beauty-format file (`user item item ...`) read by our loader: our split."""
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, 31):
        items = rng.integers(1, 41, size=rng.integers(4, 60))
        lines.append(" ".join(map(str, [user, *items])))
    path = tmp_path / "Tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    config = beauty.get_config("tiny")
    config.data.path = str(path)
    config.teacher.max_len = config.student.max_len = 8  # some histories are longer
    return config, dataset_lib.load(config, str(tmp_path / "work")).split


@needs_recbole
def test_recbole_reads_our_leave_one_out_split(tmp_path):
    config, split = _tiny_beauty(tmp_path)
    torch, Config, create_dataset, data_preparation, SASRec, init_seed = (
        recbole_sasrec.import_recbole()
    )
    recbole_sasrec.write_atomic_files(split.full, split.num_items, str(tmp_path / "d"), "d")
    mcfg = config.teacher
    rb = Config(
        model="SASRec",
        config_dict=recbole_sasrec.recbole_settings(mcfg, config, str(tmp_path), "d"),
    )
    init_seed(0, True)
    dataset = create_dataset(rb)
    train, valid, test = data_preparation(rb, dataset)
    assert dataset.item_num == split.num_items + 1  # padding + the whole catalogue
    # One target per augmented prefix: every training target of ours, once.
    assert len(train.dataset) == sum(len(s) - 1 for s in split.train)

    def ours(field, ids):
        return np.array(dataset.id2token(field, ids)).astype(int)

    for part, targets, cut in ((valid, split.valid_targets, 2), (test, split.test_targets, 1)):
        feat = part.dataset.inter_feat
        users = ours("user_id", feat["user_id"].numpy()) - 1
        assert sorted(users) == list(range(len(split.full)))
        np.testing.assert_array_equal(ours("item_id", feat["item_id"].numpy()), targets[users])
        lists, lengths = feat["item_id_list"].numpy(), feat["item_length"].numpy()
        for u, seq, n in zip(users, lists, lengths, strict=True):
            want = split.full[u][:-cut][-mcfg.max_len :]
            np.testing.assert_array_equal(ours("item_id", seq[:n]), want)

    # Our protocol on the RecBole model's scores, against a brute-force count.
    model = SASRec(rb, train.dataset)
    tokens = dataset.field2token_id["item_id"]
    token_ids = np.array([0] + [tokens[str(i)] for i in range(1, split.num_items + 1)])
    inputs = recbole_sasrec.validation_inputs(split, token_ids, mcfg.max_len)
    got = recbole_sasrec.evaluate_recbole(torch, model, inputs, True, batch=7)
    seqs, lengths, targets, hist = inputs
    model.eval()
    with torch.no_grad():
        scores = (
            model.forward(torch.from_numpy(seqs), torch.from_numpy(lengths))
            @ model.item_embedding.weight.T
        ).numpy()
    ndcg = []
    for row, t, h in zip(scores, targets, hist, strict=True):
        skip = set(h[h > 0].tolist()) - {t}
        others = [c for c in range(1, len(row)) if c != t and c not in skip]
        rank = 1 + sum(row[c] >= row[t] for c in others)
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    np.testing.assert_allclose(got, np.mean(ndcg), rtol=1e-5)


def test_our_times_leave_the_validations_out():
    """From the trainer's TensorBoard wall times: a validation runs from its step's
    training scalars to its own; training time is the rest since the stage began."""
    start = 100.0
    train = [(10, 130.0), (20, 140.0), (30, 150.0), (40, 160.0)]  # compiled by step 10
    valid = [(20, 142.0, 0.01), (40, 163.0, 0.03)]  # validations of 2 s and 3 s
    curve, durations = recbole_sasrec.our_curve(start, train, valid)
    assert durations == [(20, 2.0), (40, 3.0)]
    assert curve == [[20, 40.0, 0.01], [40, 58.0, 0.03]]
    # From step 20 (an epoch in) to 40: 20 steps of 5 targets in 20 s less 2 s of validation.
    rate, first = recbole_sasrec.steady_rate(train, durations, 5.0, from_step=20)
    assert first == 20 and rate == pytest.approx(20 * 5 / 18)
    # Too few scalars after from_step: from the first.
    assert recbole_sasrec.steady_rate(train, durations, 5.0, from_step=40)[1] == 10
    rows = [
        {"system": "recbole", "targets_per_second": 50.0, "seconds_to_target": 90.0, "curve": []},
        {"system": "ours", "targets_per_second": 200.0, "seconds_to_target": 30.0, "curve": curve},
    ]
    lines = recbole_sasrec.table(rows, "teacher", 0.02)
    assert lines[2] == "| recbole | teacher | 50 | 90.0 | 0.25 | 3.00 | - |"
    assert lines[3] == "| ours | teacher | 200 | 30.0 | 1.00 | 1.00 | 0.0300 |"
