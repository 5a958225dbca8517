"""The main job's report: `report.md`, a self-contained `report.html` and the figures.

Everything is drawn from `report.json` (the dict `pipeline.run` returns), so
a report can be rebuilt from a finished workdir at any time:

  python -m distill_jax.evaluation.report WORKDIR

writes `WORKDIR/report.md`, `WORKDIR/report.html` (its figures embedded as
PNG data, one file to mail or open anywhere) and `WORKDIR/plots/*.png`.
"""

import base64
import html
import json
import os
import re
import sys

from distill_jax.evaluation import plots

COLUMNS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "gini@10", "tail_ndcg@10")
FIGURE_TITLES = {
    "curves": "Training curves: loss and validation NDCG@10 against the step, per stage",
    "quality_size": "Quality against size: test NDCG@10 against parameters, bytes and latency",
    "long_tail": "The long tail: top-10 recommendations and HR@10 per item-popularity decile",
    "agreement": "Teacher-student agreement: top-10 overlap with the teacher, per student",
}


def data_line(report: dict) -> str:
    d, e = report["dataset"], report["config"]["eval"]
    return (
        f"Data: {d['name']}: {d['users']} users, {d['items']} items, "
        f"{d['interactions']} interactions. Leave-one-out test split, full ranking over "
        f"every item, history excluded: {e['exclude_history']}. "
        "tail = targets outside the head items that make "
        f"{e['tail_share']:.0%} of training interactions."
    )


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The models table: its header and one row of cells per model."""
    header = [
        "model",
        "arch",
        "params",
        "KiB",
        *COLUMNS,
        "valid ndcg@10",
        "top-10 ms (b=1 / b=256)",
        "train s",
    ]
    rows = []
    for name, r in report["models"].items():
        test = r["metrics"]["test"]
        lat = r.get("cost", {}).get("latency_top10", {})
        lat_s = " / ".join(f"{v['p50_ms']:.2f}" for v in lat.values()) or "-"
        rows.append(
            [name, r["model"], f"{r['params']:,}", f"{r.get('param_bytes', 0) / 1024:.1f}"]
            + [f"{test[c]:.4f}" for c in COLUMNS]
            + [f"{r['metrics']['valid']['ndcg@10']:.4f}", lat_s, f"{r['train_seconds']:.1f}"]
        )
    return header, rows


COLD_SLICES = ("cold_users", "cold_items", "cold_users_valid", "cold_items_valid")
COLD_COLUMNS = ("hr@10", "ndcg@10", "tail_ndcg@10", "coverage@10")


def cold_table(report: dict) -> tuple[list[str], list[list[str]]] | None:
    """The cold-start slices (`cold_users`, `cold_items`) per model, where the split has them."""
    models = report["models"]
    slices = [s for s in COLD_SLICES if any(s in r["metrics"] for r in models.values())]
    if not slices:
        return None
    header = ["model"] + [f"{s} {c}" for s in slices for c in COLD_COLUMNS]
    rows = []
    for name, r in models.items():
        cells = [name]
        for s in slices:
            m = r["metrics"].get(s)
            cells += [f"{m[c]:.4f}" if m and c in m else "-" for c in COLD_COLUMNS]
        rows.append(cells)
    return header, rows


def _cold_line(report: dict) -> str:
    counts = report["dataset"].get("split_counts", {})
    parts = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("cold_users", "cold_item_users")]
    return (
        "Cold-start slices: users held out of training whole (cold_users) and users whose "
        "next item is one training never showed (cold_items)"
        + (
            f": {', '.join(parts)}."
            if all(k in counts for k in ("cold_users", "cold_item_users"))
            else "."
        )
    )


def _md_table(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * text_columns + "---:|" * (len(header) - text_columns))
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _html_table(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    parts = [
        "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header),
        "</tr></thead><tbody>",
    ]
    for r in rows:
        cells = [f"<td>{html.escape(c)}</td>" for c in r[:text_columns]]
        cells += [f'<td class="num">{html.escape(c)}</td>' for c in r[text_columns:]]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    return parts + ["</tbody></table>"]


def findings(report: dict) -> list[str]:
    """The paragraphs under the table: the distillation ratios and the agreement."""
    out = []
    t, kd, sc = (report["models"].get(k) for k in ("teacher", "student_kd", "student_scratch"))
    if t and kd and sc:
        tn, kn, sn = (r["metrics"]["test"]["ndcg@10"] for r in (t, kd, sc))
        out.append(
            f"Student/teacher parameters: {kd['params'] / t['params']:.3f}. "
            f"student_kd NDCG@10 = {kn / tn if tn else float('nan'):.2f} x teacher, "
            f"{kn / sn if sn else float('nan'):.2f} x student_scratch."
        )
    ens = report["models"].get("ensemble")
    if ens and t:
        out.append(
            f"The ensemble of {', '.join(ens['members'])}: NDCG@10 "
            f"{ens['metrics']['test']['ndcg@10']:.4f}, {ens['params'] / t['params']:.1f} x "
            "the teacher's parameters."
        )
    labels = report.get("soft_labels")
    if labels:
        out.append(
            f"Soft labels (the soft_labels stage): the teacher's top {labels['k']} items for "
            f"{labels['slots']:,} slots of {labels['windows']:,} windows, "
            f"{labels.get('bytes', 0) / 1e6:.1f} MB, written in {labels.get('seconds', 0):.1f} s."
        )
    agree = {
        n: r["agreement_with_teacher"]["test"]
        for n, r in report["models"].items()
        if "agreement_with_teacher" in r
    }
    method = report.get("config", {}).get("distill", {}).get("method", "soft")
    if agree:
        whom = "the teacher"
        if method == "ensemble":
            whom += " (student_kd and its variants: the ensemble; the others: the teacher stage)"
        out.append(
            f"Agreement with {whom} on the test inputs: "
            + "; ".join(
                f"{n}: top-10 overlap {a['top10_overlap']:.3f}, KL {a['kl']:.3f}"
                for n, a in agree.items()
            )
            + "."
        )
    return out


def _method_md(c: dict) -> str:
    if c["method"] == "pruned":
        sp = c.get("sparsity", {})
        table = "item table included" if c.get("item_table_pruned") else "item table kept"
        return (
            f"{sp.get('prunable', 0):.1%} of the {sp.get('prunable_weights', 0):,} prunable "
            f"weights are zero ({c.get('scope')} magnitude, {table})"
        )
    if c["method"] == "lowrank":
        svd = c["svd"]
        return f"item table at rank {svd['rank']} (the SVD keeps {svd['energy']:.1%} of its energy)"
    if c["method"] in ("int8", "int8_act"):
        return f"int8 weights; activations {c.get('activations')}"
    return f"int8 after quantization-aware fine-tuning; activations {c.get('activations')}"


def compression(report: dict) -> tuple[list[str], str | None]:
    """One line per compressed variant, and the exported artefact's paragraph."""
    lines = []
    for name, r in report["models"].items():
        c = r.get("compression")
        if not c:
            continue
        what = _method_md(c)
        trained = c["method"] not in ("int8", "int8_act") and c["finetune_steps"]
        tuning = f"{c['finetune_steps']} fine-tuning steps" if trained else "no fine-tuning"
        lines.append(f"{name}: {what}; {tuning}; {c['bytes_vs_source']:.2f} x the source's bytes.")
    e = report.get("export")
    if not e:
        return lines, None
    lat = "; ".join(
        f"{b.replace('_', ' ')}: {v['artifact']['p50_ms']:.2f} ms against "
        f"{v['in_process']['p50_ms']:.2f} ms in process ({v['ratio_p50']:.2f} x)"
        for b, v in e["latency_top_k"].items()
    )
    s = e["same_top_k"]
    return lines, (
        f"Exported {e['model']} to {e['directory']} "
        f"({e['bytes_on_disk']['total']:,} bytes): the "
        f"same ranked top-k as in process for {s['identical_share']:.1%} of "
        f"{s['users']:,} test users (same set {s['same_set_share']:.1%}). Top-k p50 latency, "
        f"{lat}. Serve it with `python -m distill_jax.recommend --artifact={e['directory']} "
        "--history=ID,ID,...`."
    )


