"""Every config key of distill_jax, with its default.

Variants (`configs/synthetic.py`, ...) start from `get_base_config()` and
override values; they never add keys. `distill_jax.config_lib.validate` checks
the values at start-up and names the key at fault.

Each key's one-line meaning is a `#:` comment, after its assignment or on the
line just above it; `python -m distill_jax.describe` prints them, and
tests/test_describe.py fails for a key without one.
"""

import ml_collections

# Logical axis name -> mesh axis. Items tables ('vocab') are the only ones
# worth splitting over 'model' on large catalogues; everything else is small.
DEFAULT_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("pos", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
)


def parse_variants(file: str, arg: str | None, known: tuple[str, ...]) -> list[str]:
    """Splits a comma-separated variant string; unknown names fail naming the file."""
    variants = [v for v in (arg or "").split(",") if v]
    for v in variants:
        if v not in known:
            raise ValueError(
                f"{file}: unknown variant {v!r}; expected a comma-separated subset of {known}."
            )
    return variants


def tiny_compress(config: ml_collections.ConfigDict) -> None:
    """The `tiny` variants' compress stage: a rank below d=8, a few fine-tuning steps."""
    config.compress.update(
        variants="pruned50,int8,int8_qat,lowrank4",
        finetune_steps=10,
        warmup_steps=2,
        prune_every_steps=2,
    )


def ensemble(config: ml_collections.ConfigDict, teachers: int = 3) -> None:
    """The `ensemble` variants: `teachers` teachers (seeds seed..seed+n-1), evaluated as one
    model and distilled from together (config.distill.method='ensemble')."""
    names = ["teacher"] + [f"teacher_{n}" for n in range(1, teachers)]
    config.distill.update(method="ensemble", ensemble_teachers=",".join(names))
    config.stages = config.stages.replace("teacher,", ",".join(names + ["ensemble"]) + ",", 1)


def cached(config: ml_collections.ConfigDict) -> None:
    """The `cached` variants: the teacher's top-cache_k soft labels stored once
    (the soft_labels stage), the student distilled from them with no teacher in memory."""
    config.distill.method = "cached"
    config.stages = config.stages.replace("teacher,", "teacher,soft_labels,", 1)


def method_variants(config: ml_collections.ConfigDict, variants: list[str], file: str) -> None:
    """Applies the `ensemble` or `cached` variant (one distillation method at most)."""
    if "ensemble" in variants and "cached" in variants:
        raise ValueError(f"{file}: variants 'ensemble' and 'cached' are two methods; pick one.")
    if "ensemble" in variants:
        ensemble(config)
    if "cached" in variants:
        cached(config)


def cold_variants(
    config: ml_collections.ConfigDict,
    variants: list[str],
    item_rule: str = "time",
    item_fraction: float = 0.1,
) -> None:
    """The `cold` and `features` variants: cold-start slices, and models that read side features.

    `cold` holds out a tenth of the users, and cold items by `item_rule`
    (data.cold_item_rule) and `item_fraction` (data.cold_item_fraction): the
    split's `cold_users` and `cold_items` slices;
    `features` does the same and turns on the side features of teacher and
    students (items and, where the data has them, users), so the two variants
    compare the same split with and without features (the students with their
    own id_dropout).
    """
    if "cold" in variants or "features" in variants:
        config.data.update(
            cold_user_fraction=0.1, cold_item_fraction=item_fraction, cold_item_rule=item_rule
        )
    if "features" in variants:
        config.teacher.use_features = config.student.use_features = True
        # BENCHMARKS.md, the id_dropout search (MovieLens 100K): the teacher
        # keeps features.id_dropout (0.5), both students drop 0.1.
        config.student.id_dropout = 0.1


def click_model_config(**overrides) -> ml_collections.ConfigDict:
    """One click model's subtree (distill_jax/models/click.py) and its optimisation."""
    c = ml_collections.ConfigDict()
    c.embed_dim = 16  #: Width of every categorical field's embedding.
    c.num_cross = 3  #: DCN-v2 cross layers (0: none; with no mlp_dims, a logistic model).
    c.cross_rank = 0  #: 0: full-rank cross weights; r > 0: low rank r.
    c.mlp_dims = "256,128"  #: Comma-separated hidden widths after the cross layers.
    c.dropout = 0.1  #: Dropout after each hidden layer in training.
    c.learning_rate = 1e-3  #: Peak AdamW learning rate of the click model.
    c.weight_decay = 0.0  #: AdamW weight decay of the click model's matrices.
    c.batch_size = 1024  #: Click rows per training batch.
    c.num_steps = 2000  #: Training steps of the click model.
    c.warmup_steps = 100  #: Linear warm-up steps of the click model's learning rate.
    c.grad_clip_norm = 1.0  #: Global gradient-norm clip of the click model; 0 = off.
    c.update(overrides)
    return c


