"""CPU kernels compiled on first use and called through XLA's FFI.

`distill_rows` (source: `distill_rows.cc` beside this file) computes the
per-row cross-entropy, the distillation KL and, optionally, the gradient of
``alpha·CE + (1 − alpha)·T²·KL`` with respect to the student logits, in one
pass over each row where XLA's CPU backend makes about ten (BENCHMARKS.md,
"Where the CPU step time goes"); `losses.distill_loss(..., impl='cpu_kernel')`
uses it. `distill_rows_hidden` does the same from the student's hidden states
and table, computing the (narrow) student's logits itself, a few rows at a
time in cache, so they never go through memory; the trainer's
`config.loss.form='cpu_kernel'` uses it. `cross_entropy_rows_hidden` is that
pass without a teacher (cross-entropy: teachers and students trained alone).
`block_rows_hidden` runs either over one block of a vocab-sharded catalogue in
two phases (the rows' statistics over the block; then, from the whole rows',
the gradient's products). All run their rows on XLA's own CPU thread pool.

The shared library is built with the system C++ compiler (``$CXX``, else
``c++``; C++20, ``-O3 -march=native``) against the XLA FFI headers that ship
with jaxlib, and cached under ``$DISTILL_JAX_KERNEL_CACHE`` (default
``~/.cache/distill_jax/kernels``), keyed by the source, the flags, the jaxlib
version and the CPU's feature flags. No compiler means a clear error, never a
silent fallback: the plain loss needs no kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

_SOURCE = pathlib.Path(__file__).with_name("distill_rows.cc")
# -ffp-contract=fast: a * b + c becomes one fused multiply-add (ISO C++ mode
# turns that off by default); no other fast-math: -inf must stay -inf.
_FLAGS = (
    "-std=c++20",
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
)
_TARGETS = {
    "distill_jax_distill_rows_stats": "DistillJaxDistillRowsStats",
    "distill_jax_distill_rows_grad": "DistillJaxDistillRowsGrad",
    "distill_jax_distill_rows_hidden_stats": "DistillJaxDistillRowsHiddenStats",
    "distill_jax_distill_rows_hidden_grad": "DistillJaxDistillRowsHiddenGrad",
    "distill_jax_ce_rows_hidden_stats": "DistillJaxCeRowsHiddenStats",
    "distill_jax_ce_rows_hidden_grad": "DistillJaxCeRowsHiddenGrad",
    "distill_jax_block_rows_stats": "DistillJaxBlockRowsStats",
    "distill_jax_block_rows_grad": "DistillJaxBlockRowsGrad",
}
# Per-row statistics of a block of items (`block_rows_hidden`): the student's
# maximum m_s, sum exp(s − m_s), sum exp((s − m_s)/T); the teacher's maximum
# m_t, sum exp((t − m_t)/T); the KL's cross term sum e^a (a − b); the sum of
# the label logits in the block and how many labels it holds.
BLOCK_STATS = 8


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded."""


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("DISTILL_JAX_KERNEL_CACHE")
    if root:
        return pathlib.Path(root)
    return pathlib.Path.home() / ".cache" / "distill_jax" / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(
            f"config.loss.form='cpu_kernel' (and 'auto' on the CPU) needs a C++20 compiler "
            f"to build {_SOURCE.name}, and {cxx!r} (from $CXX, default 'c++') is not on "
            "PATH: install one (e.g. `apt-get install g++`) for the fused CPU kernel, or "
            "set config.loss.form='dense'."
        )
    return path


