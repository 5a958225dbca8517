"""MovieLens 100K (the GroupLens folder): SASRec teacher, a 0.104x-size student.

The data path is not in the repo; pass it:
  python -m distill_jax.main --config=configs/ml100k.py \
      --config.data.path=../shared/datasets/ml-100k --workdir=/tmp/ml100k
  python -m distill_jax.main --config=configs/ml100k.py:tiny \
      --config.data.path=../shared/datasets/ml-100k --workdir=/tmp/ml100k_tiny
To download it instead: --config.data.download=ml-100k --config.data.path=DIR

Variants (comma-separated): `tiny` shrinks the models and the number of steps,
never the data; `bert4rec` makes teacher and students BERT4Rec.
`ensemble` trains three teachers (seeds config.seed + 0, 1, 2) and distils
from their averaged softmaxes; `cached` distils from the teacher's stored
top-K soft labels (the soft_labels stage), with no teacher in memory.
`cold` holds out a tenth of the users and the items first seen in the last
30% of the log (the `cold_users` and `cold_items` slices); `features` does
the same and gives teacher and students the side features (genres, year,
title text; user age, gender, occupation), so `cold` and `features` compare
one split without and with them.
"""

import ml_collections

from configs import base

VARIANTS = ("tiny", "bert4rec", "ensemble", "cached", "cold", "features")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ML-100K config with the comma-separated variants of `arg`."""
    variants = base.parse_variants("configs/ml100k.py", arg, VARIANTS)
    config = base.get_base_config()
    config.data.source = "movielens"
    # Every rating is an interaction (implicit feedback), no k-core: the
    # published 943 users / 1,682 items / 100,000 interactions.
    for m in (config.teacher, config.student):
        m.update(max_len=200, learning_rate=1e-2, batch_size=64, num_steps=3000, warmup_steps=100)
    # BENCHMARKS.md, "MovieLens 100K": the teacher trials (dropout, lr, weight decay).
    config.teacher.update(
        embed_dim=64, num_blocks=2, num_heads=2, mlp_dim=256, dropout=0.5, weight_decay=0.1
    )
    # d=10: 0.104 x the teacher's parameters; lr and weight decay searched for both students.
    config.student.update(
        embed_dim=10, num_blocks=2, num_heads=1, mlp_dim=40, dropout=0.2, weight_decay=0.5
    )
    # Beauty's distillation settings (BENCHMARKS.md, "MovieLens 100K").
    config.distill.update(temperature=1.0, alpha=0.5, init_from_teacher="pca")
    config.eval.every_steps = 250
    config.checkpoint.every_steps = 250
    config.eval.batch_size = 64
    if "bert4rec" in variants:
        config.teacher.name = config.student.name = "bert4rec"
    if "tiny" in variants:
        for m in (config.teacher, config.student):
            m.update(num_steps=30, warmup_steps=5, max_len=50)
        config.teacher.update(embed_dim=16, mlp_dim=32)
        config.student.update(embed_dim=8, mlp_dim=16)
        config.eval.every_steps = config.checkpoint.every_steps = 15
        config.eval.latency_repeats = 3
        config.log_every_steps = 10
        base.tiny_compress(config)
    base.method_variants(config, variants, "configs/ml100k.py")
    # Items first seen in the last 30% of the log: 109 cold items, 187 cold-item
    # users (a tenth gives 45 and 40, too few to measure).
    base.cold_variants(config, variants, item_rule="time", item_fraction=0.3)
    # The user side features of the issue-29 runs: age, gender, occupation.
    config.features.ignore = "zip_prefix"
    return config