def click_config() -> ml_collections.ConfigDict:
    """config.click: the click task's data and models (config.task='click')."""
    c = ml_collections.ConfigDict()
    c.click_threshold = 4.0  #: Ratings at or above it are clicks; 0: every interaction is one.
    c.negatives = 1  #: Sampled unseen (user, item) pairs per interaction, as non-clicks.
    c.train_fraction = 0.8  #: The earliest share of the rows (by time) for training.
    c.valid_fraction = 0.1  #: The next share for validation; the rest is the test split.
    c.categorical = ""  #: Comma-separated integer side features read as categories.
    c.drop_features = "title"  #: Comma-separated side features left out (free text).
    c.scratch_learning_rate = 0.0  #: student_scratch's own lr (0: click.student.learning_rate).
    # The logistic baseline is click.student without hidden layers; its own searched settings:
    c.logistic_learning_rate = 0.0  #: The logistic baseline's lr (0: click.student.learning_rate).
    c.logistic_weight_decay = -1.0  #: The logistic baseline's weight decay (-1: the student's).
    c.calibrate_teacher = False  #: student_kd: Platt-scale the teacher on valid rows first.
    c.history = 0  #: Each row's user's last N clicks before it, pooled (0: no history input).
    # data.source='click_table': a CSV/Parquet whose rows are examples (features and a label).
    c.label_col = "label"  #: click_table: the 0/1 label column.
    c.time_col = ""  #: click_table: the column that orders rows for the split ('': file order).
    c.user_col = ""  #: click_table: the user column, if any (names the cold-user slice).
    c.item_col = ""  #: click_table: the item column, if any (names the cold-item slice).
    c.teacher = click_model_config()
    c.student = click_model_config(embed_dim=4, num_cross=0, mlp_dims="32", learning_rate=3e-3)
    return c


