"""Amazon Beauty (S3-Rec sequence file): SASRec teacher, a 0.095x-size student.

The data path is not in the repo; pass it:
  python -m distill_jax.main --config=configs/beauty.py \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/beauty
  python -m distill_jax.main --config=configs/beauty.py:tiny \
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/beauty_tiny

Variants (comma-separated): `tiny` shrinks the models and the number of steps,
never the data (a tiny run's dataset counts are the real ones); `bert4rec`
makes teacher and students BERT4Rec, with their own searched settings.

Every value below was chosen by the searches in BENCHMARKS.md ("Amazon
Beauty"); their plans, points and history are in docs/benchmarks-log.md.
`ensemble` trains three teachers (seeds config.seed + 0, 1, 2) and distils
from their averaged softmaxes; `cached` distils from the teacher's stored
top-K soft labels (the soft_labels stage), with no teacher in memory.
`cold` holds out a tenth of the users and of the items (the `cold_users`
and `cold_items` slices); `features` does the same and gives teacher and
students the side features (Beauty_item2attributes.json beside
data.path). Beauty.txt has no times, so its cold items are a random tenth
of the catalogue (data.cold_item_rule='random').
"""

import ml_collections

from configs import base

VARIANTS = ("tiny", "bert4rec", "ensemble", "cached", "cold", "features")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Beauty config with the comma-separated variants of `arg`."""
    variants = base.parse_variants("configs/beauty.py", arg, VARIANTS)
    bert4rec = "bert4rec" in variants
    config = base.get_base_config()
    config.data.source = "s3rec"
    for m in (config.teacher, config.student):
        m.update(max_len=50, batch_size=256, warmup_steps=200)
    config.student.update(num_steps=3000, num_blocks=2, num_heads=1, dropout=0.1)
    # BENCHMARKS.md, "Amazon Beauty": teacher lr 2e-3 (both architectures).
    config.teacher.update(embed_dim=128, num_blocks=2, num_heads=2, mlp_dim=512, learning_rate=2e-3)
    config.eval.every_steps = 500
    config.eval.patience = 4
    config.checkpoint.every_steps = 500
    # BENCHMARKS.md, "Amazon Beauty": the teacher and both students were
    # searched alike; the distilled student starts from the teacher's tables.
    config.distill.update(alpha=0.5, init_from_teacher="pca")
    # BENCHMARKS.md, "Compression and serving": 1,800 fine-tuning steps (the pruning check).
    config.compress.finetune_steps = 1800
    if bert4rec:
        config.teacher.name = config.student.name = "bert4rec"
        # BENCHMARKS.md, "Beauty, BERT4Rec variant": teacher dropout 0.4 at 8,000 steps.
        config.teacher.update(dropout=0.4, mask_prob=0.2, num_steps=8000, weight_decay=0.0)
        config.student.update(embed_dim=16, mlp_dim=64, learning_rate=1e-2, weight_decay=0.0)
        config.student.exclude_history = False  # causal models only
        config.student_scratch.update(weight_decay=0.1, exclude_history=0)
        config.distill.update(temperature=1.0, last_item_slot=False)
    else:
        # BENCHMARKS.md, "Amazon Beauty": teacher dropout 0.5, weight decay 0.5.
        config.teacher.update(dropout=0.5, weight_decay=0.5, num_steps=3000)
        # d=14: 187,298 parameters, 0.095 x the teacher's; the 10-point search per student.
        config.student.update(embed_dim=14, mlp_dim=56, learning_rate=2e-2, weight_decay=0.0)
        # The distilled student's softmaxes leave out the seen items (the teacher puts
        # 54% of its mass on the item just seen: benchmarks/history_mass.py).
        config.student.exclude_history = True
        config.student_scratch.update(learning_rate=1e-2, weight_decay=0.3, exclude_history=0)
        config.distill.update(temperature=0.75, last_item_slot=True)
    if "tiny" in variants:
        for m in (config.teacher, config.student):
            m.update(num_steps=40, warmup_steps=5, batch_size=64)
        config.teacher.update(embed_dim=32, mlp_dim=64)
        config.student.update(embed_dim=8, num_blocks=1, mlp_dim=16)
        config.eval.every_steps = config.checkpoint.every_steps = 20
        config.eval.latency_repeats = 3
        config.log_every_steps = 10
        base.tiny_compress(config)
    base.method_variants(config, variants, "configs/beauty.py")
    base.cold_variants(config, variants, item_rule="random")
    if "features" in variants:
        # The S3-Rec attribute file beside data.path: Beauty_item2attributes.json.
        config.data.item_features_path = "auto"
    return config
