"""MovieLens 100K as clicks: a DCN-v2 click teacher distilled into a small MLP.

    python -m distill_jax.main --config=configs/ml100k_click.py \
        --config.data.path=../shared/datasets/ml-100k --workdir=/tmp/ml100k_click
    python -m distill_jax.main --config=configs/ml100k_click.py:tiny \
        --config.data.path=../shared/datasets/ml-100k --workdir=/tmp/ml100k_click_tiny

A rating of 4 or 5 is a click, a lower one a non-click, and one unseen
(user, item) pair per rating is a sampled non-click. Rows are split by time
(80% train, 10% valid, 10% test). Fields: user, item, gender, occupation,
hour, weekday; numbers: age, release year, the 19 genre flags.
Variants: `tiny` shrinks the models and the steps, never the data.
"""

import ml_collections

from configs import base

VARIANTS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ML-100K click config with the comma-separated variants of `arg`."""
    variants = base.parse_variants("configs/ml100k_click.py", arg, VARIANTS)
    config = base.get_base_config()
    config.task = "click"
    config.stages = "logistic,teacher,student_kd,student_scratch,report"
    config.data.source = "movielens"
    config.click.update(click_threshold=4.0, negatives=1)
    config.distill.update(temperature=1.0, alpha=0.5)
    config.eval.update(every_steps=200, patience=4, batch_size=4096)
    config.checkpoint.every_steps = 200
    config.log_every_steps = 100
    if "tiny" in variants:
        for m in (config.click.teacher, config.click.student):
            m.update(num_steps=30, warmup_steps=5, batch_size=256)
        config.click.teacher.update(embed_dim=8, num_cross=1, mlp_dims="32")
        config.eval.every_steps = config.checkpoint.every_steps = 15
        config.log_every_steps = 10
    return config
