"""RecBole's SASRec beside ours: training targets per second and seconds to a validation NDCG@10.

  pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install recbole
  # (or: pip install -e '.[peers]')
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
  python -m benchmarks.peers.recbole_sasrec --config=configs/beauty.py \\
      --config.data.path=../shared/datasets/amazon-beauty/Beauty.txt \\
      --shape=teacher --until_ndcg=0.06 --max_seconds=3600 --workdir=/tmp/peers_teacher
  (--shape=student --until_ndcg=0.05: our student_scratch's shape, d=14 on Beauty.)

Both systems train the same model shape on the same data, on this CPU, one
after the other (`--systems`, in that order), each stopping at the first
validation NDCG@10 >= `--until_ndcg` or after `--max_seconds` of training.
Validation is every `--eval_every_epochs` epochs on both (an epoch: every
training target once) and follows OUR protocol: every user, the model reading
the newest max_len training items, the validation item as the target, full
ranking over the whole catalogue, the user's training items excluded when
config.eval.exclude_history (the default).

* RecBole (torch, `--threads` threads, in this process): its SASRec with
  full-softmax cross-entropy (loss_type 'CE', no negative sampling), read from
  atomic `.inter` and `.item` files written from OUR dataset
  (`write_atomic_files`: the users' sequences after our preprocessing, in
  order, timestamp = position; the whole catalogue), so its leave-one-out
  split ('LS', time order, by user) is ours (tests/test_peers.py). RecBole
  makes every prefix of a training sequence one example with one target; ours
  packs every target of a window into one row, so RecBole's batch of B is B
  targets and ours B windows (about 6 targets each on Beauty): per epoch
  RecBole makes about 6x as many updates. Shape, dropout, lr and batch size
  are the stage's (`--shape`: config.teacher, or config.student with the
  student_scratch overrides); the optimiser (`--optimizer=ours`) is our recipe
  in torch: AdamW (b2 0.98, decay on matrices only), the gradient clip, linear
  warm-up then cosine decay to 1% over as many EPOCHS as our stage's
  warmup_steps and num_steps (RecBole itself has no schedule);
  `--optimizer=recbole` is RecBole's default learner instead (Adam, constant
  lr, no decay, no clip). Its validation scores are our metric code
  (distill_jax/evaluation/metrics.py) on the model's full-catalogue scores.
  RecBole's blocks are post-LayerNorm with no output bias; ours pre-LayerNorm
  with one.
* ours: the stage (`teacher` or `student_scratch`) as the main job runs it
  (`python -m distill_jax.main` in a process of its own, in
  WORKDIR/ours_<stage>/, its output in WORKDIR/ours_<stage>.log; the data
  cached in WORKDIR/data), with config.eval.every_steps (and
  log_every_steps) set to the epochs asked, no early stopping, every user
  validated; stopped by SIGTERM (a clean pre-emption) at the target or the
  time. Its times come from the TensorBoard events the trainer writes
  (WORKDIR/ours_<stage>/<stage>/tb/, a wall time per event): training starts
  at the stage's `config` event, and each validation, from its step's
  training scalars to its own, is left out.

Columns: targets/s is training targets per second of training (RecBole: all it
iterated over its training seconds; ours: from the first progress line an
epoch in, when every batch shape has compiled, to the last); seconds to
NDCG@10 >= X counts training only, no validation pass (ours includes its
compilations and checkpoints). Prints a JSON line per system, one table and
the machine, and writes all of it, with the validation curves, to
WORKDIR/recbole_sasrec_<shape>.json.

RecBole 1.2.1 on numpy 2 and pandas 3 needs shims, applied in `import_recbole`:
its Config assigns the removed `np.float_`, `np.complex_`, `np.unicode_`
(restored as aliases first), and its missing-value filling is a no-op under
pandas' copy-on-write (its warning is silenced: the `.inter` written here has
no missing values).
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np
from absl import flags

from benchmarks import common, machine
from distill_jax import config_lib, pipeline
from distill_jax import sharding as sharding_lib
from distill_jax.data import dataset as dataset_lib
from distill_jax.train import loop

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token"
# --shape -> (our stage, its config subtree)
SHAPES = {"teacher": ("teacher", "teacher"), "student": ("student_scratch", "student")}
VALID_TAG, LOSS_TAG, CONFIG_TAG = "valid/ndcg_10", "train/loss", "config/text_summary"


def write_atomic_files(
    sequences: Sequence[Sequence[int]], num_items: int, directory: str, name: str
) -> int:
    """Writes users' item sequences as RecBole atomic files; returns the interactions.

    `DIRECTORY/NAME.inter`: user n (from 1) is the n-th sequence, each row
    `user item position`, the position standing in for the time (RecBole's
    'TO' order), so RecBole sees every sequence in the given order.
    `DIRECTORY/NAME.item`: every item id 1..num_items, so RecBole's catalogue
    is the whole of ours, items no one interacted with included. Ids are
    written as they are (RecBole maps these tokens to ids of its own).
    """
    os.makedirs(directory, exist_ok=True)
    rows = 0
    with open(os.path.join(directory, f"{name}.inter"), "w") as f:
        f.write(INTER_HEADER + "\n")
        for user, items in enumerate(sequences, start=1):
            for t, item in enumerate(items):
                f.write(f"{user}\t{int(item)}\t{t}\n")
            rows += len(items)
    with open(os.path.join(directory, f"{name}.item"), "w") as f:
        f.write(ITEM_HEADER + "\n")
        f.writelines(f"{i}\n" for i in range(1, num_items + 1))
    return rows


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """recbole_sasrec.py's flags."""
    common.define_config(flag_values, argv)
    fv = flag_values
    flags.DEFINE_enum("shape", "teacher", list(SHAPES), "Whose model shape.", flag_values=fv)
    flags.DEFINE_float(
        "until_ndcg", None, "Target validation NDCG@10.", required=True, flag_values=fv
    )
    flags.DEFINE_float(
        "max_seconds", 3600.0, "Training seconds at most, per system.", flag_values=fv
    )
    flags.DEFINE_list("systems", ["recbole", "ours"], "Run in this order.", flag_values=fv)
    flags.DEFINE_float(
        "eval_every_epochs", 1.0, "Validation every this many epochs, both.", flag_values=fv
    )
    flags.DEFINE_enum(
        "optimizer",
        "ours",
        ["ours", "recbole"],
        "RecBole's optimiser: our recipe in torch, or RecBole's default learner.",
        flag_values=fv,
    )
    flags.DEFINE_integer("threads", 2, "torch threads for RecBole.", flag_values=fv)
    flags.DEFINE_integer("eval_batch", 1024, "Users per validation batch.", flag_values=fv)
    flags.DEFINE_string(
        "workdir", None, "Where the runs and the JSON go.", required=True, flag_values=fv
    )


