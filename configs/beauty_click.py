"""Amazon Beauty as implicit clicks: a DCN-v2 click teacher distilled into a small MLP.

    python -m distill_jax.main --config=configs/beauty_click.py \
        --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/beauty_click
    python -m distill_jax.main --config=configs/beauty_click.py:tiny \
        --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt --workdir=/tmp/bc_tiny

Every interaction is a click and one unseen (user, item) pair per
interaction a sampled non-click. Beauty.txt has an order but no times, so the
split by time uses each row's place in its user's history (each user's
earliest 80% train, the next 10% validate, the latest 10% test). Fields:
user, item; numbers: the item attributes of Beauty_item2attributes.json
beside the data (one 0/1 column per attribute); and the user's last 20
clicks before the row, pooled. Models and training: ml100k_click.py's,
unchanged.
Variants: `tiny` shrinks the models and the steps, never the data.
"""

import ml_collections

from configs import base, ml100k_click

VARIANTS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Beauty click config with the comma-separated variants of `arg`."""
    variants = base.parse_variants("configs/beauty_click.py", arg, VARIANTS)
    config = ml100k_click.get_config("tiny" if "tiny" in variants else None)
    config.data.update(source="s3rec", item_features_path="auto")
    config.click.update(click_threshold=0.0, negatives=1, drop_features="")
    return config
