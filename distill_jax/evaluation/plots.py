"""The report's figures, drawn with matplotlib on its headless Agg canvas.

Every function takes a list of reports (`report.json` dicts): one for a run
of the main job, several for the seeds of `benchmarks/quality.py`, where
each point or bar is the mean over the seeds and its error bar one standard
deviation. The figures never touch pyplot's global state, so they draw the
same in a terminal, a CI job and a notebook (whatever its backend).

  curves.png        loss and validation NDCG@10 against the step, per stage
  quality_size.png  test NDCG@10 against parameters, bytes and top-10 latency
  long_tail.png     share of top-10 recommendations and HR@10 per popularity decile
  agreement.png     each student's top-10 overlap with the teacher
  reliability.png   the click task: click rate against predicted probability, per model
"""

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

METRIC = "ndcg@10"
# The models the long-tail figure compares (the compressed variants would crowd it).
TAIL_MODELS = ("popularity", "teacher", "student_kd", "student_scratch")
_COLORS = {
    "popularity": "#7f7f7f",
    "teacher": "#1f77b4",
    "student_kd": "#d62728",
    "student_scratch": "#2ca02c",
}


_OTHERS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e")


def _palette(reports: list[dict]) -> dict[str, str]:
    """One colour per model, the same in every figure: fixed for the main models."""
    out, i = {}, 0
    for name in reports[0]["models"]:
        if name in _COLORS:
            out[name] = _COLORS[name]
        else:
            out[name] = _OTHERS[i % len(_OTHERS)]
            i += 1
    return out