# --------------------------------------------------------------------------
# RecBole
# --------------------------------------------------------------------------


def import_recbole():
    """torch and RecBole's pieces, with the compatibility shims the module docstring lists."""
    try:
        import torch
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.utils import init_seed
    except ImportError as e:
        sys.exit(
            f"recbole_sasrec: {e}; install the peers: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu && pip install recbole (or pip install -e "
            "'.[peers]'), or leave recbole out of --systems"
        )
    for name, alias in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, name):
            setattr(np, name, alias)
    import pandas as pd

    chained = getattr(pd.errors, "ChainedAssignmentError", None)
    if chained is not None:
        warnings.filterwarnings("ignore", category=chained)
    return torch, Config, create_dataset, data_preparation, SASRec, init_seed


def recbole_settings(mcfg, config, data_dir: str, name: str) -> dict:
    """RecBole's config dict: our stage's shape, data fields and leave-one-out split."""
    return {
        "data_path": data_dir,
        "dataset": name,
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "MAX_ITEM_LIST_LENGTH": mcfg.max_len,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "hidden_size": mcfg.embed_dim,
        "n_layers": mcfg.num_blocks,
        "n_heads": mcfg.num_heads,
        "inner_size": mcfg.mlp_dim,
        "hidden_dropout_prob": mcfg.dropout,
        "attn_dropout_prob": mcfg.dropout,
        "train_batch_size": mcfg.batch_size,
        "learning_rate": mcfg.learning_rate,
        "seed": config.seed,
        "reproducibility": True,
        "device": "cpu",
        "use_gpu": False,
        "show_progress": False,
        "state": "WARNING",
    }


