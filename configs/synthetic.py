"""The embedded default: synthetic sequences, a SASRec teacher, a 1/8-size student.

Run:
  python -m distill_jax.main --workdir=/tmp/distill_synth
  python -m distill_jax.main --config=configs/synthetic.py:tiny --workdir=/tmp/distill_tiny
  python -m distill_jax.main --config=configs/synthetic.py:bert4rec --workdir=/tmp/distill_b4r

Variants (comma-separated, e.g. `tiny,bert4rec`): `tiny` shrinks everything for
smoke runs; `bert4rec` makes teacher and students BERT4Rec instead of SASRec;
`ensemble` trains three teachers (seeds 0-2 offset from config.seed) and
distils from their averaged softmaxes; `cached` distils from the teacher's
stored top-K soft labels (the soft_labels stage), no teacher in memory.
"""

import ml_collections

from configs import base

VARIANTS = ("tiny", "bert4rec", "ensemble", "cached")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the synthetic config with the comma-separated variants of `arg`."""
    variants = base.parse_variants("configs/synthetic.py", arg, VARIANTS)
    config = base.get_base_config()
    # 600 steps of 30-item windows: compiling one train step per batch shape
    # (11 shapes per stage with buckets) would cost more than the training.
    config.data.fixed_shapes = True
    for m in (config.teacher, config.student):
        m.max_len = 30
        m.num_steps = 600
        m.warmup_steps = 50
        m.learning_rate = 2e-3
    if "bert4rec" in variants:
        config.teacher.name = config.student.name = "bert4rec"
    if "tiny" in variants:
        s = config.data.synthetic
        s.num_users, s.num_items, s.mean_len, s.max_len, s.num_tastes = 120, 60, 10.0, 20, 4
        for m in (config.teacher, config.student):
            m.max_len = 16
            m.num_steps = 30
            m.warmup_steps = 5
            m.batch_size = 32
        config.teacher.update(embed_dim=16, mlp_dim=32)
        config.student.update(embed_dim=8, mlp_dim=16)
        config.eval.every_steps = 10
        config.checkpoint.every_steps = 10
        config.log_every_steps = 10
        config.distill.cache_k = 16  # of 60 items
        base.tiny_compress(config)
    base.method_variants(config, variants, "configs/synthetic.py")
    return config
