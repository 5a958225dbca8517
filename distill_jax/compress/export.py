"""A servable artefact: the recommend function as StableHLO, and what it needs to be used.

`WORKDIR/export/` holds three files:

* `recommend.jaxexport`: ``jax.export`` of ``recommend(weights, history [B, N]
  int32) -> (ids [B, K] int32, scores [B, K] float32)``, B and N symbolic.
  The history is the user's items in our item ids, oldest first, left-padded
  with 0; the model scores the newest ``max_len`` of them and, as in
  evaluation, none of the N is recommended. A model with user features
  (version 2) takes ``users [B] int32`` after the history: our user ids
  (``user_ids`` in the manifest maps the data's own ids to them; 0 scores
  a user without the user part).
* `weights.npz`: the weights, a flat list of arrays (int8 ones stay int8;
  float32 arrays whose values are exact bfloat16 numbers, like the int8
  student's scales and output bias, are stored as bfloat16 bits).
* `artifact.json`: the input contract, each weight's stored and served
  dtype, the map from our item ids back to the data's own ids, the most
  popular items (the fallback for an empty history), and where the model
  came from (config, data fingerprint, commit, test metrics).

The weights are arguments, not constants of the module: with constants,
tracing folded the int8 table's dequantization into a float32 copy.
All three are plain data: loading them (``distill_jax.recommend``)
deserializes StableHLO, a NumPy archive without pickles, and JSON. Copy the
directory anywhere jax runs; nothing else of ours is needed.
"""

import json
import os
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from distill_jax.data import pipeline
from distill_jax.evaluation import metrics as metrics_lib
from distill_jax.evaluation.evaluator import Scorer

FORMAT = "distill_jax.recommender"
VERSION = 1
VERSION_WITH_USERS = 2  # the function takes user ids after the history
FUNCTION_FILE = "recommend.jaxexport"
WEIGHTS_FILE = "weights.npz"
MANIFEST_FILE = "artifact.json"
# Lowered for each: the artefact runs on a CPU, a GPU or a TPU host alike.
PLATFORMS = ("cpu", "cuda", "tpu")


def recommend_function(scorer: Scorer, num_items: int, top_k: int, exclude_history: bool):
    """`recommend(params, history [B, N], users [B] | None) -> (ids, scores)`: what the
    artefact computes (`users`: for a scorer that reads them)."""
    L, causal, mask_token = scorer.max_len, scorer.causal, num_items + 1

    def window(history):
        b = history.shape[0]
        width = L if causal else L - 1
        padded = jnp.concatenate([jnp.zeros((b, width), jnp.int32), history], axis=1)
        recent = jax.lax.dynamic_slice_in_dim(padded, padded.shape[1] - width, width, axis=1)
        if causal:
            return recent
        return jnp.concatenate([recent, jnp.full((b, 1), mask_token, jnp.int32)], axis=1)

    def recommend(params, history, users=None):
        history = history.astype(jnp.int32)
        if users is not None:
            users = users.astype(jnp.int32)
        scores = scorer.score_fn(params, window(history), users).astype(jnp.float32)
        blocked = jnp.arange(scores.shape[1])[None, :] == 0
        if exclude_history:
            blocked = blocked | metrics_lib.seen_mask(history, scores.shape[1])
        values, ids = jax.lax.top_k(jnp.where(blocked, -jnp.inf, scores), top_k)
        return ids.astype(jnp.int32), values

    return recommend


def export(
    scorer: Scorer, num_items: int, top_k: int, exclude_history: bool
) -> tuple[jax.export.Exported, list[np.ndarray]]:
    """The recommend function of (flat weights, history), exported; and the weights.

    The weights are a flat list, so that loading needs no pytree types of
    ours or of qwix: only arrays.
    """
    leaves, treedef = jax.tree.flatten(jax.device_get(scorer.params))
    leaves = [np.asarray(x) for x in leaves]
    recommend = recommend_function(scorer, num_items, top_k, exclude_history)

    def fn(weights, history, *users):
        return recommend(jax.tree.unflatten(treedef, weights), history, *users)

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    b, n = jax.export.symbolic_shape("b, n")
    inputs = [jax.ShapeDtypeStruct((b, n), jnp.int32)]
    if scorer.reads_users:
        inputs.append(jax.ShapeDtypeStruct((b,), jnp.int32))
    return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(specs, *inputs), leaves