def _schedule(step: int, warmup: int, total: int) -> float:
    """optax.warmup_cosine_decay_schedule / peak (init 0, end 1%), as train/state.py uses it."""
    if step < warmup:
        return step / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac))


def _optimizer(torch, model, mcfg, kind: str, total: int, warmup: int):
    """(optimizer, scheduler or None, clip norm): `--optimizer`'s recipe."""
    if kind == "recbole":  # RecBole's defaults: learner 'adam', weight_decay 0, no clip
        return torch.optim.Adam(model.parameters(), lr=mcfg.learning_rate), None, 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": mcfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=mcfg.learning_rate, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, warmup, total))
    return opt, sched, mcfg.grad_clip_norm


def validation_inputs(split, token_ids: np.ndarray, max_len: int):
    """RecBole-id inputs of our validation examples: right-padded windows, lengths,
    targets and whole histories (padded with 0)."""
    histories, targets = split.eval_examples("valid")
    n, width = len(histories), max(len(h) for h in histories)
    seqs = np.zeros((n, max_len), np.int64)
    lengths = np.zeros(n, np.int64)
    hist = np.zeros((n, width), np.int32)
    for i, h in enumerate(histories):
        ids = token_ids[np.asarray(h)]
        window = ids[-max_len:]
        seqs[i, : len(window)] = window
        lengths[i] = len(window)
        hist[i, : len(ids)] = ids
    return seqs, lengths, token_ids[np.asarray(targets)].astype(np.int32), hist


def evaluate_recbole(torch, model, inputs, exclude_history: bool, batch: int) -> float:
    """Validation NDCG@10 by our metric code on the RecBole model's full-catalogue scores."""
    from distill_jax.evaluation import metrics

    seqs, lengths, targets, hist = inputs
    model.eval()
    total = None
    with torch.no_grad():
        table = model.item_embedding.weight
        for lo in range(0, len(seqs), batch):
            hi = min(lo + batch, len(seqs))
            pad = batch - (hi - lo)  # one shape for every batch: one compilation
            seq = torch.from_numpy(np.pad(seqs[lo:hi], ((0, pad), (0, 0))))
            length = torch.from_numpy(np.pad(lengths[lo:hi], (0, pad), constant_values=1))
            scores = (model.forward(seq, length) @ table.T).numpy()
            ranks = metrics.target_ranks(
                scores,
                np.pad(targets[lo:hi], (0, pad)),
                np.pad(hist[lo:hi], ((0, pad), (0, 0))),
                exclude_history=exclude_history,
            )
            where = np.arange(batch) < hi - lo
            total = metrics.accumulate(total, metrics.ranking_metrics(ranks, ks=(10,), where=where))
    model.train()
    return metrics.finalize(total)["ndcg@10"]


