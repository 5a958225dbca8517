"""``config.loss.form='auto'``: the fastest form that runs a stage's loss here.

`choose` is a pure function of the stage (its target and options) and of
where it runs (backend, mesh, whether the CPU kernel builds); the train step
(`distill_jax/train/steps.py`) resolves 'auto' through `losses.resolve_form`
with `here()` (this process's backend) and logs the choice in one line
(`report`), once per distinct choice in a process. The forms are tried in
this order and the first that fits wins:

* on the CPU backend, ``cpu_kernel`` (the fused C++ pass; it needs a C++20
  compiler, so without one the log says so and what to install);
* on GPU/TPU, `ACCELERATOR_FORMS`: the slot for ``pallas``, the fused loss
  as Pallas kernels (`pallas_kernel.py`; not on a vocab-sharded mesh; never
  on the CPU, where it is only interpreted and the C++ kernel is the fused
  form); empty until the kernels have been run and timed on a device;
* ``vocab_parallel`` on a mesh that shards the item table along 'model'
  (the kernel runs there too, so on the CPU this serves the stages it lacks);
* ``dense``, which every target has, with every option, on any mesh.

A form fits when its (target, form) pair exists in `losses.PAIRS` with the
stage's options (exclude_history, teacher-only slots; a quantization-aware
model needs a form that calls its own `logits`), on its mesh and backend, and
can be built here (`Pair.unavailable`). All forms give the same
values and gradients (tests/test_loss_registry.py), so the choice changes
speed only. ``chunked`` is never chosen: it trades speed for memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)

AUTO = "auto"
# Above this model width XLA's own matmuls beat the C++ kernel's products on
# the CPU (benchmarks.distill_kernel, Beauty's shapes, 2 cores: the kernel's
# catalogue pass 0.78 x plain at width 32, 0.93 x at 64, 2.19 x at 128;
# BENCHMARKS.md, "Speed on the CPU"), so 'auto' keeps wider models on dense
# (the kernel pairs' `max_width`; a form named in config.loss.form ignores it).
CPU_KERNEL_MAX_WIDTH = 64
# The GPU/TPU slot: forms tried first on an accelerator backend, in order.
# Empty until 'pallas' has been compiled, run and timed on a device: its
# kernels are tested on the CPU in interpret mode and lowered for Triton and
# Mosaic only, and on a TPU they hold whole item tables in VMEM, so a
# default that might fail to compile or fit waits for that measurement
# (`--config.loss.form=pallas` runs it now).
ACCELERATOR_FORMS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a stage runs: the backend, the mesh's devices, the item table's shards."""

    backend: str
    devices: int = 1
    vocab_shards: int = 1
    # The width of the hidden states the loss scores against the item table
    # (the trained model's embed_dim); 0: not known.
    width: int = 0


def _backend() -> str:
    return jax.default_backend()


def here(devices: int = 1, vocab_shards: int = 1) -> Where:
    """`Where` on this process's backend (jax's default) and the given mesh."""
    return Where(_backend(), devices, vocab_shards)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen form and the one-line reason the log gives."""

    form: str
    reason: str
    # A faster form fits the stage but cannot be built here (logged as a warning).
    fallback: bool = False


def preference(backend: str, vocab_shards: int) -> tuple[str, ...]:
    """The forms `choose` tries, fastest first, for this backend and table layout."""
    fused = ("cpu_kernel",) if backend == "cpu" else ACCELERATOR_FORMS
    sharded = ("vocab_parallel",) if vocab_shards > 1 else ()
    return (*fused, *sharded, "dense")


def unfit(
    pair: Any,
    where: Where,
    exclude_history: bool = False,
    teacher_only_slots: bool = False,
    model_logits: bool = False,
) -> str | None:
    """Why `pair` (a `losses.Pair` or None) cannot run the stage `where`; None if it can.

    `model_logits`: the stage's model scores the catalogue its own way (a
    quantization-aware copy), so the loss must call its `logits` method.
    """
    if pair is None:
        return "no such pair"
    if exclude_history and not pair.exclude_history:
        return "does not exclude history"
    if teacher_only_slots and not pair.teacher_only_slots:
        return "has no teacher-only slots"
    if model_logits and not pair.model_logits:
        return "scores the catalogue itself, not through the model's own (quantized) logits"
    if pair.backends is not None and where.backend not in pair.backends:
        return f"runs on {'/'.join(pair.backends)} only"
    if pair.meshes == "one" and where.devices != 1:
        return f"runs on one device, the mesh has {where.devices}"
    if pair.meshes == "data" and where.vocab_shards > 1:
        return f"has no vocab-sharded form ({where.vocab_shards} shards)"
    if pair.max_width and where.width > pair.max_width:
        return (
            f"slower than XLA's products above width {pair.max_width} "
            f"(this model's is {where.width})"
        )
    if pair.unavailable is not None:
        return pair.unavailable()
    return None


def choose(
    pairs: Mapping[tuple[str, str], Any],
    target: str,
    where: Where,
    *,
    exclude_history: bool = False,
    teacher_only_slots: bool = False,
    model_logits: bool = False,
) -> Choice:
    """The first form of `preference` whose pair fits the stage, and why."""
    options = (exclude_history, teacher_only_slots, model_logits)
    passed, missing = [], None
    for form in preference(where.backend, where.vocab_shards):
        pair = pairs.get((target, form))
        why = unfit(pair, where, *options)
        if why is None:
            break
        passed.append(f"not {form!r}: {why}")
        if missing is None and pair is not None and pair.unavailable is not None:
            # Whether the stage fits this form, which only cannot be built here.
            built = dataclasses.replace(pair, unavailable=None)
            if unfit(built, where, *options) is None:
                missing = why
    else:  # 'dense' fits every stage; reaching here means PAIRS lost a line
        raise ValueError(f"no loss form runs the {target!r} target here: {'; '.join(passed)}")
    mesh = f"{where.devices} device(s), item table in {where.vocab_shards} shard(s)"
    if missing is not None:
        return Choice(
            form,
            f"config.loss.form='auto' falls back to {form!r} for the {target!r} target "
            f"({where.backend} backend, {mesh}): {missing}",
            fallback=True,
        )
    notes = [f"{where.backend} backend, {mesh}"]
    if form == "cpu_kernel":
        notes.append("the fused C++ kernel builds here")
    if form == "pallas":
        notes.append("the fused Pallas kernels (Triton on GPU, Mosaic on TPU)")
    notes += passed
    head = f"config.loss.form='auto' chose {form!r} for the {target!r} target"
    return Choice(form, f"{head} ({'; '.join(notes)})")


_logged: set[str] = set()


def report(choice: Choice) -> None:
    """Logs the choice once per process (several stages often make the same one)."""
    if choice.reason not in _logged:
        _logged.add(choice.reason)
        log.log(logging.WARNING if choice.fallback else logging.INFO, "%s", choice.reason)
