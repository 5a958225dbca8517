"""Full-ranking evaluation: accuracy, catalogue exposure, long-tail slice, agreement, cost.

A `Scorer` is anything that maps a batch of input windows to scores over the
whole catalogue: a trained model or the popularity baseline. Everything goes
through the same code, so the split, the history exclusion and the metrics
are shared by every row of a report.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax import faults
from distill_jax import sharding as sharding_lib
from distill_jax.data import pipeline, splits
from distill_jax.data.types import LeaveOneOut
from distill_jax.evaluation import metrics as metrics_lib
from distill_jax.progress import Progress
from distill_jax.train import preemption

# Where a SIGTERM stops a run between evaluation batches (nothing is written there).
_STOP = "during an evaluation"


@dataclasses.dataclass(eq=False)
class Scorer:
    """Scores every item for a batch of input windows.

    Attributes:
      score_fn: pure `(params, inputs [B, L] int32, users [B] int32 | None)
        -> scores [B, V+1]`; `users` (the batch's user ids) is read by models
        with user features only, None scores without the user part.
      params: its parameters (a pytree of arrays).
      param_shardings: their shardings on the mesh (or a replicated sharding).
      max_len: the input window L.
      causal: next-item inputs (True) or a trailing mask token (False).
      flops_per_sequence: multiply-adds x 2 to score one user's catalogue.
      padding_invariant: whether the scores are the same for a window with
        more left padding (our models: yes, positions count from the right).
        If not (int8 activations take their scales over the padded window),
        the scorer is always fed full `max_len` windows, as the artefact is.
      reads_users: whether `score_fn` reads `users` (a model with user
        features); an exported artefact then takes user ids too.
    """

    score_fn: Callable[..., jax.Array]
    params: Any
    param_shardings: Any
    max_len: int
    causal: bool
    flops_per_sequence: float
    padding_invariant: bool = True
    reads_users: bool = False


def model_flops_per_sequence(model: nn.Module) -> float:
    """FLOPs to score the catalogue for one sequence (forward pass).

    Per block over L positions: Q, K, V and output projections 4 * 2 L D^2;
    attention scores and weighted values 2 * 2 L^2 D; the MLP 2 * 2 L D M.
    Then the catalogue logits at ONE position: 2 D (V + 1). Embedding lookups,
    LayerNorm and softmax are not counted (not matmuls).
    """
    L, D, M, V = model.max_len, model.embed_dim, model.mlp_dim, model.num_items
    per_block = 8 * L * D * D + 4 * L * L * D + 4 * L * D * M
    return float(model.num_blocks * per_block + 2 * D * (V + 1))


def model_scorer(
    model: nn.Module, params: Any, param_shardings: Any, padding_invariant: bool = True
) -> Scorer:
    """Scores from a model's logits at the last window position.

    Only the catalogue's V+1 columns are scored: a sharded model's padding
    rows (see ``models.base``) never reach the metrics.
    """
    columns = model.num_items + 1

    def score_fn(params, inputs, users=None):
        extra = {} if users is None else {"users": users}
        hidden = model.apply({"params": params}, inputs, train=False, **extra)
        logits = model.apply({"params": params}, hidden[:, -1], method=model.logits)
        return logits if logits.shape[-1] == columns else logits[:, :columns]

    return Scorer(
        score_fn,
        params,
        param_shardings,
        model.max_len,
        model.is_causal,
        model_flops_per_sequence(model),
        padding_invariant,
        getattr(model, "user_features", None) is not None,
    )


def popularity_counts(split: LeaveOneOut) -> np.ndarray:
    """[V+1] item counts over the training part (each user's items but the last two)."""
    return splits.item_popularity(split.train, split.num_items).astype(np.float32)


def popularity_scorer(split: LeaveOneOut, mesh, max_len: int) -> Scorer:
    """The popularity baseline: every user gets the training counts as scores."""
    counts = popularity_counts(split)
    counts[0] = -np.inf  # the padding column is never a candidate

    def score_fn(params, inputs, users=None):
        del users  # the same scores for everyone
        return jnp.broadcast_to(params, (inputs.shape[0], params.shape[0]))

    rep = sharding_lib.replicated(mesh)
    return Scorer(score_fn, jax.device_put(counts, rep), rep, max_len, True, 0.0)


class Evaluator:
    """Ranks each user's held-out item among every item of the catalogue.

    The scorer sees the newest `max_len` items of a user's history; the WHOLE
    history is excluded from the candidates when `config.eval.exclude_history`.
    Long-tail metrics (`tail_*`) cover the users whose target is outside the
    head: the most popular items making up `config.eval.tail_share` of the
    training interactions.
    """

    def __init__(self, split: LeaveOneOut, config: ml_collections.ConfigDict, mesh):
        self.split, self.mesh = split, mesh
        self.ks = tuple(sorted(config.eval.ks))
        self.batch_size = config.eval.batch_size
        sharding_lib.check_batch_size(self.batch_size, mesh, "eval.batch_size")
        self.exclude_history = config.eval.exclude_history
        self.is_head = splits.head_items(popularity_counts(split), config.eval.tail_share)
        self._valid_users = None
        n_valid = config.eval.max_valid_users
        n_valid_all = len(split.eval_examples("valid")[1])
        if 0 < n_valid < n_valid_all:
            rng = np.random.default_rng([config.seed, 7])
            self._valid_users = np.sort(rng.choice(n_valid_all, n_valid, replace=False))
        self._compiled: dict[int, Callable] = {}

    def batches(self, scorer: Scorer, split: str):
        """The (host) batches `evaluate` scores for `split`, and the number of users."""
        histories, targets = self.split.eval_examples(split)
        users = self._valid_users if split == "valid" else None
        n_users = int(len(targets) if users is None else len(users))
        batches = pipeline.eval_batches(
            histories,
            targets,
            num_items=self.split.num_items,
            max_len=scorer.max_len,
            batch_size=self.batch_size,
            causal=scorer.causal,
            users=users,
            trim=scorer.padding_invariant,
            user_ids=self.split.user_ids(split),
        )
        return batches, n_users

    def _batch_fn(self, scorer: Scorer, new_items_only: bool = False):
        key = (id(scorer), new_items_only)
        if key not in self._compiled:
            ks, k_max, excl = self.ks, max(self.ks), self.exclude_history
            is_head = jnp.asarray(self.is_head)
            new = np.zeros(self.split.num_items + 1, bool)
            new[np.asarray(getattr(self.split, "cold_items", []), np.int64)] = True
            new = jnp.asarray(new)

            def fn(params, batch):
                scores = scorer.score_fn(params, batch["inputs"], batch.get("users"))
                if new_items_only:
                    # Only the items training never showed are candidates.
                    scores = jnp.where(new[: scores.shape[-1]], scores, -jnp.inf)
                ranks = metrics_lib.target_ranks(
                    scores, batch["targets"], batch["history"], exclude_history=excl
                )
                out = metrics_lib.ranking_metrics(ranks, ks=ks, where=batch["where"])
                tail = batch["where"] & ~is_head[batch["targets"]]
                for key, value in metrics_lib.ranking_metrics(ranks, ks=ks, where=tail).items():
                    if key != "mrr":
                        out[f"tail_{key}"] = value
                top = metrics_lib.top_k_items(scores, batch["history"], k_max, exclude_history=excl)
                return out, top, ranks

            self._compiled[key] = jax.jit(
                fn,
                in_shardings=(scorer.param_shardings, sharding_lib.batch_sharding(self.mesh)),
                out_shardings=sharding_lib.replicated(self.mesh),
            )
        return self._compiled[key]

    def evaluate(self, scorer: Scorer, split: str) -> dict[str, float]:
        """Metrics on 'valid' or 'test'.

        Returns:
          `hr@K`, `ndcg@K`, `mrr`, `tail_hr@K`, `tail_ndcg@K`, `coverage@K`,
          `gini@K` for each K of `config.eval.ks`, and `users`, `tail_users`;
          on 'cold_items' (and 'cold_items_valid') also `new_hr@K`,
          `new_ndcg@K` and `new_mrr`: the target ranked among the items
          training never showed alone (the item cold-start protocol), beside
          its rank among the whole catalogue.
        """
        return self._evaluate(scorer, split, deciles=False)[0]

    def evaluate_splits(
        self, scorer: Scorer, eval_splits: tuple[str, ...], name: str = "eval"
    ) -> tuple[dict[str, dict], dict[str, dict]]:
        """What a report row holds: each split's metrics, and the test split's deciles.

        Returns:
          `({split: evaluate(...)}, {"test": deciles})`; the deciles are
          per item-popularity decile (0 = the most popular tenth of the
          catalogue): `items`, `users` (test users whose target is there),
          `rec_share@K` (share of all top-K recommendations that fall there)
          and `hr@K`, for K = 10 (or the largest of `config.eval.ks` below it).
        On a terminal each split draws a progress bar, labelled `[name] split`.
        """
        metrics, deciles = {}, {}
        for split in eval_splits:
            metrics[split], d = self._evaluate(
                scorer, split, deciles=split == "test", desc=f"[{name}] {split}"
            )
            if d is not None:
                deciles[split] = d
            faults.kill_point("evaluate")
        return metrics, deciles

    def _evaluate(
        self,
        scorer: Scorer,
        split: str,
        deciles: bool,
        desc: str | None = None,
        new_items_only: bool = False,
    ):
        fn = self._batch_fn(scorer, new_items_only)
        batches, n_users = self.batches(scorer, split)
        # Training's validation passes draw no bar of their own (the stage's bar runs).
        bar = Progress(
            desc, -(-n_users // self.batch_size), unit="batch", bar=None if desc else False
        )
        total, exposure = None, np.zeros((len(self.ks), self.split.num_items + 1), np.int64)
        target_parts, rank_parts = [], []
        with jax.set_mesh(self.mesh):
            for batch in batches:
                preemption.stop_point(_STOP)
                out, top, ranks = fn(scorer.params, sharding_lib.put_batch(batch, self.mesh))
                total = out if total is None else metrics_lib.accumulate(total, out)
                top = np.asarray(jax.device_get(top))[batch["where"]]
                for i, k in enumerate(self.ks):
                    exposure[i] += np.bincount(
                        top[:, :k].ravel(), minlength=self.split.num_items + 1
                    )
                if deciles:
                    rank_parts.append(np.asarray(jax.device_get(ranks))[batch["where"]])
                    target_parts.append(np.asarray(batch["targets"])[batch["where"]])
                bar.update()
        bar.close()
        total = jax.device_get(total)
        result = metrics_lib.finalize(total)
        for i, k in enumerate(self.ks):
            result.update(metrics_lib.exposure_stats(exposure[i], k, self.split.num_items))
        result["users"] = n_users
        result["tail_users"] = int(total[f"tail_hr@{self.ks[0]}"][1])
        if split.startswith("cold_items") and not new_items_only:
            # The item cold-start protocol beside the full ranking: the target
            # ranked among the new items alone (`new_hr@K`, `new_ndcg@K`, `new_mrr`).
            among_new = self._evaluate(scorer, split, False, new_items_only=True)[0]
            for k in self.ks:
                result[f"new_hr@{k}"] = among_new[f"hr@{k}"]
                result[f"new_ndcg@{k}"] = among_new[f"ndcg@{k}"]
            result["new_mrr"] = among_new["mrr"]
        if not deciles:
            return result, None
        i = max([j for j, k in enumerate(self.ks) if k <= 10] or [0])
        return result, self._deciles(
            exposure[i],
            self.ks[i],
            np.concatenate(target_parts),
            np.concatenate(rank_parts),
        )

    def _deciles(self, exposure, k, targets, ranks) -> dict[str, list]:
        groups = min(10, self.split.num_items)
        group = splits.popularity_groups(popularity_counts(self.split), groups)
        items = np.bincount(group[1:], minlength=groups)
        recs = np.bincount(group[1:], weights=exposure[1:], minlength=groups)
        users = np.bincount(group[targets], minlength=groups)
        hits = np.bincount(group[targets], weights=ranks <= k, minlength=groups)
        return {
            "k": int(k),
            "items": items.tolist(),
            "users": users.tolist(),
            f"rec_share@{k}": (recs / max(recs.sum(), 1)).tolist(),
            # None (null in report.json) where no test target falls in a decile.
            f"hr@{k}": [float(h / u) if u else None for h, u in zip(hits, users, strict=True)],
        }

    def agreement(
        self, teacher: Scorer, student: Scorer, split: str = "test", k: int = 10
    ) -> dict[str, float]:
        """Teacher-student agreement on the split's inputs.

        Returns:
          `top{k}_overlap`: mean share of the teacher's top-k (history excluded)
          also in the student's; `kl`: mean KL(teacher || student) of their
          softmax distributions over the whole catalogue.
        """
        if teacher.causal != student.causal or teacher.max_len != student.max_len:
            raise ValueError(
                "agreement needs teacher and student fed the same inputs "
                "(same model family and max_len)."
            )
        excl = self.exclude_history

        def fn(tp, sp, batch):
            ts = teacher.score_fn(tp, batch["inputs"], batch.get("users"))
            ss = student.score_fn(sp, batch["inputs"], batch.get("users"))
            t_top = metrics_lib.top_k_items(ts, batch["history"], k, exclude_history=excl)
            s_top = metrics_lib.top_k_items(ss, batch["history"], k, exclude_history=excl)
            overlap = jnp.sum(t_top[:, :, None] == s_top[:, None, :], axis=(1, 2)) / k
            t_logp = jax.nn.log_softmax(ts, axis=-1)
            s_logp = jax.nn.log_softmax(ss, axis=-1)
            p = jnp.exp(t_logp)
            kl = jnp.sum(jnp.where(p > 0, p * (t_logp - s_logp), 0.0), axis=-1)
            w = batch["where"].astype(jnp.float32)
            return {
                "overlap": (jnp.sum(overlap * w), jnp.sum(w)),
                "kl": (jnp.sum(kl * w), jnp.sum(w)),
            }

        jitted = jax.jit(
            fn,
            in_shardings=(
                teacher.param_shardings,
                student.param_shardings,
                sharding_lib.batch_sharding(self.mesh),
            ),
            out_shardings=sharding_lib.replicated(self.mesh),
        )
        batches, _ = self.batches(teacher, split)
        total = None
        with jax.set_mesh(self.mesh):
            for batch in batches:
                preemption.stop_point(_STOP)
                out = jitted(
                    teacher.params, student.params, sharding_lib.put_batch(batch, self.mesh)
                )
                total = out if total is None else metrics_lib.accumulate(total, out)
        result = metrics_lib.finalize(jax.device_get(total))
        return {f"top{k}_overlap": result["overlap"], "kl": result["kl"]}

    def latency(
        self, scorer: Scorer, batch_size: int, repeats: int, k: int = 10
    ) -> dict[str, float]:
        """Wall-clock ms of a top-k recommendation for `batch_size` test users.

        Runs on one device (serving does not shard a batch of 1), after a
        warm-up call; reports the median and the 99th percentile.
        """
        times = self.latency_samples(scorer, batch_size, repeats, k)
        return {
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
        }

    def latency_samples(
        self, scorer: Scorer, batch_size: int, repeats: int, k: int = 10
    ) -> list[float]:
        """The `repeats` timings (ms) behind :meth:`latency`, after one warm-up call."""
        histories, _ = self.split.eval_examples("test")
        rows = np.resize(np.arange(len(histories)), batch_size)
        inputs = next(
            pipeline.eval_batches(
                [histories[r] for r in rows],
                np.ones(batch_size, np.int32),
                num_items=self.split.num_items,
                max_len=scorer.max_len,
                batch_size=batch_size,
                causal=scorer.causal,
                trim=False,  # the serving cost of a full window, whatever the users' lengths
            )
        )["inputs"]
        device = jax.local_devices()[0]
        params = jax.device_put(jax.device_get(scorer.params), device)
        inputs = jax.device_put(inputs, device)
        recommend = jax.jit(lambda p, x: jax.lax.top_k(scorer.score_fn(p, x), k)[1])
        jax.block_until_ready(recommend(params, inputs))
        times = []
        for _ in range(repeats):
            preemption.stop_point(_STOP)
            t0 = time.perf_counter()
            jax.block_until_ready(recommend(params, inputs))
            times.append((time.perf_counter() - t0) * 1e3)
        return times