def run_recbole(args, config, split, mcfg, our_epoch: dict, workdir: str) -> dict:
    """Trains RecBole's SASRec until the target or the time; its targets/s and curve."""
    torch, Config, create_dataset, data_preparation, SASRec, init_seed = import_recbole()
    torch.set_num_threads(args.threads)
    t_prep = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as data_dir:
        name = "data"
        write_atomic_files(split.full, split.num_items, os.path.join(data_dir, name), name)
        rb_config = Config(
            model="SASRec", config_dict=recbole_settings(mcfg, config, data_dir, name)
        )
        init_seed(rb_config["seed"], rb_config["reproducibility"])
        dataset = create_dataset(rb_config)
        train_data, _, _ = data_preparation(rb_config, dataset)
    init_seed(rb_config["seed"], rb_config["reproducibility"])
    model = SASRec(rb_config, train_data.dataset)
    tokens = dataset.field2token_id[dataset.iid_field]
    token_ids = np.zeros(split.num_items + 1, np.int64)
    for item in range(1, split.num_items + 1):
        token_ids[item] = tokens[str(item)]
    inputs = validation_inputs(split, token_ids, mcfg.max_len)
    prep_seconds = time.perf_counter() - t_prep

    targets_per_epoch = len(train_data.dataset)
    steps_per_epoch = math.ceil(targets_per_epoch / mcfg.batch_size)
    # Our schedule spans num_steps of our steps: the same number of epochs here.
    epochs = mcfg.num_steps / our_epoch["steps"]
    total = max(1, round(epochs * steps_per_epoch))
    warmup = round(mcfg.warmup_steps / our_epoch["steps"] * steps_per_epoch)
    opt, sched, clip = _optimizer(torch, model, mcfg, args.optimizer, total, warmup)
    every = max(1, round(args.eval_every_epochs * steps_per_epoch))
    print(
        f"[recbole] {targets_per_epoch} training targets, {steps_per_epoch} steps/epoch, "
        f"validation every {every} steps; prepared in {prep_seconds:.1f}s",
        flush=True,
    )

    curve, step, seen, train_s, eval_s = [], 0, 0, 0.0, 0.0
    reached = None
    model.train()
    t = time.perf_counter()
    done = False
    while not done:
        for interaction in train_data:
            opt.zero_grad()
            loss = model.calculate_loss(interaction)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            seen += len(interaction)
            over = time.perf_counter() - t + train_s >= args.max_seconds or step >= total
            if step % every and not over:
                continue
            train_s += time.perf_counter() - t
            t_eval = time.perf_counter()
            ndcg = evaluate_recbole(
                torch, model, inputs, config.eval.exclude_history, args.eval_batch
            )
            eval_s += time.perf_counter() - t_eval
            curve.append([step, train_s, ndcg])
            print(
                f"[recbole] step {step} ({step / steps_per_epoch:.2f} epochs) loss "
                f"{loss.item():.4f} valid ndcg@10={ndcg:.4f} after {train_s:.1f}s of training",
                flush=True,
            )
            if ndcg >= args.until_ndcg and reached is None:
                reached = train_s
            if reached is not None or over:
                done = True
                break
            t = time.perf_counter()
    return {
        "system": "recbole",
        "params": sum(p.numel() for p in model.parameters()),
        "targets_per_second": seen / train_s,
        "seconds_to_target": reached,
        "train_seconds": train_s,
        "validation_seconds": eval_s,
        "prep_seconds": prep_seconds,
        "steps": step,
        "targets_per_epoch": targets_per_epoch,
        "epochs": step / steps_per_epoch,
        "optimizer": args.optimizer,
        "curve": curve,
    }


# --------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------