def _log_axis(ax) -> None:
    """A log x axis labelled in plain numbers (1000, 2000, not 10^3)."""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _models(reports: list[dict]) -> list[str]:
    """Model names in report order, kept where every report has them."""
    return [n for n in reports[0]["models"] if all(n in r["models"] for r in reports)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return float("nan"), 0.0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _test(reports, name, key=METRIC):
    return _mean_std([r["models"][name]["metrics"]["test"][key] for r in reports])


def curves(reports: list[dict]) -> Figure | None:
    """Training loss (top row) and validation NDCG@10 (bottom) per stage; None if no curves."""
    color = _palette(reports)
    names = [
        n for n in _models(reports) if (reports[0]["models"][n].get("curves") or {}).get("train")
    ]
    if not names:
        return None
    cols = min(len(names), 4)
    blocks = -(-len(names) // cols)
    fig = _figure(3.4 * cols, 4.6 * blocks)
    grid = fig.subplots(2 * blocks, cols, squeeze=False)
    for i, name in enumerate(names):
        top, bottom = grid[2 * (i // cols), i % cols], grid[2 * (i // cols) + 1, i % cols]
        for r in reports:
            c = r["models"][name]["curves"]
            alpha = 1.0 if len(reports) == 1 else 0.6
            label = None if len(reports) == 1 else f"seed {r['config']['seed']}"
            for ax, key in ((top, "train"), (bottom, "valid")):
                pts = np.asarray(c.get(key) or [], np.float64).reshape(-1, 2)
                ax.plot(
                    pts[:, 0],
                    pts[:, 1],
                    color=color[name] if len(reports) == 1 else None,
                    alpha=alpha,
                    marker="." if key == "valid" else None,
                    label=label,
                )
        top.set_title(name, fontsize=10)
        top.set_ylabel("training loss")
        bottom.set_ylabel("valid NDCG@10")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if len(reports) > 1 and i == 0:
            top.legend(fontsize=7)
    for k in range(len(names), blocks * cols):
        grid[2 * (k // cols), k % cols].set_visible(False)
        grid[2 * (k // cols) + 1, k % cols].set_visible(False)
    return fig


def _latency(model: dict) -> float | None:
    lat = (model.get("cost") or {}).get("latency_top10") or {}
    if not lat:
        return None
    biggest = max(lat, key=lambda b: int(b.removeprefix("batch_")))
    return lat[biggest]["p50_ms"]


def _latency_batch(reports) -> str:
    for m in reports[0]["models"].values():
        lat = (m.get("cost") or {}).get("latency_top10") or {}
        if lat:
            return max(lat, key=lambda b: int(b.removeprefix("batch_"))).removeprefix("batch_")
    return "?"


def quality_size(reports: list[dict]) -> Figure:
    """Test NDCG@10 against parameter count, bytes and top-10 latency: one point per model."""
    color = _palette(reports)
    names = _models(reports)
    fig = _figure(13.5, 4.2)
    axes = fig.subplots(1, 3)
    xs = (
        ("params", lambda m: m.get("params") or None, "parameters"),
        ("bytes", lambda m: (m.get("param_bytes") or 0) / 1024 or None, "parameter KiB"),
        ("latency", _latency, f"top-10 latency, batch {_latency_batch(reports)} (ms, p50)"),
    )
    for ax, (_, get, label) in zip(axes, xs, strict=True):
        for name in names:
            y, y_err = _test(reports, name)
            x, x_err = _mean_std([get(r["models"][name]) for r in reports])
            if name == "popularity" or not np.isfinite(x):
                ax.axhline(y, color=color[name], ls="--", lw=1)
                ax.annotate(
                    name,
                    (0.01, y),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color=color[name],
                    va="bottom",
                )
                continue
            ax.errorbar(
                x,
                y,
                yerr=y_err or None,
                xerr=x_err or None,
                fmt="o",
                color=color[name],
                capsize=3,
            )
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _log_axis(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("test NDCG@10")
        ax.grid(alpha=0.3, which="both")
    return fig


def long_tail(reports: list[dict]) -> Figure | None:
    """Per item-popularity decile: share of the top-10 lists (left) and HR@10 (right)."""
    color = _palette(reports)
    names = [
        n
        for n in TAIL_MODELS
        if n in _models(reports)
        and "test" in (reports[0]["models"][n].get("popularity_deciles") or {})
    ]
    if not names:
        return None
    k = reports[0]["models"][names[0]]["popularity_deciles"]["test"]["k"]
    fig = _figure(12, 4.2)
    left, right = fig.subplots(1, 2)
    groups = len(reports[0]["models"][names[0]]["popularity_deciles"]["test"]["items"])
    x = np.arange(1, groups + 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        d = [r["models"][name]["popularity_deciles"]["test"] for r in reports]
        share = np.array([_mean_std([di[f"rec_share@{k}"][g] for di in d]) for g in range(groups)])
        hr = np.array([_mean_std([di[f"hr@{k}"][g] for di in d]) for g in range(groups)])
        left.bar(
            x + (i - (len(names) - 1) / 2) * width,
            share[:, 0],
            width,
            yerr=share[:, 1] if len(reports) > 1 else None,
            label=name,
            color=color[name],
            capsize=2,
        )
        right.errorbar(
            x,
            hr[:, 0],
            yerr=hr[:, 1] if len(reports) > 1 else None,
            marker="o",
            label=name,
            color=color[name],
            capsize=3,
        )
    users = reports[0]["models"][names[0]]["popularity_deciles"]["test"]["users"]
    left.axhline(1 / groups, color="k", lw=0.8, ls=":", label="equal share")
    left.set_ylabel(f"share of all top-{k} recommendations")
    right.set_ylabel(f"test HR@{k}")
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xlabel("item-popularity decile (1 = most popular tenth of the catalogue)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    right.set_title("test users per decile: " + ", ".join(str(u) for u in users), fontsize=8)
    return fig


def agreement(reports: list[dict]) -> Figure | None:
    """Top-10 overlap with the teacher's recommendations (and the KL), per student."""
    color = _palette(reports)
    names = [n for n in _models(reports) if "agreement_with_teacher" in reports[0]["models"][n]]
    if not names:
        return None
    fig = _figure(max(5.0, 1.1 * len(names) + 2), 4.2)
    ax = fig.subplots()
    for i, name in enumerate(names):
        a = [r["models"][name]["agreement_with_teacher"]["test"] for r in reports]
        key = next(k for k in a[0] if k.endswith("_overlap"))
        y, err = _mean_std([x[key] for x in a])
        kl, _ = _mean_std([x["kl"] for x in a])
        ax.bar(i, y, yerr=err or None, color=color[name], capsize=3)
        ax.annotate(
            f"{y:.3f}\nKL {kl:.2f}",
            (i, y),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-10 overlap with the teacher (test)")
    ax.set_ylim(0, 1.15)
    ax.grid(alpha=0.3, axis="y")
    return fig


# File name -> drawing function, in the report's order.
FIGURES = {
    "curves": curves,
    "quality_size": quality_size,
    "long_tail": long_tail,
    "agreement": agreement,
}


def reliability(reports: list[dict]) -> Figure | None:
    """Click task: the reliability diagram of each model on the test split (first report)."""
    models = {
        n: r["metrics"]["test"].get("reliability")
        for n, r in reports[0]["models"].items()
        if r.get("metrics", {}).get("test", {}).get("reliability")
    }
    if not models:
        return None
    colors = _palette(reports)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="calibrated")
    for name, curve in models.items():
        pts = [
            (p, y)
            for p, y in zip(curve["mean_probability"], curve["click_rate"], strict=True)
            if p is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, color=colors[name], label=name)
    ax.set(
        xlabel="predicted click probability (bin mean)",
        ylabel="click rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability on the test split",
    )
    ax.legend(fontsize=8)
    return fig


# The click task's report (distill_jax/train/click.py).
CLICK_FIGURES = {"reliability": reliability}


def write_all(reports: list[dict], out_dir: str, figures: dict | None = None) -> dict[str, str]:
    """Draws every figure (of `figures`, default `FIGURES`) the reports have data for into
    `out_dir`; returns name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, draw in (FIGURES if figures is None else figures).items():
        fig = draw(reports)
        if fig is None:
            continue
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path)
        paths[name] = path
    return paths