def model_config(**overrides) -> ml_collections.ConfigDict:
    """One model's subtree: architecture plus its own optimisation settings."""
    c = ml_collections.ConfigDict()
    c.name = "sasrec"  #: Model class: one of distill_jax.models.MODELS ('sasrec', 'bert4rec').
    c.embed_dim = 64  #: Width D of the item and position embeddings and of every block.
    c.num_blocks = 2  #: Transformer blocks.
    c.num_heads = 2  #: Attention heads per block; embed_dim must be a multiple of it.
    c.mlp_dim = 256  #: Hidden width of each block's feed-forward layer.
    c.dropout = 0.2  #: Dropout rate in training, in [0, 1).
    c.dtype = "float32"  #: Compute dtype, 'float32' or 'bfloat16'; parameters stay float32.
    # 0: a full [V+1, D] item table; r in [1, D): factorised [V+1, r] x [r, D]
    # (what the compress stage's low-rank student sets; models/base.py).
    c.item_rank = 0  #: Item table rank: 0 = full [V+1, D]; r in [1, D) = factorised.
    # Items fused from their ids and side features (config.features), so that
    # items never seen in training can be ranked (models/features.py).
    c.use_features = False  #: Items read their side features beside their ids.
    # The teacher and the students may want different rates (BENCHMARKS.md,
    # "Side features and cold start": the teacher keeps 0.5, students 0.1).
    c.id_dropout = -1.0  #: Id-part drop rate with use_features; -1 = features.id_dropout.
    # Shared with the other model: checked equal at start-up. max_len is the
    # input window; num_items = -1 takes the catalogue size from the data.
    c.max_len = 50  #: Input window: the newest items of a history the model sees.
    c.num_items = -1  #: Catalogue size V; -1 = the data's.
    # BERT4Rec only: share of the window's items replaced by the mask token.
    c.mask_prob = 0.2  #: BERT4Rec: share of window items masked in training.
    # BERT4Rec only: share of training windows that mask their last item
    # alone (the evaluation task: the item after the whole history).
    c.mask_last_prob = 0.0  #: BERT4Rec: share of training windows masking only their last item.
    # Optimisation (optax AdamW with linear warm-up and cosine decay).
    c.learning_rate = 1e-3  #: Peak learning rate, reached after the warm-up.
    c.weight_decay = 0.0  #: AdamW decoupled weight decay.
    c.warmup_steps = 100  #: Steps of linear warm-up from 0 to learning_rate.
    c.num_steps = 1000  #: Training steps; the cosine decay ends here.
    c.batch_size = 128  #: Training sequences per step (the global batch, all devices).
    c.grad_clip_norm = 1.0  #: Clip gradients to this global norm; 0 = no clipping.
    # Training softmaxes (cross-entropy, and both sides of the distillation
    # KL when this model is the distilled student) leave out the items each
    # target slot has already seen in its window, never the target itself,
    # as evaluation does (eval.exclude_history). Causal models, and the loss
    # forms that support it (distill_jax/losses: the PAIRS table).
    c.exclude_history = False  #: Training softmaxes leave out the window's earlier items.
    c.update(overrides)
    return c


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the config with every key declared."""
    config = ml_collections.ConfigDict()
    config.seed = 0  #: Random seed of the job: synthetic data, splits, init, dropout, batches.
    config.task = "sequence"  #: 'sequence' (next-item models) or 'click' (config.click).
    #: Comma-separated stages of the main job, run in this order.
    config.stages = "popularity,teacher,student_kd,student_scratch,compress,export,report"

    config.data = ml_collections.ConfigDict()
    # 'synthetic' (generated), 'movielens' (a MovieLens folder: 100K, 1M/10M or
    # 20M/25M/latest layout), 's3rec' (a `user item1 item2 ...` sequence file,
    # e.g. Amazon Beauty), 'interactions' (a CSV/Parquet log).
    config.data.source = "synthetic"  #: 'synthetic', 'movielens', 's3rec' or 'interactions'.
    config.data.path = ""  #: File or folder of a real source; never inside the repo.
    config.data.download = ""  #: MovieLens only: e.g. 'ml-100k' fetches it into path if absent.
    config.data.cache_dir = ""  #: Where the TFDS dataset is built; '' = WORKDIR/data.
    # Preprocessing (each step is counted in report.json's dataset.steps).
    config.data.rating_threshold = 0.0  #: Keep ratings >= this; 0 keeps every row.
    config.data.k_core = 0  #: 0 = off; else users and items with >= k interactions.
    config.data.min_user_interactions = 3  #: Fewer after filtering: dropped and counted.
    config.data.cold_user_fraction = 0.0  #: Share of users held out, never seen in training.
    config.data.cold_item_fraction = 0.0  #: Items first seen in the last share of the log.
    # 'time': items first seen in that last share (needs timestamps); 'random': that
    # share of the items, drawn with config.seed (data with an order only).
    config.data.cold_item_rule = "time"  #: Which items are cold: 'time' or 'random'.
    #: Share of each cold slice held for validation ('cold_users_valid', 'cold_items_valid').
    config.data.cold_valid_fraction = 0.0
    # Column names and files of an 'interactions' source.
    config.data.user_col = "user_id"  #: The user id column.
    config.data.item_col = "item_id"  #: The item id column.
    config.data.time_col = "timestamp"  #: The time column; '' = none (file order is time order).
    config.data.rating_col = ""  #: The rating column; '' = 'rating' if there is one.
    # Side features, for any source: a CSV/Parquet table keyed by item_col (user_col),
    # each other column a feature; for items also an S3-Rec attribute file (.json:
    # {"item id": [attribute id, ...]}). Part of the data's fingerprint.
    config.data.item_features_path = ""  #: Item feature table, or attribute .json.
    config.data.user_features_path = ""  #: User feature table keyed by user_col.
    config.data.delimiter = ","  #: CSV field separator (one character).
    config.data.synthetic = ml_collections.ConfigDict()
    config.data.synthetic.num_users = 2000  #: Users generated.
    config.data.synthetic.num_items = 1000  #: Catalogue size generated.
    config.data.synthetic.min_len = 5  #: Shortest history.
    config.data.synthetic.mean_len = 20.0  #: Mean history length (geometric above min_len).
    config.data.synthetic.max_len = 80  #: Longest history.
    config.data.synthetic.num_tastes = 20  #: Latent taste clusters.
    config.data.synthetic.zipf_exponent = 1.0  #: Item popularity ~ rank^-a.
    config.data.synthetic.successors = 4  #: Likely next items per item.
    config.data.synthetic.transition_prob = 0.7  #: P(next item follows a transition).
    # Batches hold users of similar length so that short sequences do not pay
    # for the padding of long ones (same examples, fewer wasted positions).
    config.data.length_buckets = True  #: Batch users of similar length together.
    # True: every training batch has the same shapes (full windows, the most
    # target slots a batch can have), so each train step compiles once. Pays
    # off for short runs (the synthetic default, smoke tests) and on TPUs;
    # long CPU runs are faster with the shape buckets (False).
    config.data.fixed_shapes = False  #: Every training batch has the same shapes.

    # Side features of items, for models with use_features (models/features.py):
    # every item feature of the data (data.item_features_path, the MovieLens
    # genres/year/title, the synthetic tastes), plus offline vectors.
    config.features = ml_collections.ConfigDict()
    #: Offline item vectors: NAME.npy [n, E] with NAME.ids.txt (original ids) beside it.
    config.features.item_vectors_path = ""
    config.features.text = "title"  #: Comma-separated text features, encoded by TF-IDF + SVD.
    config.features.text_dim = 32  #: Columns of the TF-IDF + SVD text vectors.
    config.features.categorical = ""  #: Comma-separated integer features read as categories.
    config.features.fusion = "gate"  #: How ids and features combine: 'sum', 'concat' or 'gate'.
    config.features.id_dropout = 0.5  #: Training: chance an item's id part is dropped a step.
    # Models with use_features also read the users' side features where the data has
    # them (MovieLens demographics, data.user_features_path): added to every position.
    config.features.ignore = ""  #: Comma-separated item/user side features the models leave out.
    config.features.users = True  #: Models with side features also read the users'.

    config.click = click_config()
    config.teacher = model_config()
    config.student = model_config(embed_dim=16, num_blocks=1, num_heads=1, mlp_dim=64)
    # The scratch student's own optimisation settings, where its search chose
    # differently from the distilled student's (benchmarks/search.py picks
    # each student's point by its own validation score). -1 = config.student's
    # value. The architecture, steps and batch always come from config.student:
    # both students are the same model trained for as long.
    config.student_scratch = ml_collections.ConfigDict()
    config.student_scratch.learning_rate = -1.0  #: Scratch student's peak learning rate.
    config.student_scratch.dropout = -1.0  #: Scratch student's dropout rate.
    config.student_scratch.weight_decay = -1.0  #: Scratch student's weight decay.
    #: Scratch student's exclude_history; -1: config.student's; 0: False; 1: True.
    config.student_scratch.exclude_history = -1

    config.distill = ml_collections.ConfigDict()
    # How the student is taught (distill_jax/losses: each method is a target
    # of the loss table): 'soft' is alpha*CE + (1-alpha)*T^2*KL(teacher_T ||
    # student_T); 'hard' the teacher's top-hard_k; 'ranking' the teacher's
    # top-ranking_k order (losses/ranking.py); 'cached' the soft KL from the
    # teacher's top-cache_k logits written once by the soft_labels stage
    # (losses/cached.py), no teacher in memory; 'ensemble' the soft KL from
    # several teachers averaged in probability space (train/ensemble.py).
    #: 'soft', 'hard', 'ranking', 'cached' or 'ensemble'.
    config.distill.method = "soft"
    config.distill.temperature = 1.0  #: Temperature T of teacher and student softmaxes, > 0.
    config.distill.alpha = 0.0  #: Weight of the label cross-entropy, in [0, 1].
    config.distill.hard_k = 1  #: 'hard' target: how many of the teacher's top items.
    config.distill.ranking_k = 10  #: 'ranking' target: length of the teacher's ranking taught.
    #: 'ranking' target: 'rrd' (relaxed Plackett-Luce) or 'rd' (position-weighted positives).
    config.distill.ranking_loss = "rrd"
    config.distill.ranking_lambda = 5.0  #: 'rd' loss: position weights exp(-rank / lambda).
    # 'cached': the soft_labels stage stores each training slot's top-cache_k
    # teacher logits and the log-mass of the rest (an ArrayRecord dataset in
    # WORKDIR/soft_labels/); the KL is exact over those K items plus one
    # bucket for the rest.
    config.distill.cache_k = 128  #: 'cached' method: teacher logits stored per slot.
    # 'ensemble': the teachers, each a stage of this workdir ('teacher', or
    # 'teacher_<n>': config.teacher trained with seed config.seed + n) or the
    # directory of a finished teacher stage elsewhere (its own config is read
    # from its checkpoint); their softmaxes are averaged with these weights.
    #: 'ensemble' method: comma-separated teacher stages or stage directories.
    config.distill.ensemble_teachers = "teacher,teacher_1,teacher_2"
    #: 'ensemble' method: comma-separated weights (one per teacher); '' = equal.
    config.distill.ensemble_weights = ""
    # Hidden-state matching, added to any method: the student's hidden state
    # at each slot, through a learned linear projection (trained with the
    # student, not part of the served model), matched to the teacher's
    # (an ensemble's: its teachers' concatenated).
    config.distill.hidden_weight = 0.0  #: Weight of the hidden-state loss; 0 = off.
    config.distill.hidden_loss = "mse"  #: Hidden-state loss: 'mse' or 'cosine'.
    # How the distilled student starts: 'none' (random, like the scratch
    # student) or 'pca' (item/position tables = the teacher's projected on its
    # top principal directions, output bias copied; distill_jax/train/teacher_init.py).
    config.distill.init_from_teacher = "none"  #: Student start: 'none' or 'pca'.
    # Causal students: also distill at each user's last training item, whose
    # next item is held out, so only the teacher supervises it there (one
    # teacher-only slot per user and epoch; distill_jax/data/pipeline.py).
    config.distill.last_item_slot = False  #: Also distill at each user's last training item.

    # How the catalogue part of every loss is computed (distill_jax/losses,
    # FORMS; the PAIRS table says which target has which form): 'dense'
    # materialises [positions, V+1] logits; 'vocab_parallel' keeps them sharded
    # along mesh axis 'model' and reduces across shards (for item tables sharded
    # by the 'vocab' rule); 'chunked' scans item chunks of chunk_size with an
    # online logsumexp (catalogues too large to materialise); 'cpu_kernel' fuses
    # the loss into one C++ pass per row (built on first use; CPU backend, any
    # mesh); 'pallas' fuses it into Pallas kernels over item tiles (GPU/TPU, rows
    # split along 'data', no vocab-sharded table; interpreted, slowly, on the CPU).
    # 'auto' takes, per stage, the fastest of these that runs its target and
    # options on this backend and mesh, and logs which and why
    # (distill_jax/losses/auto.py); all give the same values and gradients.
    config.loss = ml_collections.ConfigDict()
    #: 'auto' (the fastest that fits), 'dense', 'vocab_parallel', 'chunked', 'cpu_kernel', 'pallas'.
    config.loss.form = "auto"
    config.loss.chunk_size = 8192  #: 'chunked' form: items per chunk.

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 200  #: Training steps between validation evaluations.
    config.eval.batch_size = 256  #: Users per evaluation batch.
    config.eval.patience = 5  #: Evaluations without improvement before stopping; 0 = never.
    config.eval.exclude_history = True  #: Rank only items outside the user's whole history.
    config.eval.ks = (5, 10, 20)  #: Cut-offs k of HR@k and NDCG@k.
    # Long-tail slice: targets outside the most popular items that make up
    # this share of the training interactions.
    config.eval.tail_share = 0.2  #: Share of training interactions the head items make up.
    #: Report stage: CPU latency of a top-10 recommendation for these batch sizes.
    config.eval.latency_batch_sizes = (1, 256)
    config.eval.latency_repeats = 30  #: Timed calls per latency measurement.
    config.eval.max_valid_users = -1  #: Validation users: -1 = every user; else a seeded subset.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  #: Devices along mesh axis 'data'; -1 fills what 'model' leaves.
    config.mesh.model = 1  #: Devices along mesh axis 'model'; -1 fills what 'data' leaves.
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = DEFAULT_RULES  #: (logical axis, mesh axis or None) pairs.

    # Several processes (hosts, or one process per GPU). Unset values (''/-1)
    # come from the environment instead; see distill_jax/distributed.py for the
    # order: these keys, then DISTILL_JAX_COORDINATOR / DISTILL_JAX_NUM_PROCESSES
    # / DISTILL_JAX_PROCESS_ID, then SLURM_NTASKS / SLURM_PROCID under srun,
    # then jax's own detection (Cloud TPU VMs, Open MPI). Nothing set and no
    # cluster found: one process, and jax.distributed is never initialised.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  #: 'host:port' of process 0; '' = from env.
    config.distributed.num_processes = -1  #: -1 = from env / auto; 1 = never initialise.
    config.distributed.process_id = -1  #: -1 = from env / auto; else in [0, num_processes).
    config.distributed.cpu_collectives = "gloo"  #: CPU cross-process collectives: 'gloo', 'mpi'.
    config.distributed.initialization_timeout = 300  #: Seconds to wait for every process.
    # A process that dies (SIGKILL, a crash, a lost host) stops sending heartbeats; after
    # this long jax's coordination service stops every other process with an error, wherever
    # it waits (a collective that a dead peer's closed connection does not end at once).
    #: Seconds without heartbeats before a process counts as dead and the others stop.
    config.distributed.heartbeat_timeout = 100

    # The compress stage: smaller variants of a trained student, each evaluated
    # and reported as '<source>_<variant>' (distill_jax/compress).
    config.compress = ml_collections.ConfigDict()
    config.compress.source = "student_kd"  #: The trained stage to compress.
    # Comma-separated: pruned<percent> (magnitude pruning), int8 (post-training
    # int8 weights), int8_act (int8 weights and activations: measured, not one
    # to serve, see compress/quantize.py), int8_qat
    # (quantization-aware fine-tuning, then int8), lowrank<rank> (item table
    # factorized by truncated SVD). '' makes none.
    #: Comma-separated variants: pruned<percent>, int8, int8_act, int8_qat, lowrank<rank>, ''.
    config.compress.variants = "pruned50,pruned80,int8,int8_qat,lowrank8"
    # Fine-tuning of pruned, int8_qat and lowrank variants, with the source's
    # loss (distillation for student_kd): steps (0 = none: one-shot), peak
    # learning rate (linear warm-up, cosine decay).
    config.compress.finetune_steps = 200  #: Fine-tuning steps per variant; 0 = one-shot.
    config.compress.learning_rate = 1e-3  #: Fine-tuning peak learning rate.
    config.compress.warmup_steps = 20  #: Fine-tuning linear warm-up steps.
    # Pruning: one magnitude threshold over all matrices ('global') or one per
    # matrix ('layer'); whether the item table is cut too; the cubic schedule
    # reaches its target at this share of the fine-tuning; masks every N steps.
    config.compress.prune_scope = "global"  #: 'global' (one threshold) or 'layer' (one per matrix).
    config.compress.prune_item_table = True  #: Prune the item table too.
    config.compress.prune_end_fraction = 0.75  #: Full sparsity at this share of the fine-tuning.
    config.compress.prune_every_steps = 10  #: Fine-tuning steps between mask updates.

    # The export stage: WORKDIR/export/, an artefact distill_jax.recommend serves.
    config.export = ml_collections.ConfigDict()
    # A trained stage or a compress variant's report name, e.g. 'student_kd_int8'.
    config.export.model = "student_kd_int8"  #: The stage or compress variant to export.
    config.export.top_k = 10  #: Recommendations per history.
    config.export.popular_items = 100  #: Kept for the fallback of an empty history.

    # jax's persistent compilation cache (distill_jax/compile_cache.py): a
    # program compiled once is read back by later stages, resumes, seeds and
    # runs. $JAX_COMPILATION_CACHE_DIR, where set, wins.
    config.compile_cache = ml_collections.ConfigDict()
    config.compile_cache.dir = "auto"  #: 'auto': ~/.cache/distill_jax/xla; '': off; or a directory.
    config.compile_cache.max_gb = 4.0  #: Size the cache is kept under, least recently used first.

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 200  #: Training steps between checkpoints.
    config.log_every_steps = 100  #: Training steps between progress lines.

    # Every training stage (distill_jax/train/loop.py). A step whose loss or
    # gradient norm is NaN or Inf never changes the parameters (nor reaches a
    # checkpoint); 'stop' then ends the run naming the step, keeping the last
    # good checkpoint; 'skip' goes on and counts the skipped steps.
    config.train = ml_collections.ConfigDict()
    #: A step with a NaN/Inf loss or gradient: 'stop' the run or 'skip' the step.
    config.train.on_nonfinite = "stop"
    return config
