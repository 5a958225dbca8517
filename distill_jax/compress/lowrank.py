"""A low-rank item table: truncated SVD of the trained table, then distillation fine-tuning.

The student's tied table ``E [V+1, D]`` becomes ``U [V+1, r] @ W [r, D]``
(``item_rank=r`` in the model), the best rank-r approximation in the
Frobenius norm (Eckart-Young): ``U = U_r S_r``, ``W = V_r^T``. Rows beyond
V+1 (a sharded table's padding) stay zero. Every other parameter is copied.
"""

from typing import Any

import numpy as np


def factorize(params: Any, rank: int, num_items: int) -> tuple[Any, dict]:
    """Params of the rank-`rank` model from a full-table model's params.

    Returns:
      (the new params, with `item_embedding [rows, r]` and `item_projection
      [r, D]`; {'rank', 'energy': share of the table's squared Frobenius norm
      the rank keeps, 'relative_error': ||E - U W||_F / ||E||_F}).
    """
    table = np.asarray(params["item_embedding"], np.float64)
    if "item_projection" in params:
        raise ValueError("the item table is already factorized")
    if not 0 < rank < table.shape[1]:
        raise ValueError(
            f"config.compress: rank {rank} must be in [1, {table.shape[1]}) (the table's width)"
        )
    rows = table[: num_items + 1]
    u, s, vt = np.linalg.svd(rows, full_matrices=False)
    left = np.zeros((table.shape[0], rank), np.float64)
    left[: num_items + 1] = u[:, :rank] * s[:rank]
    right = vt[:rank]
    out = dict(params)
    out["item_embedding"] = left.astype(np.float32)
    out["item_projection"] = right.astype(np.float32)
    norm = float(np.sum(s**2))
    info = {
        "rank": rank,
        "energy": float(np.sum(s[:rank] ** 2) / norm) if norm else 1.0,
        "relative_error": float(
            np.linalg.norm(rows - left[: num_items + 1] @ right) / np.sqrt(norm)
        )
        if norm
        else 0.0,
    }
    return out, info
