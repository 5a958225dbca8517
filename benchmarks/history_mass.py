"""Where a model's probability goes: how much of it sits on items the user has seen.

  python -m benchmarks.history_mass --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/beauty

Evaluation excludes each user's history from the candidates, so a model may
put much of its softmax on seen items without any metric showing it. A
distilled student, though, is trained towards the teacher's whole softmax:
mass the teacher puts on the history is signal spent on items that are never
the answer (see config.<model>.exclude_history). For every finished stage of
`--workdir` (or `--stage NAME=DIR`), on the validation inputs, this prints
the mean softmax mass on the user's history items, on the last input item
alone (causal models; a bidirectional model's last input is its mask token),
and the share of users whose top-1 item is in their history; and, for the
data, the share of training targets that repeat an earlier item of the user.
"""

import json
import sys
from collections.abc import Sequence

import jax
import numpy as np

from benchmarks import common, trained
from distill_jax import sharding
from distill_jax.data import dataset
from distill_jax.evaluation import evaluator as evaluator_lib


def history_mass(
    scores: np.ndarray, history: np.ndarray, last_item: np.ndarray
) -> dict[str, np.ndarray]:
    """Per row of `scores [B, V+1]` (column 0 padding): softmax mass on the
    row's `history [B, H]` items (0 = padding), on `last_item [B]`, and whether
    the top-1 item is in the history."""
    s = np.asarray(scores, np.float64).copy()
    s[:, 0] = -np.inf
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    seen = np.zeros(p.shape, bool)
    rows = np.repeat(np.arange(len(p)), history.shape[1])
    seen[rows, history.ravel()] = True
    seen[:, 0] = False
    return {
        "mass_on_history": (p * seen).sum(axis=1),
        "mass_on_last_item": p[np.arange(len(p)), last_item],
        "top1_in_history": seen[np.arange(len(p)), p.argmax(axis=1)],
    }


def repeat_share(sequences) -> float:
    """Share of targets (every item after the first) that repeat an earlier item."""
    repeats = total = 0
    for seq in sequences:
        seen = set()
        for i, item in enumerate(seq.tolist()):
            if i:
                total += 1
                repeats += item in seen
            seen.add(item)
    return repeats / max(total, 1)


def main(argv: Sequence[str]) -> None:
    """Measures every finished stage on the validation inputs and prints the table."""
    args = common.parse_flags(argv, trained.define_trained_stage_flags, __doc__)
    config = args.config
    data = dataset.load(config, args.workdir)
    split = data.split
    print(json.dumps({"training_targets_repeating_an_earlier_item": repeat_share(split.train)}))
    mesh = sharding.make_mesh(config.mesh)
    evaluator = evaluator_lib.Evaluator(split, config, mesh)
    rows = []
    for stage, stage_dir in trained.stage_dirs(args.workdir, args.stage).items():
        model, params, shardings = trained.load_stage(
            config, stage, stage_dir, split.num_items, mesh
        )
        scorer = evaluator_lib.model_scorer(model, params, shardings)
        score = jax.jit(scorer.score_fn)
        batches, _ = evaluator.batches(scorer, "valid")
        parts = []
        for batch in batches:
            w = np.asarray(batch["where"])
            scores = np.asarray(score(params, batch["inputs"]))[w]
            parts.append(
                history_mass(
                    scores, np.asarray(batch["history"])[w], np.asarray(batch["inputs"])[w, -1]
                )
            )
        row = {"stage": stage, "dir": stage_dir}
        for name in parts[0]:
            row[name] = float(np.concatenate([q[name] for q in parts]).mean())
        rows.append(row)
        print(json.dumps(row))
    print("| model | mass on history | mass on the last input item | top-1 in history |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['mass_on_history']:.3f} | {r['mass_on_last_item']:.3f} | "
            f"{r['top1_in_history']:.3f} |"
        )


if __name__ == "__main__":
    main(sys.argv)
