"""Start-up validation of `config.distill` and of the loss each stage trains with.

Split from `config_lib` (which calls `validate`): the distillation methods,
their stages (`teacher_<n>`, `ensemble`, `soft_labels`) and their
(target, form) pairs against the table in `distill_jax.losses`.
"""

import math

import ml_collections

from distill_jax.config_checks import EXTRA_TEACHER, ConfigError, _expect, _positive_int


def validate(config: ml_collections.ConfigDict, stages: list[str]) -> None:
    """Raises ConfigError naming the first invalid key of `config.distill`."""
    from distill_jax.models import MODELS

    d = config.distill
    _expect(
        math.isfinite(d.temperature) and d.temperature > 0,
        "distill.temperature",
        d.temperature,
        "a finite temperature > 0",
    )
    _expect(0.0 <= d.alpha <= 1.0, "distill.alpha", d.alpha, "a weight in [0, 1]")
    _expect(
        isinstance(d.hard_k, int) and d.hard_k >= 1, "distill.hard_k", d.hard_k, "an integer >= 1"
    )
    _expect(
        isinstance(d.ranking_k, int) and d.ranking_k >= 1,
        "distill.ranking_k",
        d.ranking_k,
        "an integer >= 1",
    )
    from distill_jax.losses.ranking import LOSSES as RANKING_LOSSES

    _expect(
        d.ranking_loss in RANKING_LOSSES,
        "distill.ranking_loss",
        d.ranking_loss,
        f"one of {RANKING_LOSSES}",
    )
    _expect(d.ranking_lambda > 0, "distill.ranking_lambda", d.ranking_lambda, "a scale > 0")

    from distill_jax.train.teacher_init import METHODS

    _expect(
        d.init_from_teacher in METHODS,
        "distill.init_from_teacher",
        d.init_from_teacher,
        f"one of {METHODS}",
    )
    _expect(
        d.init_from_teacher != "pca" or config.student.embed_dim <= config.teacher.embed_dim,
        "distill.init_from_teacher",
        d.init_from_teacher,
        f"'none' when student.embed_dim={config.student.embed_dim} > "
        f"teacher.embed_dim={config.teacher.embed_dim} ('pca' projects onto fewer directions)",
    )
    _expect(
        isinstance(d.last_item_slot, bool), "distill.last_item_slot", d.last_item_slot, "a bool"
    )
    _expect(
        not d.last_item_slot or MODELS[config.student.name].is_causal,
        "distill.last_item_slot",
        d.last_item_slot,
        f"False for student.name={config.student.name!r} (a teacher-only slot after the "
        "last item needs a causal next-item student)",
    )
    _validate_method(config, stages)
    _validate_losses(config)


def _validate_method(config: ml_collections.ConfigDict, stages: list[str]) -> None:
    from distill_jax import losses
    from distill_jax.losses import HIDDEN_LOSSES
    from distill_jax.models import MODELS

    d = config.distill
    _expect(
        d.method in losses.TEACHER_TARGETS,
        "distill.method",
        d.method,
        f"one of {losses.TEACHER_TARGETS}",
    )
    _expect(
        isinstance(d.cache_k, int) and d.cache_k >= 1,
        "distill.cache_k",
        d.cache_k,
        "an integer >= 1 (teacher items stored per slot)",
    )
    _expect(d.hidden_weight >= 0, "distill.hidden_weight", d.hidden_weight, ">= 0 (0 = off)")
    _expect(
        d.hidden_loss in HIDDEN_LOSSES,
        "distill.hidden_loss",
        d.hidden_loss,
        f"one of {HIDDEN_LOSSES}",
    )
    kd = stages.index("student_kd") if "student_kd" in stages else len(stages)
    if "soft_labels" in stages:
        _expect(
            d.method == "cached",
            "stages",
            config.stages,
            f"no 'soft_labels' stage with config.distill.method={d.method!r} (it stores "
            "the teacher's outputs for method 'cached')",
        )
        _expect(
            stages.index("soft_labels") < kd,
            "stages",
            config.stages,
            "'soft_labels' before 'student_kd'",
        )
        if "teacher" in stages:
            _expect(
                stages.index("teacher") < stages.index("soft_labels"),
                "stages",
                config.stages,
                "'teacher' before 'soft_labels'",
            )
    if d.method == "cached":
        _expect(
            MODELS[config.student.name].is_causal,
            "distill.method",
            d.method,
            f"not 'cached' for student.name={config.student.name!r} (a masked-item student "
            "draws new slots every epoch: nothing fixed to store once)",
        )
    if d.method == "ensemble" or "ensemble" in stages:
        names = [m.strip() for m in d.ensemble_teachers.split(",") if m.strip()]
        _expect(
            bool(names),
            "distill.ensemble_teachers",
            d.ensemble_teachers,
            "comma-separated teachers: stages 'teacher' / 'teacher_<n>' or stage directories",
        )
        _expect(
            len(set(names)) == len(names),
            "distill.ensemble_teachers",
            d.ensemble_teachers,
            "each teacher once",
        )
        users = [stages.index(u) for u in ("ensemble", "student_kd") if u in stages]
        for name in names:
            if (name == "teacher" or EXTRA_TEACHER.match(name)) and name in stages and users:
                _expect(
                    stages.index(name) < min(users),
                    "stages",
                    config.stages,
                    f"{name!r} before the stages that use the ensemble",
                )
        parse_weights(config, len(names))