def read_events(tb_dir: str) -> tuple[float | None, list, list]:
    """(start, [(step, wall)] of the training scalars, [(step, wall, ndcg@10)]) of a stage."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(tb_dir, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    if CONFIG_TAG not in tags.get("tensors", []):
        return None, [], []
    start = acc.Tensors(CONFIG_TAG)[-1].wall_time  # the last (re)start of the stage
    train = (
        [(e.step, e.wall_time) for e in acc.Scalars(LOSS_TAG)]
        if LOSS_TAG in tags["scalars"]
        else []
    )
    valid = (
        [(e.step, e.wall_time, e.value) for e in acc.Scalars(VALID_TAG)]
        if VALID_TAG in tags["scalars"]
        else []
    )
    return start, train, valid


def our_curve(start: float, train: list, valid: list) -> tuple[list, list]:
    """[[step, training seconds, ndcg@10]] per validation, and each validation's seconds.

    A validation at step s runs between that step's training scalars and its own.
    """
    logged = dict(train)
    curve, durations, spent = [], [], 0.0
    for step, wall, ndcg in valid:
        took = wall - logged[step] if step in logged else 0.0
        spent += took
        durations.append((step, took))
        curve.append([step, wall - start - spent, ndcg])
    return curve, durations


def steady_rate(
    train: list, durations: list, targets_per_step: float, from_step: int
) -> tuple[float | None, int | None]:
    """Targets/s between two training scalars, validations left out; and the first step.

    From the first scalar at or after `from_step` (an epoch in: every batch shape
    compiled) where two follow it, else from the first; None with fewer than two.
    """
    if len(train) < 2:
        return None, None
    later = [i for i, (s, _) in enumerate(train) if s >= from_step]
    first = later[0] if later and len(train) - later[0] >= 2 else 0
    (a, wall_a), (b, wall_b) = train[first], train[-1]
    pause = sum(d for s, d in durations if a <= s < b)
    return (b - a) * targets_per_step / (wall_b - wall_a - pause), a


def run_ours(args, argv, config, mcfg, stage: str, epoch: dict, workdir: str) -> dict:
    """Runs our stage in the main job until the target or the time; its targets/s and curve."""
    every = max(1, round(args.eval_every_epochs * epoch["steps"]))
    wd = os.path.join(workdir, f"ours_{stage}")
    log_path = os.path.join(workdir, f"ours_{stage}.log")
    overrides = [
        f"--config.stages={stage}",
        f"--config.eval.every_steps={every}",
        "--config.eval.patience=0",
        "--config.eval.max_valid_users=-1",
        # One progress line per validation: each line makes the host wait for the step.
        f"--config.log_every_steps={every}",
        f"--config.data.cache_dir={os.path.join(workdir, 'data')}",
    ]
    cmd = common.main_job_command(argv, overrides, wd)
    print(f"[ours] {' '.join(cmd)}\n[ours] log: {log_path}", flush=True)
    tb = os.path.join(wd, stage, "tb")
    reached = stopped = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(2.0)
            if stopped or not os.path.isdir(tb):
                continue
            start, train, valid = read_events(tb)
            if start is None:
                continue
            curve, durations = our_curve(start, train, valid)
            hit = [c for c in curve if c[2] >= args.until_ndcg]
            spent = time.time() - start - sum(d for _, d in durations)
            if hit or spent >= args.max_seconds:
                stopped = "target" if hit else "max_seconds"
                proc.send_signal(signal.SIGTERM)  # a clean pre-emption: checkpoint, exit 75
        code = proc.wait()
    if code not in (0, 75):
        sys.exit(f"recbole_sasrec: our {stage} stage failed (exit {code}); its output: {log_path}")
    start, train, valid = read_events(tb)
    curve, durations = our_curve(start, train, valid)
    hit = [c for c in curve if c[2] >= args.until_ndcg]
    reached = hit[0][1] if hit else None
    for step, seconds, ndcg in curve:
        print(f"[ours] step {step} valid ndcg@10={ndcg:.4f} after {seconds:.1f}s of training")
    last_train = (train[-1][1] - start - sum(d for _, d in durations)) if train else 0.0
    steps = max([s for s, _ in train] + [c[0] for c in curve] + [0])
    rate, rate_from = steady_rate(
        train, durations, epoch["targets"] / epoch["steps"], from_step=epoch["steps"]
    )
    if reached is not None:
        stopped = "target"
    elif steps >= mcfg.num_steps:
        stopped = "num_steps"
    elif stopped is None:
        stopped = f"exit {code}"
    return {
        "system": "ours",
        "targets_per_second": rate,
        "rate_from_step": rate_from,
        "seconds_to_target": reached,
        "train_seconds": max([last_train] + [c[1] for c in curve]),
        "validation_seconds": sum(d for _, d in durations),
        "steps": steps,
        "targets_per_epoch": epoch["targets"],
        "epochs": steps / epoch["steps"],
        "stopped_by": stopped,
        "workdir": wd,
        "log": log_path,
        "curve": curve,
    }


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def table(rows: list[dict], shape: str, until: float) -> list[str]:
    """system | shape | targets/s | seconds to NDCG@10 >= X | both as a ratio to ours."""
    ours = next((r for r in rows if r["system"] == "ours"), None)

    def ratio(r, key):
        if ours is None or r[key] is None or not ours[key]:
            return "-"
        return f"{r[key] / ours[key]:.2f}"

    lines = [
        f"| system | shape | targets/s | s to NDCG@10 >= {until} | targets/s / ours | "
        "s / ours | best valid NDCG@10 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = "-" if r["targets_per_second"] is None else f"{r['targets_per_second']:,.0f}"
        secs = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        best = max((c[2] for c in r["curve"]), default=None)
        lines.append(
            f"| {r['system']} | {shape} | {rate} | {secs} | {ratio(r, 'targets_per_second')} | "
            f"{ratio(r, 'seconds_to_target')} | {'-' if best is None else f'{best:.4f}'} |"
        )
    return lines


def main(argv: Sequence[str]) -> None:
    """Runs the systems of `--systems`, then prints the table and writes the JSON."""
    args = common.parse_flags(argv, define_flags, __doc__)
    unknown = set(args.systems) - {"recbole", "ours"}
    if unknown or not args.systems:
        sys.exit(
            f"recbole_sasrec: --systems={','.join(args.systems)}: expected recbole and/or ours"
        )
    config = args.config
    stage, key = SHAPES[args.shape]
    mcfg = config_lib.stage_model_config(config, stage, key)
    if mcfg.name != "sasrec":
        sys.exit(f"recbole_sasrec: config.{key}.name={mcfg.name!r}: only 'sasrec' has a peer here")
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        sys.exit(f"recbole_sasrec: {e}")
    os.makedirs(args.workdir, exist_ok=True)
    # The data once, where our run reads it back (config.data.cache_dir).
    data_config = common.apply_overrides(
        config, {"data.cache_dir": os.path.join(args.workdir, "data")}, flag="--workdir"
    )
    data = dataset_lib.load(data_config, args.workdir)
    split = data.split
    mesh = sharding_lib.make_mesh(config.mesh)
    model = pipeline.build(config, key, split, stage, mesh)
    batches = loop.train_batches(model, mcfg, config, split, mesh)
    epoch = {"steps": batches.steps_per_epoch, "targets": int(batches.slot_counts().sum())}
    print(
        f"{data.info['name']}: {data.info['users']} users, {data.info['items']} items; "
        f"{args.shape} shape d={mcfg.embed_dim} blocks={mcfg.num_blocks} heads={mcfg.num_heads} "
        f"mlp={mcfg.mlp_dim} dropout={mcfg.dropout} lr={mcfg.learning_rate} B={mcfg.batch_size}; "
        f"ours: {epoch['targets']} training targets, {epoch['steps']} steps/epoch",
        flush=True,
    )
    rows = []
    for system in args.systems:
        if system == "recbole":
            rows.append(run_recbole(args, config, split, mcfg, epoch, args.workdir))
        else:
            rows.append(run_ours(args, argv, config, mcfg, stage, epoch, args.workdir))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    info = machine.describe()
    out = {"machine": info, "argv": list(argv), "shape": args.shape, "rows": rows}
    path = os.path.join(args.workdir, f"recbole_sasrec_{args.shape}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(
        f"\n{data.info['name']}, validation NDCG@10 (our protocol: every user, full ranking"
        f"{', history excluded' if config.eval.exclude_history else ''}); {info['cpu']}, "
        f"{info['cores']} cores, torch threads {args.threads}, {info['allocator']}; commit "
        f"{info['commit']}; {info['date']}\n"
    )
    for line in table(rows, args.shape, args.until_ndcg):
        print(line)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main(sys.argv)