def library_path() -> pathlib.Path:
    """Builds the kernel library if needed; returns its path."""
    source = _SOURCE.read_bytes()
    cxx = _compiler()
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join(_FLAGS).encode(), jaxlib.__version__.encode(), _cpu_flags().encode()]
        )
    ).hexdigest()[:16]
    out = _cache_dir() / f"distill_rows_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name, then rename: concurrent processes (a
    # multi-process run) never load a half-written file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = pathlib.Path(tmp) / out.name
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(tmp_out)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(
                f"building {_SOURCE} failed (exit {result.returncode}): {' '.join(cmd)}\n"
                f"{result.stderr[-4000:]}"
            )
        os.replace(tmp_out, out)
    return out


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or loaded here, in one line; None when it can.

    Tried once per process (the build is cached on disk, the answer here).
    """
    try:
        _register()
    except KernelBuildError as e:
        return str(e).splitlines()[0]
    except OSError as e:  # a library that does not load
        return f"loading the kernel library failed: {e}"
    return None


def available() -> bool:
    """Whether the kernel can be built and loaded here (a compiler is present)."""
    return unavailable_reason() is None


def distill_rows(
    student_logits: jax.Array,
    student_bias: jax.Array,
    teacher_logits: jax.Array,
    teacher_bias: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    labelled: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
    *,
    mask_first: bool,
    with_grad: bool,
) -> tuple[jax.Array, ...]:
    """Per-row ``(ce, kl)``; with `with_grad` also the gradient and its column sums.

    The logits of a row are ``student_logits[r] + student_bias`` and
    ``teacher_logits[r] + teacher_bias``.

    Args:
      student_logits, teacher_logits: ``[N, V]`` float32 (e.g. the bias-free
        products ``h @ E.T``).
      student_bias, teacher_bias: ``[V]`` float32 (zeros for logits that
        already include it).
      labels: ``[N]`` int32 targets (read on `labelled` rows only).
      valid: ``[N]`` bool; other rows get ce = kl = 0 and a zero gradient.
      labelled: ``[N]`` bool, the valid rows whose CE counts (0 elsewhere).
      temperature, alpha: float32 scalars.
      mask_first: treat column 0 (the padding item) as -inf for both.
      with_grad: also return ``grad = valid·(alpha·labelled·(softmax(s) −
        onehot) + (1 − alpha)·T·(softmax(s/T) − softmax(t/T)))`` ``[N, V]``
        and its column sums ``[V]`` (the output bias's gradient).
    """
    _register()
    rows, items = student_logits.shape
    return _call(
        "distill_jax_distill_rows",
        rows,
        items,
        (student_logits.astype(jnp.float32),),
        student_bias,
        teacher_logits,
        teacher_bias,
        labels,
        valid,
        labelled,
        temperature,
        alpha,
        mask_first=mask_first,
        with_grad=with_grad,
    )


def distill_rows_hidden(
    student_hidden: jax.Array,
    student_table: jax.Array,
    student_bias: jax.Array,
    teacher_logits: jax.Array,
    teacher_bias: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    labelled: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
    *,
    mask_first: bool,
    with_grad: bool,
    seen: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """:func:`distill_rows` from the student's hidden states and table.

    The student's logits of row r are ``student_hidden[r] @ student_table.T
    + student_bias``, computed in float32 four rows at a time in cache; so is
    their gradient ``grad`` (as in :func:`distill_rows`), and neither is ever
    stored: the kernel returns what backpropagation needs from it instead.

    Args:
      student_hidden: ``[N, D]`` float32.
      student_table: ``[V, D]`` float32 (passed to the kernel transposed).
      seen: optional ``[N, S]`` ids each row leaves out of both softmaxes
        (exclude_history; 0 = none).
      The others: as :func:`distill_rows`.

    Returns:
      ``(ce, kl)`` ``[N]``; with `with_grad` also ``grad @ student_table``
      ``[N, D]``, ``grad.T @ student_hidden`` ``[V, D]`` and ``grad.sum(0)``
      ``[V]``, where ``grad`` is :func:`distill_rows`'s gradient with respect
      to the student's logits (rows with ``valid`` false add nothing, whatever
      their hidden states hold).
    """
    _register()
    f32 = jnp.float32
    rows, dim, items = _check_tower("distill_rows_hidden", student_hidden, student_table)
    outs = [_out(rows), _out(rows)] + (_grad_outs(rows, dim, items) if with_grad else [])
    suffix = "grad" if with_grad else "stats"
    call = jax.ffi.ffi_call(
        f"distill_jax_distill_rows_hidden_{suffix}", tuple(outs), vmap_method="sequential"
    )
    out = call(
        student_hidden.astype(f32),
        student_table.astype(f32).T,
        student_bias.astype(f32),
        teacher_logits.astype(f32),
        teacher_bias.astype(f32),
        labels.astype(jnp.int32),
        _seen(seen, rows),
        valid.astype(f32),
        labelled.astype(f32),
        jnp.asarray(temperature, f32),
        jnp.asarray(alpha, f32),
        mask_first=mask_first,
    )
    return _transposed_table_grad(out, with_grad)


def cross_entropy_rows_hidden(
    student_hidden: jax.Array,
    student_table: jax.Array,
    student_bias: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    mask_first: bool,
    with_grad: bool,
    seen: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Per-row cross-entropy from the student's hidden states and table: no teacher.

    :func:`distill_rows_hidden` at ``alpha = 1`` without the teacher's passes:
    row r's logits are ``s = student_hidden[r] @ student_table.T +
    student_bias`` (column 0 at -inf with `mask_first`, the `seen` ids at -inf),
    ``ce[r] = logsumexp(s) − mean_k s[labels[r, k]]``, and the gradient with
    respect to the logits is ``softmax(s) − mean_k onehot(labels[r, k])``.

    Args:
      student_hidden: ``[N, D]`` float32.
      student_table: ``[V, D]`` float32.
      student_bias: ``[V]`` float32.
      labels: ``[N]`` int32 targets, or ``[N, K]`` (K targets of weight 1/K
        each: the teacher's top-k); an id outside ``[0, V)`` on a valid row
        gives NaN.
      valid: ``[N]`` bool; other rows get ce = 0 and add no gradient.
      mask_first: treat column 0 (the padding item) as -inf.
      with_grad: also return the gradient's products.
      seen: optional ``[N, S]`` ids each row leaves out (exclude_history; 0 =
        none).

    Returns:
      ``(ce,)`` ``[N]``; with `with_grad` also ``grad @ student_table``
      ``[N, D]``, ``grad.T @ student_hidden`` ``[V, D]`` and ``grad.sum(0)``
      ``[V]``.
    """
    _register()
    f32 = jnp.float32
    rows, dim, items = _check_tower("cross_entropy_rows_hidden", student_hidden, student_table)
    outs = [_out(rows)] + (_grad_outs(rows, dim, items) if with_grad else [])
    suffix = "grad" if with_grad else "stats"
    call = jax.ffi.ffi_call(
        f"distill_jax_ce_rows_hidden_{suffix}", tuple(outs), vmap_method="sequential"
    )
    out = call(
        student_hidden.astype(f32),
        student_table.astype(f32).T,
        student_bias.astype(f32),
        labels.astype(jnp.int32),
        _seen(seen, rows),
        valid.astype(f32),
        mask_first=mask_first,
    )
    return _transposed_table_grad(out, with_grad)


