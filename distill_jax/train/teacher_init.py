"""Starting a student from its teacher's tables (`config.distill.init_from_teacher`).

With `'pca'`, the distilled student's item table starts as the teacher's item
table projected on its top `D_s` principal directions, so items the teacher
placed close together start close together in the student too; most of a
small recommender's parameters are that table (at D=16 on Beauty, 91% of the
student), and the rows of rarely seen items are where training alone has least
to go on. The position table (and BERT4Rec's mask embedding) go through the
same projection, so the input sum `item + position` is the projection of the
teacher's; the output bias (the per-item prior) is copied. Transformer blocks
keep their random init: their widths differ from the teacher's.

Scale: the projected tables are rescaled by one factor so that the item
table's root mean square equals the student's initialiser's (D_s^-1/2), which
keeps the first steps of training as they are from a random start.

All reductions are over the rows of the (possibly vocabulary-sharded) tables:
the `[D_t, D_t]` covariance and its eigenvectors are small, and no table is
gathered onto one device.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

METHODS = ("none", "pca")


def pca_params(
    student: dict[str, Any], teacher: dict[str, Any], num_items: int | None = None
) -> dict[str, Any]:
    """The student's params with tables projected from the teacher's.

    Args:
      student: the student's unboxed params (its random init).
      teacher: the teacher's unboxed params, with the same catalogue and
        max_len and an embedding width >= the student's.
      num_items: V, when the tables carry padding rows beyond V+1 (a sharded
        catalogue); None means every row but row 0 is an item.

    Returns:
      A copy of `student` whose `item_embedding`, `position_embedding`,
      `mask_embedding` (when both models have one) and `output_bias` come from
      the teacher.
    """
    t_items = teacher["item_embedding"].astype(jnp.float32)
    s_items = student["item_embedding"]
    if t_items.shape[0] != s_items.shape[0]:
        raise ValueError(
            f"teacher item table has {t_items.shape[0]} rows, the student's "
            f"{s_items.shape[0]}: distill.init_from_teacher='pca' needs the same catalogue"
        )
    d_s, d_t = s_items.shape[1], t_items.shape[1]
    if d_s > d_t:
        raise ValueError(
            f"student embed_dim={d_s} > teacher embed_dim={d_t}: "
            "distill.init_from_teacher='pca' projects onto fewer directions, not more"
        )
    # Row 0 is padding: it never scores and is never a target, so it does not
    # count towards the mean or the covariance; nor do a sharded table's padding rows.
    rows = jnp.arange(t_items.shape[0])
    real = rows > 0 if num_items is None else (rows > 0) & (rows <= num_items)
    weight = real.astype(jnp.float32)[:, None]
    count = jnp.sum(weight)
    mean = jnp.sum(weight * t_items, axis=0) / count
    centred = t_items - mean
    cov = (weight * centred).T @ centred / count
    _, vecs = jnp.linalg.eigh(cov)  # eigenvalues ascending
    basis = vecs[:, ::-1][:, :d_s]  # [D_t, D_s], the top D_s directions
    items = centred @ basis
    rms = jnp.sqrt(jnp.sum(weight * items**2) / (count * d_s))
    scale = d_s**-0.5 / jnp.maximum(rms, 1e-12)
    out = dict(student)
    out["item_embedding"] = (items * scale).astype(s_items.dtype)
    # x + p = (x - mean) + (p + mean): the mean goes with the positions.
    out["position_embedding"] = ((teacher["position_embedding"] + mean) @ basis * scale).astype(
        student["position_embedding"].dtype
    )
    if "mask_embedding" in student and "mask_embedding" in teacher:
        out["mask_embedding"] = ((teacher["mask_embedding"] - mean) @ basis * scale).astype(
            student["mask_embedding"].dtype
        )
    out["output_bias"] = teacher["output_bias"].astype(student["output_bias"].dtype)
    return out


def initial_params(
    method: str, student: Any, teacher: Any, shardings: Any, mesh, num_items: int | None = None
) -> Any:
    """The student's starting params under `method` (one of METHODS); `num_items` as in
    `pca_params`."""
    if method == "none":
        return student
    if method != "pca":
        raise ValueError(f"distill.init_from_teacher={method!r}: expected one of {METHODS}")
    with jax.set_mesh(mesh):
        return jax.jit(functools.partial(pca_params, num_items=num_items), out_shardings=shardings)(
            student, teacher
        )