def _stored(x: np.ndarray) -> tuple[np.ndarray, str]:
    """(what is written, its served dtype): bfloat16 bits where that loses nothing."""
    if x.dtype == np.float32 and x.size:
        half = x.astype(ml_dtypes.bfloat16)
        if np.array_equal(half.astype(np.float32), x):
            return half.view(np.uint16), "bfloat16"
    return x, str(x.dtype)


def _original(value: Any) -> Any:
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    return None if value is None else str(value)


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_artifact(
    out_dir: str,
    scorer: Scorer,
    *,
    num_items: int,
    top_k: int,
    exclude_history: bool,
    item_id_to_original: np.ndarray,
    popular_items: np.ndarray,
    provenance: dict,
    user_id_to_original: np.ndarray | None = None,
) -> dict:
    """Writes the artefact (both files atomically) and returns its manifest.

    `user_id_to_original`: [U+1] our user ids -> the data's own, written for a
    scorer that reads user features (required then).
    """
    if scorer.reads_users and user_id_to_original is None:
        raise ValueError("write_artifact: the model reads user features; pass user_id_to_original")
    os.makedirs(out_dir, exist_ok=True)
    exported, leaves = export(scorer, num_items, top_k, exclude_history)
    blob = exported.serialize()
    stored = [_stored(x) for x in leaves]
    manifest = {
        "format": FORMAT,
        "version": VERSION_WITH_USERS if scorer.reads_users else VERSION,
        "function": FUNCTION_FILE,
        "weights": {
            "file": WEIGHTS_FILE,
            "arrays": [
                {"name": f"w{i:04d}", "stored": str(a.dtype), "dtype": d, "shape": list(a.shape)}
                for i, (a, d) in enumerate(stored)
            ],
        },
        "platforms": list(PLATFORMS),
        "jax_version": jax.__version__,
        "input": {
            "name": "history",
            "dtype": "int32",
            "shape": ["batch", "length"],
            "ids": "item ids of this artefact (item_ids maps them to the data's own), 1..num_items",
            "order": "oldest first",
            "padding": "left, with 0",
            "max_len": scorer.max_len,
            "window": f"the newest {scorer.max_len} items are scored; longer histories are allowed",
        },
        "output": {
            "ids": ["batch", top_k, "int32"],
            "scores": ["batch", top_k, "float32"],
            "order": "best first",
        },
        "top_k": top_k,
        "num_items": num_items,
        "exclude_history": bool(exclude_history),
        "causal": bool(scorer.causal),
        "item_ids": [_original(v) for v in item_id_to_original],
        "popular_items": [int(i) for i in popular_items],
        "provenance": provenance,
        "function_bytes": len(blob),
    }
    if scorer.reads_users:
        manifest["users"] = {
            "name": "users",
            "dtype": "int32",
            "shape": ["batch"],
            "ids": "user ids of this artefact (user_ids maps them to the data's own); "
            "0: a user it does not know, scored without the user part",
        }
        manifest["user_ids"] = [_original(v) for v in user_id_to_original]
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **{f"w{i:04d}": a for i, (a, _) in enumerate(stored)})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    # The manifest last: a directory with a manifest is a complete artefact.
    for name, data, mode in (
        (FUNCTION_FILE, bytes(blob), "wb"),
        (MANIFEST_FILE, json.dumps(manifest, indent=1, default=str), "w"),
    ):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
    files = (FUNCTION_FILE, WEIGHTS_FILE, MANIFEST_FILE)
    manifest["bytes_on_disk"] = {n: os.path.getsize(os.path.join(out_dir, n)) for n in files}
    manifest["bytes_on_disk"]["total"] = sum(manifest["bytes_on_disk"].values())
    return manifest


def _padded(histories: list[np.ndarray]) -> np.ndarray:
    width = max(1, max(len(h) for h in histories))
    out = np.zeros((len(histories), width), np.int32)
    for i, h in enumerate(histories):
        if len(h):
            out[i, width - len(h) :] = h
    return out