def block_rows_hidden(
    student_hidden: jax.Array,
    table_block: jax.Array,
    bias_block: jax.Array,
    teacher_logits: jax.Array | None,
    teacher_bias: jax.Array | None,
    labels: jax.Array,
    valid: jax.Array,
    labelled: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
    offset: jax.Array,
    *,
    valid_cols: int,
    mask_first: bool,
    seen: jax.Array | None = None,
    stats: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel over one block of a vocab-sharded catalogue, in two phases.

    The block holds items ``offset .. offset + B − 1`` (`table_block` ``[B,
    D]``, `bias_block` and `teacher_bias` ``[B]``, `teacher_logits` ``[N,
    B]``); `labels` and `seen` are item ids of the whole catalogue, and items
    from `valid_cols` on (a padded table's rows) are -inf like the padding.
    Without a teacher (None) the loss is cross-entropy (alpha = 1).

    Args:
      stats: None: return each row's statistics over this block
        (``[N, BLOCK_STATS]``, see `BLOCK_STATS`). Given: the whole row's,
        ``(m_s, Σ exp(s − m_s), Σ exp((s − m_s)/T), m_t, Σ exp((t − m_t)/T),
        ·, ·, ·)``; then return the backward products of the gradient with
        respect to this block's logits (as :func:`distill_rows_hidden`:
        ``grad @ table_block`` ``[N, D]``, ``grad.T @ h`` ``[B, D]``,
        ``grad.sum(0)`` ``[B]``).
      The others: as :func:`distill_rows_hidden`.
    """
    _register()
    f32 = jnp.float32
    rows, dim, items = _check_tower("block_rows_hidden", student_hidden, table_block)
    teacher = teacher_logits is not None
    if not teacher:  # not read
        teacher_logits, teacher_bias = jnp.zeros((rows, 0), f32), jnp.zeros((0,), f32)
    args = [
        student_hidden.astype(f32),
        table_block.astype(f32).T,
        bias_block.astype(f32),
        teacher_logits.astype(f32),
        teacher_bias.astype(f32),
        labels.reshape(rows, -1).astype(jnp.int32),
        _seen(seen, rows),
        valid.astype(f32),
        labelled.astype(f32),
        jnp.asarray(temperature, f32),
        jnp.asarray(alpha, f32),
        jnp.asarray(offset, jnp.int32),
    ]
    attrs = dict(mask_first=mask_first, valid_cols=int(valid_cols), teacher=teacher)
    if stats is None:
        outs = (_out(rows, BLOCK_STATS),)
        call = jax.ffi.ffi_call("distill_jax_block_rows_stats", outs, vmap_method="sequential")
        (block_stats,) = call(*args, **attrs)
        return block_stats
    call = jax.ffi.ffi_call(
        "distill_jax_block_rows_grad",
        tuple(_grad_outs(rows, dim, items)),
        vmap_method="sequential",
    )
    d_h, d_table_t, bias_grad = call(*args, stats.astype(f32), **attrs)
    return d_h, d_table_t.T, bias_grad


def _check_tower(name, hidden, table):
    rows, dim = hidden.shape
    items, table_dim = table.shape
    if table_dim != dim:
        raise ValueError(
            f"{name}: hidden states [{rows}, {dim}] and table [{items}, {table_dim}] "
            "disagree on the width."
        )
    return rows, dim, items


def _out(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _grad_outs(rows, dim, items):
    # dh [N, D], the table's gradient transposed [D, V], the bias's [V].
    return [_out(rows, dim), _out(dim, items), _out(items)]


def _seen(seen, rows):
    # No exclusion: no columns.
    return jnp.zeros((rows, 0), jnp.int32) if seen is None else seen.astype(jnp.int32)


def _transposed_table_grad(out, with_grad):
    if not with_grad:
        return tuple(out)
    *head, d_table_t, bias_grad = out
    return (*head, d_table_t.T, bias_grad)


def _call(
    prefix,
    rows,
    items,
    student,
    student_bias,
    teacher_logits,
    teacher_bias,
    labels,
    valid,
    labelled,
    temperature,
    alpha,
    *,
    mask_first,
    with_grad,
):
    f32 = jnp.float32
    outs = [_out(rows), _out(rows)]
    if with_grad:
        outs += [_out(rows, items), _out(items)]
    target = f"{prefix}_grad" if with_grad else f"{prefix}_stats"
    call = jax.ffi.ffi_call(target, tuple(outs), vmap_method="sequential")
    return call(
        *student,
        student_bias.astype(f32),
        teacher_logits.astype(f32),
        teacher_bias.astype(f32),
        labels.astype(jnp.int32),
        valid.astype(f32),
        labelled.astype(f32),
        jnp.asarray(temperature, f32),
        jnp.asarray(alpha, f32),
        mask_first=mask_first,
    )
