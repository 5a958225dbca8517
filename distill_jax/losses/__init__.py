"""Catalogue losses: what is taught (the target) × how the catalogue is computed (the form).

A **target** says what the student learns at each slot:

* ``label``: the held-out next item (cross-entropy): teachers and the
  student trained alone;
* ``soft``: ``alpha·CE + (1 − alpha)·T²·KL(teacher_T ‖ student_T)``;
* ``hard``: cross-entropy against the teacher's top-k items (1/k each);
* ``ranking``: the teacher's top-k order, listwise (`ranking.py`: position-
  weighted positives or the relaxed Plackett-Luce loss), mixed with CE by alpha;
* ``cached``: the soft target from stored soft labels, the teacher's top-K
  log-probabilities and the mass of the rest (`cached.py`), no teacher in memory;
* ``ensemble``: the soft target with several teachers' softmaxes averaged
  (`distill_jax/train/ensemble.py` gives their log-mixture as the teacher's logits).

The targets other than ``label`` are the methods of ``config.distill.method``.

A **form** says how the ``[N, V]`` part is computed from the student's hidden
states and item table:

* ``dense``: the full logits (`dense.py`; every target, any mesh, what `auto` falls back to);
* ``chunked``: a scan over item chunks, never more than ``[N, chunk]``
  logits (`chunked.py`);
* ``vocab_parallel``: logits sharded along the mesh axis 'model', reduced
  with shard_map, never gathered (`vocab_parallel.py`);
* ``cpu_kernel``: the fused C++ CPU kernel (`cpu_kernel.py`; on a mesh that
  splits the table along 'model', `kernel_vocab.py`);
* ``pallas``: the fused loss as Pallas kernels, tile by tile over the
  catalogue (`pallas_kernel.py`; GPU and TPU, rows split along 'data', the
  item table whole on each device; interpreted on the CPU, for tests).

``config.loss.form='auto'`` (the default) is the fastest form that runs a
stage here (`auto.py`; `resolve_form`).

`PAIRS` is the one table of the (target, form) pairs that exist, with the
options each supports: ``exclude_history`` (each slot's already-seen window
items left out of every softmax, never its target) and ``teacher_only_slots``
(slots the teacher alone supervises: `config.distill.last_item_slot`).
Config validation refuses any other pair or option by name; the trainer calls
`compute`. A new target or form is one function and one line of `PAIRS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from distill_jax.losses import (
    auto,
    cached,
    chunked,
    cpu_kernel,
    kernel_lib,
    pallas_kernel,
    ranking,
    vocab_parallel,
)
from distill_jax.losses.common import SumAndCount, masked_mean, masked_sum_and_count, sanitize
from distill_jax.losses.dense import (
    binary_distill,
    binary_distill_sum,
    cross_entropy,
    cross_entropy_sum,
    distill_loss,
    distill_loss_sum,
    exclude_columns,
    hard_label_distill,
    hard_label_distill_sum,
    kl_distill,
    kl_distill_sum,
)

__all__ = [
    "AUTO",
    "FORMS",
    "HIDDEN_LOSSES",
    "PAIRS",
    "RANKING_LOSSES",
    "TARGETS",
    "LossInputs",
    "Pair",
    "SumAndCount",
    "binary_distill",
    "binary_distill_sum",
    "compute",
    "resolve_form",
    "cross_entropy",
    "cross_entropy_sum",
    "distill_loss",
    "distill_loss_sum",
    "exclude_columns",
    "hard_label_distill",
    "hard_label_distill_sum",
    "kl_distill",
    "kl_distill_sum",
    "masked_mean",
    "masked_sum_and_count",
    "supported",
]


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What one train step hands a loss, at its packed target slots.

    Attributes:
      hidden: ``[N, D]`` student hidden states (gradients flow).
      table, bias: the student's item table ``[R, D]`` and output bias ``[R]``
        (``R >= V+1``: padding rows on a vocab-sharded mesh).
      logits: ``() -> [N, R]`` the student's logits (the model's own `logits`).
      labels: ``[N]`` target ids; where: ``[N]`` the slots that have one.
      num_valid_rows: V+1, the table rows that are the catalogue.
      teacher_hidden, teacher_table, teacher_bias, teacher_logits: the
        teacher's, under stop_gradient (None without a teacher).
      kd_where: ``[N]`` the slots the teacher supervises, a superset of
        `where` (teacher-only slots), or None when they are `where`.
      seen: ``[N, S]`` ids each slot leaves out (exclude_history), or None.
      cached: the 'cached' target's stored teacher outputs ``(top_ids [N, K],
        top_log_p [N, K], rest_log_p [N])``, or None.
    """

    hidden: jax.Array
    table: jax.Array
    bias: jax.Array
    logits: Callable[[], jax.Array]
    labels: jax.Array
    where: jax.Array
    num_valid_rows: int
    teacher_hidden: jax.Array | None = None
    teacher_table: jax.Array | None = None
    teacher_bias: jax.Array | None = None
    teacher_logits: Callable[[], jax.Array] | None = None
    kd_where: jax.Array | None = None
    seen: jax.Array | None = None
    cached: tuple[jax.Array, jax.Array, jax.Array] | None = None

    def student_logits(self) -> jax.Array:
        z = self.logits()
        return z if self.seen is None else exclude_columns(z, self.seen)

    def teacher_logits_excluded(self) -> jax.Array:
        t = jax.lax.stop_gradient(self.teacher_logits())
        return t if self.seen is None else exclude_columns(t, self.seen)

    @property
    def teacher_where(self) -> jax.Array:
        return self.where if self.kd_where is None else self.kd_where

    @property
    def label_where(self) -> jax.Array | None:
        # With teacher-only slots, only `where` carries a label.
        return None if self.kd_where is None else self.where

    def teacher_tower(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.teacher_hidden, self.teacher_table, self.teacher_bias


# Settings every pair may read: temperature, alpha, k (hard), chunk_size,
# ranking_k, ranking_loss, ranking_lambda (ranking).
Settings = dict[str, Any]


def _label_dense(x: LossInputs, s: Settings) -> jax.Array:
    return cross_entropy(x.student_logits(), x.labels, where=x.where)


def _label_chunked(x: LossInputs, s: Settings) -> jax.Array:
    return chunked.chunked_cross_entropy(
        x.hidden,
        x.table,
        x.bias,
        x.labels,
        x.where,
        chunk_size=s["chunk_size"],
        seen=x.seen,
        num_valid_rows=x.num_valid_rows,
    )


def _vp_logits(hidden, table, bias, num_valid_rows) -> jax.Array:
    return vocab_parallel.vocab_parallel_logits(hidden, table, bias, num_valid_rows=num_valid_rows)


def _label_vocab_parallel(x: LossInputs, s: Settings) -> jax.Array:
    logits = _vp_logits(x.hidden, x.table, x.bias, x.num_valid_rows)
    return vocab_parallel.vocab_parallel_cross_entropy(logits, x.labels, where=x.where)


def _soft_dense(x: LossInputs, s: Settings) -> jax.Array:
    return distill_loss(
        x.student_logits(),
        x.teacher_logits_excluded(),
        x.labels,
        temperature=s["temperature"],
        alpha=s["alpha"],
        where=x.teacher_where,
        label_where=x.label_where,
    )


def _soft_chunked(x: LossInputs, s: Settings) -> jax.Array:
    return chunked.chunked_distill_loss(
        x.hidden,
        x.table,
        x.bias,
        *x.teacher_tower(),
        x.labels,
        x.where,
        temperature=s["temperature"],
        alpha=s["alpha"],
        chunk_size=s["chunk_size"],
        seen=x.seen,
        num_valid_rows=x.num_valid_rows,
    )


def _soft_vocab_parallel(x: LossInputs, s: Settings) -> jax.Array:
    logits = _vp_logits(x.hidden, x.table, x.bias, x.num_valid_rows)
    t_logits = jax.lax.stop_gradient(
        _vp_logits(x.teacher_hidden, x.teacher_table, x.teacher_bias, x.num_valid_rows)
    )
    return vocab_parallel.vocab_parallel_distill_loss(
        logits,
        t_logits,
        x.labels,
        temperature=s["temperature"],
        alpha=s["alpha"],
        where=x.where,
    )


def _fused_label(fn):
    """A label-form entry for a fused catalogue loss `fn` (cpu_kernel's, pallas_kernel's)."""

    def loss(x: LossInputs, s: Settings) -> jax.Array:
        del s
        return fn(
            x.hidden,
            x.table,
            x.bias,
            x.labels,
            x.where,
            seen=x.seen,
            num_valid_rows=x.num_valid_rows,
        )

    return loss


def _fused_soft(fn):
    """A soft-form entry for a fused catalogue loss `fn` (both towers, the labels, T and alpha)."""

    def loss(x: LossInputs, s: Settings) -> jax.Array:
        return fn(
            x.hidden,
            x.table,
            x.bias,
            *x.teacher_tower(),
            x.labels,
            x.teacher_where,
            x.label_where,
            temperature=s["temperature"],
            alpha=s["alpha"],
            seen=x.seen,
            num_valid_rows=x.num_valid_rows,
        )

    return loss


def _fused_hard(fn):
    """A hard-form entry for a loss that takes both towers and the top k (pallas, chunked)."""

    def loss(x: LossInputs, s: Settings) -> jax.Array:
        return fn(
            x.hidden,
            x.table,
            x.bias,
            *x.teacher_tower(),
            x.teacher_where,
            k=s["k"],
            chunk_size=s["chunk_size"],
            seen=x.seen,
            num_valid_rows=x.num_valid_rows,
        )

    return loss


_label_cpu_kernel = _fused_label(cpu_kernel.kernel_cross_entropy)
_soft_cpu_kernel = _fused_soft(cpu_kernel.kernel_distill_loss)
_label_pallas = _fused_label(pallas_kernel.pallas_cross_entropy)
_soft_pallas = _fused_soft(pallas_kernel.pallas_distill_loss)
_hard_pallas = _fused_hard(pallas_kernel.pallas_hard_label_distill)


def _hard_dense(x: LossInputs, s: Settings) -> jax.Array:
    return hard_label_distill(
        x.student_logits(), x.teacher_logits_excluded(), k=s["k"], where=x.teacher_where
    )


_hard_chunked = _fused_hard(chunked.chunked_hard_label_distill)


def _hard_cpu_kernel(x: LossInputs, s: Settings) -> jax.Array:
    # The teacher's top-k (XLA: its product and top_k) are k labels of weight
    # 1/k each for the kernel's cross-entropy.
    where = x.teacher_where
    _, top = jax.lax.top_k(sanitize(x.teacher_logits_excluded(), where), s["k"])
    return cpu_kernel.kernel_cross_entropy(
        x.hidden, x.table, x.bias, top, where, seen=x.seen, num_valid_rows=x.num_valid_rows
    )


def _ranking_dense(x: LossInputs, s: Settings) -> jax.Array:
    return ranking.ranking_distill(
        x.student_logits(),
        x.teacher_logits_excluded(),
        x.labels,
        k=s["ranking_k"],
        loss=s["ranking_loss"],
        lam=s["ranking_lambda"],
        alpha=s["alpha"],
        where=x.teacher_where,
        label_where=x.label_where,
    )


def _cached_dense(x: LossInputs, s: Settings) -> jax.Array:
    return cached.cached_distill(
        x.student_logits(),
        *x.cached,
        x.labels,
        temperature=s["temperature"],
        alpha=s["alpha"],
        where=x.teacher_where,
        label_where=x.label_where,
    )


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (target, form) that exists: its function, its options, where it runs."""

    fn: Callable[[LossInputs, Settings], jax.Array]
    exclude_history: bool = False
    teacher_only_slots: bool = False
    # The meshes it runs on: 'any'; 'data' (item tables whole on each device,
    # rows split along 'data'); 'one' (one custom call over whole arrays).
    meshes: str = "any"
    # The backends it runs on; None: any.
    backends: tuple[str, ...] | None = None
    # () -> why it cannot be built here, in one line, or None when it can.
    unavailable: Callable[[], str | None] | None = None
    # Scores the catalogue through the model's own `logits` method (so a
    # quantization-aware model's scoring is what it trains); the other forms
    # compute hidden @ table.T + bias themselves.
    model_logits: bool = False
    # 'auto' passes it over for models wider than this (it is slower there
    # than the dense form); 0: any width.
    max_width: int = 0


TARGETS = ("label", "soft", "hard", "ranking", "cached", "ensemble")
RANKING_LOSSES = ranking.LOSSES
# Hidden-state matching (config.distill.hidden_loss; distill_jax/train/steps.py).
HIDDEN_LOSSES = ("mse", "cosine")
FORMS = ("dense", "chunked", "vocab_parallel", "cpu_kernel", "pallas")
# config.loss.form: a form of FORMS, or 'auto', the fastest that fits (auto.py).
AUTO = auto.AUTO
# Targets that need a teacher; 'label' trains teachers and the scratch student.
TEACHER_TARGETS = ("soft", "hard", "ranking", "cached", "ensemble")


def _kernel_unavailable() -> str | None:
    return kernel_lib.unavailable_reason()


# Where the fused CPU kernel runs (any mesh: rows split along 'data', the
# table along 'model'), and whether it builds here.
_KERNEL = dict(
    backends=("cpu",), unavailable=_kernel_unavailable, max_width=auto.CPU_KERNEL_MAX_WIDTH
)
# The Pallas kernels on any backend (the CPU's interprets them: tests; 'auto'
# tries them on GPU/TPU only); rows split along 'data', no vocab-sharded form.
_PALLAS = dict(meshes="data", exclude_history=True)

PAIRS: dict[tuple[str, str], Pair] = {
    ("label", "dense"): Pair(_label_dense, exclude_history=True, model_logits=True),
    ("label", "chunked"): Pair(_label_chunked, exclude_history=True),
    ("label", "vocab_parallel"): Pair(_label_vocab_parallel),
    ("label", "cpu_kernel"): Pair(_label_cpu_kernel, exclude_history=True, **_KERNEL),
    ("label", "pallas"): Pair(_label_pallas, **_PALLAS),
    ("soft", "dense"): Pair(
        _soft_dense, exclude_history=True, teacher_only_slots=True, model_logits=True
    ),
    ("soft", "chunked"): Pair(_soft_chunked, exclude_history=True),
    ("soft", "vocab_parallel"): Pair(_soft_vocab_parallel),
    ("soft", "cpu_kernel"): Pair(
        _soft_cpu_kernel, exclude_history=True, teacher_only_slots=True, **_KERNEL
    ),
    ("soft", "pallas"): Pair(_soft_pallas, teacher_only_slots=True, **_PALLAS),
    ("hard", "dense"): Pair(
        _hard_dense, exclude_history=True, teacher_only_slots=True, model_logits=True
    ),
    ("hard", "chunked"): Pair(_hard_chunked, exclude_history=True, teacher_only_slots=True),
    ("hard", "cpu_kernel"): Pair(
        _hard_cpu_kernel, exclude_history=True, teacher_only_slots=True, **_KERNEL
    ),
    ("hard", "pallas"): Pair(_hard_pallas, teacher_only_slots=True, **_PALLAS),
    ("ranking", "dense"): Pair(
        _ranking_dense, exclude_history=True, teacher_only_slots=True, model_logits=True
    ),
    ("cached", "dense"): Pair(
        _cached_dense, exclude_history=True, teacher_only_slots=True, model_logits=True
    ),
    # The ensemble's logits are its log-mixture: the soft target's dense form.
    ("ensemble", "dense"): Pair(
        _soft_dense, exclude_history=True, teacher_only_slots=True, model_logits=True
    ),
}


def supported(target: str, form: str, option: str | None = None) -> bool:
    """Whether the pair exists (and, given `option`, supports it)."""
    pair = PAIRS.get((target, form))
    return pair is not None and (option is None or getattr(pair, option))


def forms_for(target: str, option: str | None = None) -> tuple[str, ...]:
    """The forms `target` exists in (with `option`, if given), in `FORMS` order."""
    return tuple(f for f in FORMS if supported(target, f, option))


def resolve_form(
    form: str,
    target: str,
    where: auto.Where,
    *,
    exclude_history: bool = False,
    teacher_only_slots: bool = False,
    model_logits: bool = False,
) -> str:
    """The form that runs `target` `where`: `form` itself, checked, or what 'auto' chooses.

    'auto' logs its choice and why in one line (`auto.choose`, once per
    distinct choice). A named form that cannot run there raises, naming
    config.loss.form and what would run. `model_logits`: the model scores
    the catalogue its own way (quantization-aware), so 'auto' takes a form
    that calls its `logits` (`auto.unfit`).
    """
    if form == auto.AUTO:
        choice = auto.choose(
            PAIRS,
            target,
            where,
            exclude_history=exclude_history,
            teacher_only_slots=teacher_only_slots,
            model_logits=model_logits,
        )
        auto.report(choice)
        return choice.form
    # Options were checked by config validation; here: the mesh and the backend,
    # which must not be touched before jax.distributed is initialised. A kernel
    # that does not build raises its own error, in full, when traced. (A named
    # form is kept for a quantization-aware model: the caller asked for it.)
    pair = dataclasses.replace(PAIRS[(target, form)], unavailable=None, max_width=0)
    why = auto.unfit(pair, where)
    if why is not None:
        raise ValueError(
            f"config.loss.form={form!r} {why} (the {target!r} target); use "
            "config.loss.form='auto' (or 'dense')."
        )
    return form


def compute(target: str, form: str, inputs: LossInputs, settings: Settings) -> jax.Array:
    """The mean loss of `target` in `form` over the slots (0.0 when none is valid)."""
    pair = PAIRS.get((target, form))
    if pair is None:
        raise ValueError(
            f"target {target!r} has no form {form!r}; forms for it: {forms_for(target)}."
        )
    return pair.fn(inputs, settings)