def markdown(report: dict) -> str:
    """report.md: the table, the findings, the compressed variants and the artefact."""
    header, rows = table(report)
    lines = ["# distill_jax report", "", data_line(report), ""]
    lines += _md_table(header, rows, 2)
    cold = cold_table(report)
    if cold:
        lines += ["", _cold_line(report), ""] + _md_table(*cold, 1)
    for paragraph in findings(report):
        lines += ["", paragraph]
    variants, export = compression(report)
    if variants:
        lines += ["", "Compressed variants (each evaluated like the models above):", ""]
        lines += [f"- {v}" for v in variants]
    if export:
        lines += ["", export]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222;
  padding: 0 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:hover td { background: #fafafa; } code { background: #f3f3f3; padding: 0 0.2em; }
figure { margin: 1.5em 0; } figcaption { font-weight: 600; margin-bottom: 0.4em; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def to_html(report: dict, images: dict[str, str]) -> str:
    """report.html: what report.md says, plus the figures embedded as base64 PNG data."""
    header, rows = table(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>distill_jax report: {html.escape(report['dataset']['name'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>distill_jax report</h1>",
        f"<p>{_inline(data_line(report))}</p>",
        *_html_table(header, rows, 2),
    ]
    cold = cold_table(report)
    if cold:
        parts += [f"<p>{_inline(_cold_line(report))}</p>", *_html_table(*cold, 1)]
    parts += [f"<p>{_inline(p)}</p>" for p in findings(report)]
    for name, path in images.items():
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(
            f"<figure><figcaption>{html.escape(FIGURE_TITLES.get(name, name))}</figcaption>"
            f'<img alt="{name}" src="data:image/png;base64,{data}"></figure>'
        )
    variants, export = compression(report)
    if variants:
        parts.append("<h2>Compressed variants</h2><ul>")
        parts += [f"<li>{_inline(v)}</li>" for v in variants]
        parts.append("</ul>")
    if export:
        parts += ["<h2>Exported artefact</h2>", f"<p>{_inline(export)}</p>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(report: dict, workdir: str) -> dict[str, str]:
    """Writes report.md, the figures (WORKDIR/plots/) and report.html; returns name -> path."""
    md_path = os.path.join(workdir, "report.md")
    with open(md_path, "w") as f:
        f.write(markdown(report))
    images = plots.write_all([report], os.path.join(workdir, "plots"))
    html_path = os.path.join(workdir, "report.html")
    with open(html_path, "w") as f:
        f.write(to_html(report, images))
    return {"report.md": md_path, "report.html": html_path, **images}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m distill_jax.evaluation.report WORKDIR", file=sys.stderr)
        return 2
    path = os.path.join(argv[1], "report.json")
    if not os.path.exists(path):
        print(f"{path}: no such file; the main job's 'report' stage writes it.", file=sys.stderr)
        return 2
    with open(path) as f:
        report = json.load(f)
    for name, p in write(report, argv[1]).items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
