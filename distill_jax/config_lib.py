"""Start-up validation of a config: every bad value names its key."""

import math

import ml_collections

from distill_jax.config_checks import (  # noqa: F401 (ConfigError: the public name)
    EXTRA_TEACHER,
    ConfigError,
    _expect,
    _positive_int,
)

MODEL_KEYS = ("teacher", "student")
KNOWN_STAGES = (
    "popularity",
    "teacher",
    "student_kd",
    "student_scratch",
    "compress",
    "export",
    "report",
    # config.distill.method='ensemble': the ensemble evaluated as a model;
    # 'cached': the teacher's stored outputs. Extra teachers are 'teacher_<n>'.
    "ensemble",
    "soft_labels",
)
TRAINED_STAGES = ("teacher", "student_kd", "student_scratch")
SHARED_MODEL_KEYS = ("max_len", "num_items")
# config.student_scratch: the scratch student's own optimisation settings.
SCRATCH_KEYS = ("learning_rate", "dropout", "weight_decay", "exclude_history")


TASKS = ("sequence", "click")
# config.train.on_nonfinite: what a step with a NaN/Inf loss or gradient does.
ON_NONFINITE = ("stop", "skip")
CLICK_STAGES = ("logistic", "teacher", "student_kd", "student_scratch", "report")


def _validate_click(config: ml_collections.ConfigDict) -> None:
    """The keys config.task='click' reads."""
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    _expect(
        bool(stages) and all(s in CLICK_STAGES for s in stages),
        "stages",
        config.stages,
        f"a comma-separated subset of {CLICK_STAGES} (config.task='click')",
    )
    d = config.data
    _expect(
        d.source in ("movielens", "s3rec", "interactions", "click_table"),
        "data.source",
        d.source,
        "a real source ('movielens', 's3rec', 'interactions', or 'click_table': a table of "
        "examples with a label): the click task reads data as logged",
    )
    _expect(bool(d.path), "data.path", d.path, "the path of the data")
    c = config.click
    _expect(
        d.source != "click_table" or bool(c.label_col),
        "click.label_col",
        c.label_col,
        "the label column of the click_table",
    )
    _expect(c.click_threshold >= 0, "click.click_threshold", c.click_threshold, ">= 0")
    _expect(
        c.scratch_learning_rate >= 0,
        "click.scratch_learning_rate",
        c.scratch_learning_rate,
        ">= 0 (0: the student's learning rate)",
    )
    _expect(
        c.logistic_learning_rate >= 0,
        "click.logistic_learning_rate",
        c.logistic_learning_rate,
        ">= 0 (0: the student's learning rate)",
    )
    _expect(
        c.logistic_weight_decay == -1 or c.logistic_weight_decay >= 0,
        "click.logistic_weight_decay",
        c.logistic_weight_decay,
        ">= 0, or -1 for the student's weight decay",
    )
    _expect(
        isinstance(c.history, int) and c.history >= 0,
        "click.history",
        c.history,
        "an integer >= 0 (clicks before each row; 0: none)",
    )
    _expect(
        d.source != "click_table" or not c.history or bool(c.user_col and c.item_col),
        "click.history",
        c.history,
        "0, or click.user_col and click.item_col set (a history is the items a user clicked)",
    )
    _expect(
        isinstance(c.negatives, int) and c.negatives >= 0,
        "click.negatives",
        c.negatives,
        "an integer >= 0",
    )
    _expect(
        0 < c.train_fraction < 1 and 0 < c.valid_fraction < 1 - c.train_fraction,
        "click.valid_fraction",
        c.valid_fraction,
        f"in (0, 1 - click.train_fraction={c.train_fraction}), leaving a test share",
    )
    for name in ("teacher", "student"):
        m = c[name]
        _positive_int(m, f"click.{name}", "embed_dim", "batch_size", "num_steps")
        for key in ("num_cross", "cross_rank", "warmup_steps"):
            _expect(isinstance(m[key], int) and m[key] >= 0, f"click.{name}.{key}", m[key], ">= 0")
        try:
            dims = [int(x) for x in str(m.mlp_dims).replace(" ", "").split(",") if x]
        except ValueError:
            dims = [0]
        _expect(
            all(x > 0 for x in dims),
            f"click.{name}.mlp_dims",
            m.mlp_dims,
            "comma-separated positive widths, or '' for none",
        )
        _expect(0.0 <= m.dropout < 1.0, f"click.{name}.dropout", m.dropout, "a rate in [0, 1)")
        _expect(m.learning_rate > 0, f"click.{name}.learning_rate", m.learning_rate, "> 0")
    t = config.distill
    _expect(
        math.isfinite(t.temperature) and t.temperature > 0,
        "distill.temperature",
        t.temperature,
        "a finite temperature > 0",
    )
    _expect(0.0 <= t.alpha <= 1.0, "distill.alpha", t.alpha, "in [0, 1]")
    _positive_int(config.eval, "eval", "batch_size", "every_steps")
    _validate_train(config)