def compare(out_dir: str, scorer: Scorer, histories, num_items: int, config, user_ids=None) -> dict:
    """The artefact's top-K against the evaluator's path (same inputs), per user.

    `user_ids`: one per history, for a scorer that reads user features.

    Returns the share of users with an identical ranked list and with the
    same set, and the largest score difference.
    """
    from distill_jax import recommend  # the loader users run

    art = recommend.load(out_dir)
    k = config.export.top_k
    excl = config.eval.exclude_history

    @jax.jit
    def in_process(params, inputs, history, users):
        scores = scorer.score_fn(params, inputs, users)
        blocked = metrics_lib.seen_mask(history, scores.shape[1]) if excl else None
        masked = jnp.where(jnp.arange(scores.shape[1]) == 0, -jnp.inf, scores)
        if blocked is not None:
            masked = jnp.where(blocked, -jnp.inf, masked)
        values, ids = jax.lax.top_k(masked, k)
        return ids, values

    params = jax.device_get(scorer.params)
    same = same_set = users = 0
    diff = 0.0
    batches = pipeline.eval_batches(
        histories,
        np.ones(len(histories), np.int32),
        num_items=num_items,
        max_len=scorer.max_len,
        batch_size=config.eval.batch_size,
        causal=scorer.causal,
        trim=scorer.padding_invariant,
        user_ids=user_ids if scorer.reads_users else None,
    )
    start = 0
    order = np.argsort([len(h) for h in histories], kind="stable")
    for batch in batches:
        n = int(batch["where"].sum())
        rows = order[start : start + n]
        start += n
        row_users = batch.get("users")
        ids, values = (
            np.asarray(x)[:n]
            for x in in_process(params, batch["inputs"], batch["history"], row_users)
        )
        a_ids, a_values = art.call(
            _padded([histories[r] for r in rows]), None if row_users is None else row_users[:n]
        )
        same += int(np.sum(np.all(ids == a_ids, axis=1)))
        same_set += int(np.sum(np.all(np.sort(ids, axis=1) == np.sort(a_ids, axis=1), axis=1)))
        diff = max(diff, float(np.max(np.abs(values - a_values))))
        users += n
    return {
        "users": users,
        "identical_share": same / max(users, 1),
        "same_set_share": same_set / max(users, 1),
        "max_score_difference": diff,
    }


def _timings(fn, repeats: int) -> dict:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def latency(out_dir: str, scorer: Scorer, histories, num_items: int, config, user_ids=None) -> dict:
    """Top-K latency of the artefact and of the in-process jitted model, same users, interleaved.

    Each batch holds the first test users' histories (repeated up to the batch
    size), cut to their newest `max_len` items. In process is the same
    recommend function (window, scores, history excluded, top-K), jitted,
    with the params as arguments instead of the artefact's constants.
    """
    from distill_jax import recommend

    art = recommend.load(out_dir)
    device = jax.local_devices()[0]
    params = jax.device_put(jax.device_get(scorer.params), device)
    live = jax.jit(
        recommend_function(
            scorer, num_items, config.export.top_k, bool(art.manifest["exclude_history"])
        )
    )
    out = {}
    for b in config.eval.latency_batch_sizes:
        rows = [histories[i % len(histories)][-scorer.max_len :] for i in range(b)]
        hist = jax.device_put(_padded(rows), device)
        users = ()
        if scorer.reads_users:
            users = (jax.device_put(np.resize(np.asarray(user_ids, np.int32), b), device),)
        a, m = [], []
        for _ in range(3):  # interleaved rounds: neither side gets a quieter moment
            a.append(
                _timings(
                    lambda h=hist, u=users: art.call_device(h, *u), config.eval.latency_repeats
                )
            )
            m.append(
                _timings(lambda h=hist, u=users: live(params, h, *u), config.eval.latency_repeats)
            )
        row = {
            "artifact": min(a, key=lambda t: t["p50_ms"]),
            "in_process": min(m, key=lambda t: t["p50_ms"]),
        }
        row["ratio_p50"] = row["artifact"]["p50_ms"] / row["in_process"]["p50_ms"]
        out[f"batch_{b}"] = row
    return out