def _validate_losses(config: ml_collections.ConfigDict) -> None:
    """Each stage's (target, form) pair and its options against `losses.PAIRS`."""
    from distill_jax import losses  # Late: keeps config checks import-light.

    d, form = config.distill, config.loss.form
    choices = (losses.AUTO, *losses.FORMS)
    _expect(form in choices, "loss.form", form, f"one of {choices}")
    _positive_int(config.loss, "loss", "chunk_size")
    if form == losses.AUTO:
        # Every target has a dense form with every option: 'auto' always
        # resolves (at the step's build, for its backend and mesh).
        _validate_history(config, None)
        return
    # distill.method itself was checked by _validate_method, which runs first.
    _expect(
        losses.supported(d.method, form),
        "loss.form",
        form,
        f"a form of config.distill.method={d.method!r}: it is not supported with "
        f"config.loss.form={form!r}; forms for {d.method!r}: {losses.forms_for(d.method)}",
    )
    if d.last_item_slot:
        option = "teacher_only_slots"
        _expect(
            losses.supported(d.method, form, option),
            "distill.last_item_slot",
            True,
            f"False with config.distill.method={d.method!r} and config.loss.form={form!r} "
            f"(teacher-only slots: forms {losses.forms_for(d.method, option)})",
        )
    _validate_history(config, form)


def _validate_history(config: ml_collections.ConfigDict, form: str | None) -> None:
    """exclude_history of each model: a causal model, and a form that excludes (None: any)."""
    from distill_jax import losses  # Late: keeps config checks import-light.
    from distill_jax.models import MODELS

    d = config.distill
    sc = config.student_scratch
    scratch_excludes = (
        config.student.exclude_history if sc.exclude_history == -1 else sc.exclude_history == 1
    )
    # (the key that sets it, the model, the target it trains with, whether it is on)
    uses = [
        ("teacher.exclude_history", "teacher", "label", config.teacher.exclude_history),
        ("student.exclude_history", "student", d.method, config.student.exclude_history),
        (
            "student.exclude_history"
            if sc.exclude_history == -1
            else "student_scratch.exclude_history",
            "student",
            "label",
            scratch_excludes,
        ),
    ]
    for key, model, target, on in uses:
        if not on:
            continue
        _expect(
            form is None or losses.supported(target, form, "exclude_history"),
            key,
            True,
            f"False with config.loss.form={form!r} for the {target!r} target (forms that "
            f"exclude history: {losses.forms_for(target, 'exclude_history')})",
        )
        _expect(
            MODELS[config[model].name].is_causal,
            key,
            True,
            f"False for {model}.name={config[model].name!r} (a bidirectional model's window "
            "holds later items and mask tokens, not a history)",
        )


def parse_weights(config: ml_collections.ConfigDict, n: int) -> tuple[float, ...]:
    """`config.distill.ensemble_weights` as n weights summing to 1 (equal when empty)."""
    raw = config.distill.ensemble_weights
    if not raw.strip():
        return (1.0 / n,) * n
    try:
        w = [float(x) for x in raw.split(",")]
    except ValueError:
        raise ConfigError(
            f"config.distill.ensemble_weights={raw!r} is invalid: expected comma-separated numbers."
        ) from None
    if len(w) != n or min(w) < 0 or sum(w) <= 0:
        raise ConfigError(
            f"config.distill.ensemble_weights={raw!r} is invalid: expected {n} weights >= 0 "
            f"(one per teacher of config.distill.ensemble_teachers) with a positive sum."
        )
    return tuple(x / sum(w) for x in w)
