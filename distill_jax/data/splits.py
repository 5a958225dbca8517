"""Evaluation splits of users' sequences and training-set popularity.

Three protocols, all over item ids 1..V (0 is padding):

- Leave-one-out (`leave_one_out`): each user's last item is the test target,
  the second-to-last the validation target, the rest is training data.
- Cold users (`cold_start_split`, `cold_user_fraction`): a seeded fraction of
  users is held out whole. None of their interactions is trained on; each is
  evaluated once, like a leave-one-out test user: history = all but the last
  item, target = the last item.
- Cold items (`cold_start_split`, `cold_item_fraction`): the cut-off is the
  time at which the last `cold_item_fraction` of all interactions begins (a
  quantile of the interaction times, not of the time range, so skewed logs
  such as MovieLens still yield a usable slice). Items first seen at or after
  the cut-off are cold: every interaction with them is removed from the warm
  users' sequences, so they never appear in training or in the warm
  validation/test targets. Each warm user who has a cold item gives one
  example: target = their first cold item, history = everything before it
  (warm items only, by construction). Cold items stay in the catalogue (ids
  and side features are kept), so a model with item features can score them.
  Data with an order but no times (S3-Rec files such as Beauty) use the
  'random' rule instead (`cold_item_rule`): a seeded `cold_item_fraction` of
  the items, drawn uniformly, is cold; the rest of the protocol is the same.

Cold users' sequences also lose their cold-item interactions, so each slice
isolates one kind of coldness.
"""

from __future__ import annotations

import numpy as np

from distill_jax.data.types import (
    ColdStartSplit,
    DataError,
    LeaveOneOut,
    Processed,
    SequenceData,
)


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    """Splits every user's sequence; users need at least 3 items."""
    short = [u for u, s in enumerate(data.sequences) if len(s) < 3]
    if short:
        raise ValueError(
            f"{data.name}: {len(short)} users have fewer than 3 items (first: user index "
            f"{short[0]}); leave-one-out needs a training, a validation and a test item."
        )
    return LeaveOneOut(
        num_items=data.num_items,
        train=[s[:-2] for s in data.sequences],
        valid_targets=np.array([s[-2] for s in data.sequences], np.int32),
        test_targets=np.array([s[-1] for s in data.sequences], np.int32),
        full=list(data.sequences),
    )


COLD_ITEM_RULES = ("time", "random")


def _cold_item_mask(
    processed: Processed, fraction: float, rule: str = "time", seed: int = 0
) -> tuple[np.ndarray, float | None]:
    """bool [V+1] of the cold items, and the cut-off time (None for the 'random' rule)."""
    is_cold = np.zeros(processed.num_items + 1, bool)
    if fraction == 0.0:
        return is_cold, None
    if rule not in COLD_ITEM_RULES:
        raise ValueError(f"cold_item_rule={rule!r}; expected one of {COLD_ITEM_RULES}.")
    if rule == "random":
        seen = np.unique(np.concatenate(processed.sequences))
        seen = seen[seen > 0]
        rng = np.random.default_rng([seed, 0xC01D, 1])
        is_cold[rng.choice(seen, size=int(round(fraction * len(seen))), replace=False)] = True
        return is_cold, None
    if processed.timestamps is None:
        # A DataError (the data has no times), so the main job shows it as one message.
        raise DataError(
            f"{processed.name}: cold_item_fraction={fraction} with cold_item_rule='time' needs "
            "timestamps, and this data has only an order; set data.cold_item_rule='random' "
            "(a random share of the items is cold) or cold_item_fraction=0."
        )
    items = np.concatenate(processed.sequences)
    times = np.concatenate(processed.timestamps).astype(np.float64)
    sorted_times = np.sort(times)
    cutoff = float(sorted_times[min(int((1.0 - fraction) * len(times)), len(times) - 1)])
    first_seen = np.full(processed.num_items + 1, np.inf)
    np.minimum.at(first_seen, items, times)
    is_cold[1:] = first_seen[1:] >= cutoff
    is_cold &= np.isfinite(first_seen)  # items with no interaction are not "seen" at all
    return is_cold, cutoff


