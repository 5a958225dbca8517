"""Making the distilled student smaller, and shipping it.

The compress stage makes variants of a trained student (``config.compress``):

* ``pruned<P>``: P% of its matrices' weights cut by L1 magnitude, gradually,
  during a distillation fine-tuning (``prune.py``);
* ``int8``: int8 weights, post-training (``quantize.py``, qwix);
* ``int8_act``: int8 weights and int8 inputs of every matrix product
  (dynamic per-token scales), post-training;
* ``int8_qat``: int8 after a quantization-aware distillation fine-tuning;
* ``lowrank<R>``: its item table factorized to rank R by truncated SVD, then
  fine-tuned (``lowrank.py``).

Each is evaluated like every other model and reported as
``<source>_<variant>`` (e.g. ``student_kd_pruned50``). The export stage
writes one of them (or any trained stage) as a self-contained artefact
(``export.py``) that ``distill_jax.recommend`` serves.
"""

import dataclasses
import re

import ml_collections

KINDS = ("pruned", "int8", "int8_act", "int8_qat", "lowrank")
_PATTERN = re.compile(r"^(pruned)(\d+)$|^(lowrank)(\d+)$|^(int8_qat)$|^(int8_act)$|^(int8)$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compressed variant: its kind and its number (percent cut, or rank)."""

    name: str  # as written in config.compress.variants, e.g. 'pruned50'
    kind: str  # one of KINDS
    amount: int = 0  # pruned: percent of prunable weights cut; lowrank: the rank

    @property
    def fine_tuned(self) -> bool:
        """Whether the variant trains (int8 and int8_act are post-training)."""
        return self.kind not in ("int8", "int8_act")


def parse_variants(text: str) -> list[Variant]:
    """`config.compress.variants` ('pruned50,int8,...') as Variants; bad names say why."""
    out = []
    for name in [v.strip() for v in text.split(",") if v.strip()]:
        m = _PATTERN.match(name)
        if m is None:
            raise ValueError(
                f"config.compress.variants: {name!r} is not a variant; expected "
                "pruned<percent> (e.g. pruned50), int8, int8_act, int8_qat or lowrank<rank> "
                "(e.g. lowrank8)"
            )
        groups = [g for g in m.groups() if g is not None]
        kind, amount = groups[0], int(groups[1]) if len(groups) > 1 else 0
        if kind == "pruned" and not 0 < amount < 100:
            raise ValueError(f"config.compress.variants: {name!r} cuts {amount}%; expected 1 to 99")
        if name in [v.name for v in out]:
            raise ValueError(f"config.compress.variants: {name!r} is listed twice")
        out.append(Variant(name, kind, amount))
    return out


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
    """The report names of the configured variants: '<source>_<variant>'."""
    return [f"{config.compress.source}_{v.name}" for v in parse_variants(config.compress.variants)]
