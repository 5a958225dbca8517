"""A synthetic sequential-recommendation data set, deterministic by seed.

Why these ingredients: real logs have (1) users with a few latent tastes,
(2) a long-tailed item popularity and (3) short-range sequential dependence
(an accessory after the phone, the next episode after this one). A model that
only ranks by popularity captures (2); a sequence model can learn (1) and (3),
so the data separates them clearly. Each item has a handful of likely
successors with unequal weights, so the next item is genuinely uncertain: a
good teacher's soft labels carry that distribution, which one sampled hard
label does not -- the situation where distillation is expected to help.
"""

import ml_collections
import numpy as np

from distill_jax.data.types import SequenceData

__all__ = ["SequenceData", "generate"]


def generate(cfg: ml_collections.ConfigDict, seed: int) -> SequenceData:
    """Generates the data set described by `config.data.synthetic`.

    Args:
      cfg: the `config.data.synthetic` subtree.
      seed: the run's seed; the same seed always gives the same data.

    Returns:
      The users' sequences.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    num_items, num_tastes = cfg.num_items, cfg.num_tastes
    # Zipf-like popularity over a random order of the items.
    ranks = rng.permutation(num_items) + 1
    popularity = ranks.astype(np.float64) ** (-cfg.zipf_exponent)
    taste_of_item = rng.integers(num_tastes, size=num_items)
    items_of_taste = [np.flatnonzero(taste_of_item == t) for t in range(num_tastes)]
    # Every taste needs at least one item; move one in where none fell.
    for t in range(num_tastes):
        if items_of_taste[t].size == 0:
            taste_of_item[t % num_items] = t
    items_of_taste = [np.flatnonzero(taste_of_item == t) for t in range(num_tastes)]
    taste_probs = []
    for members in items_of_taste:
        p = popularity[members]
        taste_probs.append(p / p.sum())

    # Successors: mostly from the item's own taste, weighted by popularity,
    # with unequal (Dirichlet) weights so that one successor dominates.
    k = cfg.successors
    successors = np.empty((num_items, k), np.int64)
    successor_w = rng.dirichlet(np.full(k, 1.0), size=num_items)
    global_p = popularity / popularity.sum()
    for i in range(num_items):
        members = items_of_taste[taste_of_item[i]]
        if members.size > k and rng.random() < 0.8:
            successors[i] = rng.choice(
                members, size=k, replace=False, p=taste_probs[taste_of_item[i]]
            )
        else:
            successors[i] = rng.choice(num_items, size=k, replace=False, p=global_p)

    sequences, favourites = [], []
    extra_mean = max(cfg.mean_len - cfg.min_len, 1e-6)
    for _ in range(cfg.num_users):
        length = int(min(cfg.max_len, cfg.min_len + rng.geometric(1.0 / (1.0 + extra_mean)) - 1))
        user_tastes = rng.dirichlet(np.full(num_tastes, 0.1))
        favourites.append(int(np.argmax(user_tastes)))
        seq = np.empty(length, np.int64)
        current = -1
        for j in range(length):
            if current >= 0 and rng.random() < cfg.transition_prob:
                current = successors[current, rng.choice(k, p=successor_w[current])]
            else:
                t = rng.choice(num_tastes, p=user_tastes)
                current = rng.choice(items_of_taste[t], p=taste_probs[t])
            seq[j] = current
        sequences.append((seq + 1).astype(np.int32))  # Item ids start at 1.
    # The taste cluster is the item's side feature (a category): what a
    # catalogue's genre would be, and all that places an item never seen.
    tastes = {i + 1: f"taste{t}" for i, t in enumerate(taste_of_item.tolist())}
    # A user's side feature: their strongest taste (what a demographic hints at).
    favourite = {u + 1: f"taste{t}" for u, t in enumerate(favourites)}
    return SequenceData(
        num_items=num_items,
        sequences=sequences,
        name=f"synthetic(seed={seed})",
        item_features={"taste": tastes},
        user_features={"favourite_taste": favourite},
    )
