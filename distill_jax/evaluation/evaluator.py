"""Full-ranking evaluation of a model on the validation or test split."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from distill_jax.data import pipeline
from distill_jax.data.preprocess import LeaveOneOut
from distill_jax.evaluation import metrics as metrics_lib
from distill_jax.train import sharding as sharding_lib


class Evaluator:
    """Scores every item for each user's next item and ranks the target.

    The model sees the newest `max_len` items of a user's history; the WHOLE
    history is excluded from the candidates (when `config.eval.exclude_history`).
    """

    def __init__(
        self,
        model: nn.Module,
        split: LeaveOneOut,
        config: ml_collections.ConfigDict,
        mesh,
        param_shardings,
    ):
        self.model, self.split, self.mesh = model, split, mesh
        self.ks = tuple(config.eval.ks)
        self.batch_size = config.eval.batch_size
        sharding_lib.check_batch_size(self.batch_size, mesh, "eval.batch_size")
        self.exclude_history = config.eval.exclude_history
        self.causal = model.is_causal
        self._valid_users = None
        if config.eval.max_valid_users > 0 and config.eval.max_valid_users < len(
            split.valid_targets
        ):
            rng = np.random.default_rng([config.seed, 7])
            self._valid_users = np.sort(
                rng.choice(len(split.valid_targets), config.eval.max_valid_users, replace=False)
            )

        def batch_metrics(params, batch):
            hidden = model.apply({"params": params}, batch["inputs"], train=False)
            scores = model.apply({"params": params}, hidden[:, -1], method=model.logits)
            ranks = metrics_lib.target_ranks(
                scores, batch["targets"], batch["history"], exclude_history=self.exclude_history
            )
            return metrics_lib.ranking_metrics(ranks, ks=self.ks, where=batch["where"])

        self._batch_metrics = jax.jit(
            batch_metrics,
            in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh)),
            out_shardings=sharding_lib.replicated(mesh),
        )

    def evaluate(self, params, split: str) -> dict[str, float]:
        """Metrics (`hr@K`, `ndcg@K`, `mrr`, `users`) on 'valid' or 'test'."""
        histories, targets = self.split.eval_examples(split)
        users = self._valid_users if split == "valid" else None
        total = None
        batches = pipeline.eval_batches(
            histories,
            targets,
            num_items=self.split.num_items,
            max_len=self.model.max_len,
            batch_size=self.batch_size,
            causal=self.causal,
            users=users,
        )
        with jax.set_mesh(self.mesh):
            for batch in batches:
                out = self._batch_metrics(params, sharding_lib.put_batch(batch, self.mesh))
                total = out if total is None else metrics_lib.accumulate(total, out)
        result = metrics_lib.finalize(jax.device_get(total))
        result["users"] = int(len(targets) if users is None else len(users))
        return result