def cold_start_split(
    processed: Processed,
    *,
    cold_user_fraction: float = 0.0,
    cold_item_fraction: float = 0.0,
    cold_item_rule: str = "time",
    cold_valid_fraction: float = 0.0,
    seed: int = 0,
) -> ColdStartSplit:
    """Splits processed data into warm leave-one-out, cold users and cold items.

    The protocols are described in this module's docstring. With both
    fractions 0 the warm split equals `leave_one_out(processed.to_sequence_data())`.

    Args:
      processed: the output of `preprocess.preprocess`.
      cold_user_fraction: share of users, in [0, 1), held out whole.
      cold_item_fraction: in [0, 1); rule 'time': the share of the
        interactions at the end of the log whose time starts the cold-item
        period; rule 'random': the share of the items that is cold.
      cold_item_rule: 'time' or 'random' (see the module docstring).
      cold_valid_fraction: in [0, 1): the share of each cold slice's
        examples (by a seeded draw) held for validation, as the slices
        'cold_users_valid' and 'cold_items_valid'; the rest keep the slices'
        names. 0: no validation part.
      seed: picks the cold users (and the 'random' rule's cold items); the
        same seed gives the same split.

    Returns:
      The split.

    Raises:
      DataError: the 'time' rule on data without times, or no warm user left.
    """
    for key, value in (
        ("cold_user_fraction", cold_user_fraction),
        ("cold_item_fraction", cold_item_fraction),
        ("cold_valid_fraction", cold_valid_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {value}.")
    num_users = len(processed.sequences)
    rng = np.random.default_rng([seed, 0xC01D])
    n_cold = int(round(cold_user_fraction * num_users))
    is_cold_user = np.zeros(num_users, bool)
    is_cold_user[rng.choice(num_users, size=n_cold, replace=False)] = True
    is_cold_item, cutoff = _cold_item_mask(processed, cold_item_fraction, cold_item_rule, seed)

    counts = dict.fromkeys(
        (
            "warm_users",
            "cold_users",
            "cold_item_users",
            "warm_users_too_short",
            "cold_users_too_short",
            "cold_item_no_history",
        ),
        0,
    )
    warm_users, warm_seqs = [], []
    cold_users, cold_hist, cold_tgt = [], [], []
    ci_users, ci_hist, ci_tgt = [], [], []
    for index, seq in enumerate(processed.sequences):
        user = index + 1
        cold_at = is_cold_item[seq]
        kept = seq[~cold_at]
        if is_cold_user[index]:
            if len(kept) < 2:
                counts["cold_users_too_short"] += 1
                continue
            cold_users.append(user)
            cold_hist.append(kept[:-1])
            cold_tgt.append(kept[-1])
            continue
        if len(kept) >= 3:
            warm_users.append(user)
            warm_seqs.append(kept)
        else:
            counts["warm_users_too_short"] += 1
        if cold_at.any():
            first = int(np.argmax(cold_at))
            if first == 0:
                counts["cold_item_no_history"] += 1
            else:
                ci_users.append(user)
                ci_hist.append(seq[:first])
                ci_tgt.append(seq[first])
    if not warm_users:
        raise DataError(
            f"{processed.name}: no warm user is left with 3 items (of {num_users} users: "
            f"{counts['warm_users_too_short']} too short, {int(is_cold_user.sum())} held out "
            "as cold users); lower data.cold_user_fraction or data.cold_item_fraction."
        )
    counts["warm_users"] = len(warm_users)
    counts["cold_users"] = len(cold_users)
    counts["cold_item_users"] = len(ci_users)
    warm = leave_one_out(SequenceData(processed.num_items, warm_seqs, processed.name))
    cold_valid = {}
    if cold_valid_fraction > 0:
        draw = np.random.default_rng([seed, 0xC01D, 2])
        for name, n in (("cold_users", len(cold_users)), ("cold_items", len(ci_users))):
            mask = np.zeros(n, bool)
            mask[draw.choice(n, size=int(round(cold_valid_fraction * n)), replace=False)] = True
            cold_valid[name] = mask
            counts[f"{name}_valid"] = int(mask.sum())
    return ColdStartSplit(
        warm=warm,
        warm_users=np.array(warm_users, np.int64),
        cold_users=np.array(cold_users, np.int64),
        cold_user_histories=cold_hist,
        cold_user_targets=np.array(cold_tgt, np.int32),
        cold_items=np.flatnonzero(is_cold_item).astype(np.int32),
        cold_item_cutoff=cutoff,
        cold_item_users=np.array(ci_users, np.int64),
        cold_item_histories=ci_hist,
        cold_item_targets=np.array(ci_tgt, np.int32),
        counts=counts,
        cold_valid=cold_valid,
    )


def item_popularity(train_sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """[V+1] int64 interaction counts per item over the training sequences only.

    Pass the training part (`split.train`), never the full sequences: counting
    validation or test targets would leak them into popularity slices.
    Entry 0 (padding) is always 0.
    """
    if not train_sequences:
        return np.zeros(num_items + 1, np.int64)
    flat = np.concatenate(train_sequences).astype(np.int64)
    if flat.size and (flat.min() < 1 or flat.max() > num_items):
        raise ValueError(
            f"Training item ids must be in 1..{num_items}; found {flat.min()}..{flat.max()}."
        )
    return np.bincount(flat, minlength=num_items + 1)


def head_items(popularity: np.ndarray, share: float = 0.2) -> np.ndarray:
    """bool [V+1]: the fewest most-popular items that make up `share` of interactions.

    Items are taken in decreasing popularity (ties: smaller id first) until
    their counts reach `share` of the total; the rest is the long tail.
    Padding (entry 0) is never a head item.

    Args:
      popularity: [V+1] training counts, as from `item_popularity`.
      share: in (0, 1]; the part of the training interactions the head covers.

    Returns:
      A mask over item ids.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}.")
    counts = np.asarray(popularity, np.float64).copy()
    counts[0] = 0.0
    head = np.zeros(len(counts), bool)
    total = counts.sum()
    if total == 0:
        return head
    order = np.argsort(-counts, kind="stable")
    # Compare shares, not counts against share * total: 7 / 25 >= 0.28 holds in
    # floating point where 7 >= 0.28 * 25 (= 7.000000000000001) does not.
    covered = np.cumsum(counts[order]) / total
    n_head = int(np.searchsorted(covered, share, side="left")) + 1
    head[order[:n_head]] = True
    return head


def popularity_groups(popularity: np.ndarray, groups: int = 10) -> np.ndarray:
    """int [V+1]: each item's popularity decile (or `groups`-quantile), 0 = most popular.

    The V items are ranked by decreasing training count (ties: smaller id
    first) and cut into `groups` runs of equal length (the first runs one
    item longer where V does not divide), so every group holds a tenth of
    the catalogue whatever the counts; items never seen in training sit in
    the last groups. Padding (entry 0) gets -1.
    """
    counts = np.asarray(popularity, np.float64).copy()
    num_items = len(counts) - 1
    if not 1 <= groups <= max(num_items, 1):
        raise ValueError(f"groups must be in 1..{num_items} (the catalogue size), got {groups}.")
    counts[0] = -np.inf
    order = np.argsort(-counts[1:], kind="stable") + 1
    out = np.full(num_items + 1, -1, np.int64)
    out[order] = np.arange(num_items) * groups // num_items
    return out