def _validate_train(config: ml_collections.ConfigDict) -> None:
    """config.train: what every task's training loop reads."""
    _expect(
        config.train.on_nonfinite in ON_NONFINITE,
        "train.on_nonfinite",
        config.train.on_nonfinite,
        f"one of {ON_NONFINITE}",
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first invalid key of `config`."""
    from distill_jax.models import MODELS  # Late: keeps config checks import-light.

    _expect(config.task in TASKS, "task", config.task, f"one of {TASKS}")
    if config.task == "click":
        _validate_click(config)
        return
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    _expect(bool(stages), "stages", config.stages, f"a comma-separated subset of {KNOWN_STAGES}")
    for s in stages:
        _expect(
            s in KNOWN_STAGES or EXTRA_TEACHER.match(s) is not None,
            "stages",
            config.stages,
            f"stages among {KNOWN_STAGES} or 'teacher_<n>' (n >= 1: an extra teacher)",
        )

    from distill_jax.data.dataset import SOURCES

    d = config.data
    _expect(d.source in SOURCES, "data.source", d.source, f"one of {SOURCES}")
    _expect(
        d.source == "synthetic" or bool(d.path),
        "data.path",
        d.path,
        f"the path of the data (data.source={d.source!r} reads a file or folder)",
    )
    _expect(
        d.rating_threshold >= 0,
        "data.rating_threshold",
        d.rating_threshold,
        ">= 0 (0 keeps every rating)",
    )
    _expect(
        d.rating_threshold == 0 or d.source != "s3rec",
        "data.rating_threshold",
        d.rating_threshold,
        "0: S3-Rec sequence files have no ratings",
    )
    _expect(
        isinstance(d.delimiter, str) and len(d.delimiter) == 1,
        "data.delimiter",
        d.delimiter,
        "one character (the CSV field separator)",
    )
    _expect(
        isinstance(d.k_core, int) and d.k_core >= 0,
        "data.k_core",
        d.k_core,
        "an integer >= 0 (0 = off)",
    )
    _expect(
        isinstance(d.min_user_interactions, int) and d.min_user_interactions >= 3,
        "data.min_user_interactions",
        d.min_user_interactions,
        ">= 3 (leave-one-out needs a training, a validation and a test item)",
    )
    for key in ("cold_user_fraction", "cold_item_fraction", "cold_valid_fraction"):
        _expect(0.0 <= d[key] < 1.0, f"data.{key}", d[key], "a fraction in [0, 1)")
    from distill_jax.data.splits import COLD_ITEM_RULES

    _expect(
        d.cold_item_rule in COLD_ITEM_RULES,
        "data.cold_item_rule",
        d.cold_item_rule,
        f"one of {COLD_ITEM_RULES}",
    )
    syn = config.data.synthetic
    _positive_int(
        syn,
        "data.synthetic",
        "num_users",
        "num_items",
        "min_len",
        "max_len",
        "num_tastes",
        "successors",
    )
    _expect(
        syn.min_len >= 3,
        "data.synthetic.min_len",
        syn.min_len,
        "at least 3 (leave-one-out needs a training item, a validation and a test item)",
    )
    _expect(
        syn.max_len >= syn.min_len,
        "data.synthetic.max_len",
        syn.max_len,
        f">= data.synthetic.min_len ({syn.min_len})",
    )
    _expect(
        syn.min_len <= syn.mean_len <= syn.max_len,
        "data.synthetic.mean_len",
        syn.mean_len,
        "between data.synthetic.min_len and data.synthetic.max_len",
    )
    _expect(
        0.0 <= syn.transition_prob <= 1.0,
        "data.synthetic.transition_prob",
        syn.transition_prob,
        "a probability in [0, 1]",
    )
    _expect(syn.zipf_exponent >= 0.0, "data.synthetic.zipf_exponent", syn.zipf_exponent, ">= 0")

    from distill_jax.models.features import FUSIONS

    f = config.features
    _expect(f.fusion in FUSIONS, "features.fusion", f.fusion, f"one of {FUSIONS}")
    _expect(0.0 <= f.id_dropout < 1.0, "features.id_dropout", f.id_dropout, "a rate in [0, 1)")
    _expect(
        isinstance(f.text_dim, int) and f.text_dim >= 1, "features.text_dim", f.text_dim, ">= 1"
    )
    for prefix in MODEL_KEYS:
        m = config[prefix]
        _expect(m.name in MODELS, f"{prefix}.name", m.name, f"one of {sorted(MODELS)}")
        _positive_int(
            m,
            prefix,
            "embed_dim",
            "num_blocks",
            "num_heads",
            "mlp_dim",
            "max_len",
            "num_steps",
            "batch_size",
        )
        _expect(
            m.embed_dim % m.num_heads == 0,
            f"{prefix}.embed_dim",
            m.embed_dim,
            f"a multiple of {prefix}.num_heads ({m.num_heads})",
        )
        _expect(0.0 <= m.dropout < 1.0, f"{prefix}.dropout", m.dropout, "a rate in [0, 1)")
        _expect(
            m.id_dropout == -1.0 or 0.0 <= m.id_dropout < 1.0,
            f"{prefix}.id_dropout",
            m.id_dropout,
            "a rate in [0, 1), or -1 for features.id_dropout",
        )
        _expect(0.0 < m.mask_prob < 1.0, f"{prefix}.mask_prob", m.mask_prob, "a rate in (0, 1)")
        _expect(
            0.0 <= m.mask_last_prob <= 1.0,
            f"{prefix}.mask_last_prob",
            m.mask_last_prob,
            "a rate in [0, 1]",
        )
        _expect(
            m.dtype in ("float32", "bfloat16"),
            f"{prefix}.dtype",
            m.dtype,
            "'float32' or 'bfloat16'",
        )
        _expect(
            m.num_items == -1 or m.num_items > 0,
            f"{prefix}.num_items",
            m.num_items,
            "-1 (from the data) or the catalogue size",
        )
        _expect(m.learning_rate > 0, f"{prefix}.learning_rate", m.learning_rate, "> 0")
        _expect(m.weight_decay >= 0, f"{prefix}.weight_decay", m.weight_decay, ">= 0")
        _expect(
            0 <= m.warmup_steps < m.num_steps,
            f"{prefix}.warmup_steps",
            m.warmup_steps,
            f"in [0, {prefix}.num_steps={m.num_steps})",
        )
        _expect(
            m.grad_clip_norm >= 0,
            f"{prefix}.grad_clip_norm",
            m.grad_clip_norm,
            ">= 0 (0 disables clipping)",
        )
    sc = config.student_scratch
    _expect(
        set(sc.keys()) == set(SCRATCH_KEYS),
        "student_scratch",
        sorted(sc.keys()),
        f"exactly the keys {SCRATCH_KEYS} (the architecture, steps and batch are "
        "config.student's for both students)",
    )
    _expect(
        sc.learning_rate == -1 or sc.learning_rate > 0,
        "student_scratch.learning_rate",
        sc.learning_rate,
        "-1 (config.student's) or > 0",
    )
    _expect(
        sc.dropout == -1 or 0.0 <= sc.dropout < 1.0,
        "student_scratch.dropout",
        sc.dropout,
        "-1 (config.student's) or a rate in [0, 1)",
    )
    _expect(
        sc.weight_decay == -1 or sc.weight_decay >= 0,
        "student_scratch.weight_decay",
        sc.weight_decay,
        "-1 (config.student's) or >= 0",
    )
    _expect(
        sc.exclude_history in (-1, 0, 1),
        "student_scratch.exclude_history",
        sc.exclude_history,
        "-1 (config.student's), 0 (False) or 1 (True)",
    )
    for key in SHARED_MODEL_KEYS:
        t, s = config.teacher[key], config.student[key]
        _expect(
            t == s,
            f"student.{key}",
            s,
            f"equal to config.teacher.{key}={t!r} (teacher and student share it)",
        )

    from distill_jax import config_distill  # Late: it imports the losses.

    config_distill.validate(config, stages)

    _positive_int(config.eval, "eval", "every_steps", "batch_size")
    _expect(config.eval.patience >= 0, "eval.patience", config.eval.patience, ">= 0")
    _expect(
        10 in tuple(config.eval.ks),
        "eval.ks",
        config.eval.ks,
        "a tuple of cut-offs containing 10 (model selection uses NDCG@10)",
    )
    _expect(
        all(isinstance(k, int) and k > 0 for k in config.eval.ks),
        "eval.ks",
        config.eval.ks,
        "positive integer cut-offs",
    )
    _expect(
        config.eval.max_valid_users == -1 or config.eval.max_valid_users > 0,
        "eval.max_valid_users",
        config.eval.max_valid_users,
        "-1 or > 0",
    )
    _expect(
        0.0 < config.eval.tail_share < 1.0,
        "eval.tail_share",
        config.eval.tail_share,
        "a share in (0, 1)",
    )
    _expect(
        all(isinstance(b, int) and b > 0 for b in config.eval.latency_batch_sizes),
        "eval.latency_batch_sizes",
        config.eval.latency_batch_sizes,
        "a tuple of positive batch sizes",
    )
    _expect(
        config.eval.latency_repeats > 0, "eval.latency_repeats", config.eval.latency_repeats, "> 0"
    )
    for axis in ("data", "model"):
        v = config.mesh[axis]
        _expect(v == -1 or v >= 1, f"mesh.{axis}", v, "-1 (fill) or a positive axis size")
    _validate_compress(config, stages)
    _positive_int(config.checkpoint, "checkpoint", "every_steps")
    _validate_train(config)
    _expect(config.log_every_steps > 0, "log_every_steps", config.log_every_steps, "> 0")
    validate_distributed(config)


def _validate_compress(config: ml_collections.ConfigDict, stages: list[str]) -> None:
    """config.compress and config.export, and the stages they need before them."""
    from distill_jax import compress

    c = config.compress
    _expect(
        c.source in ("student_kd", "student_scratch"),
        "compress.source",
        c.source,
        "'student_kd' or 'student_scratch' (a trained student)",
    )
    try:
        variants = compress.parse_variants(c.variants)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _expect(
        isinstance(c.finetune_steps, int) and c.finetune_steps >= 0,
        "compress.finetune_steps",
        c.finetune_steps,
        "an integer >= 0 (0 = no fine-tuning)",
    )
    _expect(c.learning_rate > 0, "compress.learning_rate", c.learning_rate, "> 0")
    _expect(
        c.finetune_steps == 0 or 0 <= c.warmup_steps < c.finetune_steps,
        "compress.warmup_steps",
        c.warmup_steps,
        f"in [0, compress.finetune_steps={c.finetune_steps})",
    )
    from distill_jax.compress.prune import SCOPES

    _expect(c.prune_scope in SCOPES, "compress.prune_scope", c.prune_scope, f"one of {SCOPES}")
    _expect(
        0.0 < c.prune_end_fraction <= 1.0,
        "compress.prune_end_fraction",
        c.prune_end_fraction,
        "a share in (0, 1]",
    )
    _positive_int(c, "compress", "prune_every_steps")
    for v in variants:
        if v.kind == "lowrank":
            _expect(
                0 < v.amount < config.student.embed_dim,
                "compress.variants",
                c.variants,
                f"{v.name}: a rank in [1, student.embed_dim={config.student.embed_dim})",
            )
        if v.kind.startswith("int8"):
            _expect(
                config.student.dtype == "float32",
                "compress.variants",
                c.variants,
                f"{v.name}: student.dtype='float32' (int8 weights dequantize to float32)",
            )
    _expect(
        config.student.item_rank == 0 or not any(v.kind == "lowrank" for v in variants),
        "compress.variants",
        c.variants,
        "no lowrank variant when student.item_rank > 0 (the table is already factorized)",
    )
    _expect(
        config.student.item_rank == 0 or config.distill.init_from_teacher == "none",
        "student.item_rank",
        config.student.item_rank,
        "0 with distill.init_from_teacher='pca' (pca initialises a full table)",
    )
    for key in MODEL_KEYS:
        r = config[key].item_rank
        _expect(
            isinstance(r, int) and 0 <= r < config[key].embed_dim,
            f"{key}.item_rank",
            r,
            f"0 or a rank in [1, {key}.embed_dim={config[key].embed_dim})",
        )
    # A stage a later one reads from runs before it, or finished in the
    # workdir earlier (checked when the later stage starts).
    if "compress" in stages and c.source in stages:
        _expect(
            stages.index(c.source) < stages.index("compress"),
            "stages",
            config.stages,
            f"compress.source={c.source!r} before 'compress'",
        )
    e = config.export
    _positive_int(e, "export", "top_k", "popular_items")
    if "export" in stages:
        exportable = list(TRAINED_STAGES) + compress.variant_names(config)
        _expect(e.model in exportable, "export.model", e.model, f"one of {exportable}")
        before = stages[: stages.index("export")]
        needs = "compress" if e.model not in TRAINED_STAGES else e.model
        _expect(
            needs not in stages or needs in before,
            "stages",
            config.stages,
            f"{needs!r} before 'export' (export.model={e.model!r})",
        )


CPU_COLLECTIVES = ("gloo", "mpi")


def validate_distributed(config: ml_collections.ConfigDict) -> None:
    """Checks `config.distributed` alone.

    Separate from `validate` because `distributed.initialize` runs it before
    anything touches jax, ahead of the full check in the pipeline.
    """
    c = config.distributed
    address = c.coordinator_address
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    _expect(
        isinstance(address, str) and (address == "" or (bool(sep and host) and port.isdigit())),
        "distributed.coordinator_address",
        address,
        "'' (from the environment) or 'host:port' of process 0, e.g. '10.0.0.1:1234'",
    )
    n = c.num_processes
    _expect(
        isinstance(n, int) and (n == -1 or n >= 1),
        "distributed.num_processes",
        n,
        "-1 (from the environment) or a process count >= 1",
    )
    pid = c.process_id
    _expect(
        isinstance(pid, int) and (pid == -1 or (pid >= 0 and (n == -1 or pid < n))),
        "distributed.process_id",
        pid,
        "-1 (from the environment) or an id in [0, distributed.num_processes"
        + (f"={n})" if n >= 1 else ")"),
    )
    _expect(
        c.cpu_collectives in CPU_COLLECTIVES,
        "distributed.cpu_collectives",
        c.cpu_collectives,
        f"one of {CPU_COLLECTIVES}",
    )
    _expect(
        isinstance(c.initialization_timeout, int) and c.initialization_timeout > 0,
        "distributed.initialization_timeout",
        c.initialization_timeout,
        "a number of seconds > 0",
    )
    _expect(
        isinstance(c.heartbeat_timeout, int) and c.heartbeat_timeout > 0,
        "distributed.heartbeat_timeout",
        c.heartbeat_timeout,
        "a number of seconds > 0",
    )


def stage_model_config(
    config: ml_collections.ConfigDict, stage: str, key: str
) -> ml_collections.ConfigDict:
    """The model subtree `stage` trains with: `config[key]`, plus, for
    student_scratch, the values of `config.student_scratch` other than -1."""
    if stage != "student_scratch":
        return config[key]
    mcfg = config[key].copy_and_resolve_references()
    for name in SCRATCH_KEYS:
        value = config.student_scratch[name]
        if value != -1:
            mcfg[name] = type(mcfg[name])(value)
    return mcfg


def stages(config: ml_collections.ConfigDict) -> list[str]:
    """The stages to run, in the order given."""
    return [s.strip() for s in config.stages.split(",") if s.strip()]
