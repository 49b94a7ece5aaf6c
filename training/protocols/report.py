"""Reports: Markdown + JSON + plots from finished protocol units, papers' numbers beside ours.

Averages follow the papers: seeds are averaged per dataset; the base-to-novel "average" row is
the mean base, the mean novel and the harmonic mean of those two means.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .plots import render_plots
from .splits import harmonic_mean


def _ms(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: Optional[float] = None) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std else "")


def load_results(out_dir: str | Path) -> list[dict]:
    rows = []
    for p in sorted(Path(out_dir).glob("runs/*/*.json")):
        if p.name != "recipe.json":
            rows.append(json.loads(p.read_text()))
    return rows


def load_recipes(out_dir: str | Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in Path(out_dir).glob("runs/*/recipe.json")}


def summarize(rows: Iterable[dict]) -> dict:
    """{protocol: {method: summary}} with per-dataset means/stds over seeds."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["protocol"]][r["method"]].append(r)
    out: dict = {}
    for protocol, methods in by.items():
        out[protocol] = {m: _SUMMARIZERS[protocol](rs) for m, rs in methods.items()}
    return out


def _params_time(rs: list[dict]) -> dict:
    return {"trainable_parameters": rs[0].get("trainable_parameters"),
            "train_time_s": statistics.fmean(r.get("train_time_s", 0.0) for r in rs), "seeds": len({r["seed"] for r in rs})}


def _sum_b2n(rs: list[dict]) -> dict:
    per = defaultdict(list)
    for r in rs:
        per[r["dataset"]].append(r)
    datasets = {}
    for d, xs in per.items():
        b, n = _ms(x["base"] for x in xs), _ms(x["novel"] for x in xs)
        datasets[d] = {"base": b, "novel": n, "hm": harmonic_mean(b[0], n[0]), "hm_std": _ms(x["hm"] for x in xs)[1]}
    mb = statistics.fmean(v["base"][0] for v in datasets.values())
    mn = statistics.fmean(v["novel"][0] for v in datasets.values())
    return {"datasets": datasets, "average": {"base": mb, "novel": mn, "hm": harmonic_mean(mb, mn)}, **_params_time(rs)}


def _sum_few(rs: list[dict]) -> dict:
    per = defaultdict(list)
    for r in rs:
        per[(r["dataset"], r["shots"])].append(r["top1"])
    return {"cells": {f"{d}|{k}": _ms(v) for (d, k), v in per.items()}, **_params_time(rs)}


def _sum_transfer(rs: list[dict]) -> dict:
    targets = defaultdict(list)
    for r in rs:
        for t, v in r["targets"].items():
            targets[t].append(v)
    return {"source": _ms(r["source_top1"] for r in rs), "targets": {t: _ms(v) for t, v in targets.items()},
            "mean_targets": _ms(r["mean_targets"] for r in rs), **_params_time(rs)}


def _sum_mt(rs: list[dict]) -> dict:
    tasks = defaultdict(list)
    for r in rs:
        for t, v in r["per_task"].items():
            tasks[t].append(v)
    out = {"per_task": {t: _ms(v) for t, v in tasks.items()}, "mean": _ms(r["mean"] for r in rs), **_params_time(rs)}
    groupings = [r["grouping"] for r in rs if r.get("grouping")]
    if groupings:
        out["grouping"] = groupings[0]
    return out


_SUMMARIZERS = {"base_to_novel": _sum_b2n, "few_shot": _sum_few, "cross_dataset": _sum_transfer,
                "domain_generalization": _sum_transfer, "multi_task": _sum_mt}


# ---- rendering -----------------------------------------------------------------------------
def _paper(recipes: dict, method: str, protocol: str) -> dict:
    for r in recipes.values():
        if r["method"] == method and r["protocol"] == protocol and r.get("papers"):
            return r["papers"]
    return {}


def render_markdown(summary: dict, recipes: dict, commands: Sequence[str], title: str) -> str:
    L = [f"# {title}", ""]
    if "base_to_novel" in summary:
        L += ["## Base-to-novel (ours; seeds averaged; average row = HM of mean base and mean novel)", "",
              "| method | base | novel | HM | paper base / novel / HM | trainable | train s/seed |", "|---|---|---|---|---|---|---|"]
        for m, s in sorted(summary["base_to_novel"].items(), key=lambda kv: -kv[1]["average"]["hm"]):
            a, p = s["average"], _paper(recipes, m, "base_to_novel")
            ps = " / ".join(f"{p[k]:.2f}" for k in ("base", "novel", "hm")) if {"base", "novel", "hm"} <= set(p) else "–"
            L.append(f"| {m} | {_fmt(a['base'])} | {_fmt(a['novel'])} | {_fmt(a['hm'])} | {ps} | {s['trainable_parameters']:,} | {s['train_time_s']:.1f} |")
        L += [""]
        first = next(iter(summary["base_to_novel"].values()))
        if len(first["datasets"]) > 1:
            L += ["Per dataset (base / novel / HM, mean ± std over seeds):", ""]
            for m, s in summary["base_to_novel"].items():
                for d, v in s["datasets"].items():
                    L.append(f"- {m} on {d}: {_fmt(*v['base'])} / {_fmt(*v['novel'])} / {_fmt(v['hm'], v['hm_std'])}")
            L += [""]
    if "few_shot" in summary:
        L += ["## Few-shot (top-1 on the full test split)", "", "| method | dataset | shots | top-1 | trainable | train s/seed |", "|---|---|---|---|---|---|"]
        for m, s in sorted(summary["few_shot"].items()):
            for cell, (mean, std) in sorted(s["cells"].items()):
                d, k = cell.split("|")
                L.append(f"| {m} | {d} | {k} | {_fmt(mean, std)} | {s['trainable_parameters']:,} | {s['train_time_s']:.1f} |")
        L += [""]
    for proto in ("cross_dataset", "domain_generalization"):
        if proto in summary:
            L += [f"## {proto.replace('_', ' ').title()}", "", "| method | source | targets | mean of targets | paper mean |", "|---|---|---|---|---|"]
            for m, s in sorted(summary[proto].items()):
                t = ", ".join(f"{k} {_fmt(*v)}" for k, v in s["targets"].items())
                p = _paper(recipes, m, proto).get("mean_targets")
                L.append(f"| {m} | {_fmt(*s['source'])} | {t} | {_fmt(*s['mean_targets'])} | {p if p is not None else '–'} |")
            L += [""]
    if "multi_task" in summary:
        tasks = sorted({t for s in summary["multi_task"].values() for t in s["per_task"]})
        L += ["## Multi-task (one head, each domain a task)", "",
              "| method | " + " | ".join(tasks) + " | mean | trainable | train s/seed |", "|" + "---|" * (len(tasks) + 4)]
        for m, s in sorted(summary["multi_task"].items(), key=lambda kv: -kv[1]["mean"][0]):
            cells = " | ".join(_fmt(*s["per_task"][t]) if t in s["per_task"] else "–" for t in tasks)
            L.append(f"| {m} | {cells} | {_fmt(*s['mean'])} | {s['trainable_parameters']:,} | {s['train_time_s']:.1f} |")
        for m, s in summary["multi_task"].items():
            if s.get("grouping"):
                L += ["", f"{m} task grouping (gradient-driven): {s['grouping']['groups']}"]
        L += [""]
    L += ["## Reproduce", "", "```"] + list(commands) + ["```", ""]
    return "\n".join(L)


COMMANDS_FILE = "commands.txt"


def record_command(out_dir: str | Path, command: str) -> list[str]:
    """Remember the commands that filled `out_dir` (one per line, first use kept), so a report
    re-rendered later still says how to reproduce it; returns them all."""
    path = Path(out_dir) / COMMANDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    known = path.read_text().splitlines() if path.exists() else []
    if command not in known:
        known.append(command)
        path.write_text("\n".join(known) + "\n")
    return known


def write_report(out_dir: str | Path, commands: Sequence[str] = (), title: str = "clipheads protocol report") -> Path:
    out_dir = Path(out_dir)
    if not commands and (out_dir / COMMANDS_FILE).exists():
        commands = (out_dir / COMMANDS_FILE).read_text().splitlines()
    rows = load_results(out_dir)
    summary = summarize(rows)
    recipes = load_recipes(out_dir)
    (out_dir / "report.json").write_text(json.dumps({"summary": summary, "recipes": recipes, "commands": list(commands)}, indent=2))
    md = render_markdown(summary, recipes, commands, title)
    plots = render_plots(rows, out_dir)
    md += "".join(f"\n![{p}]({p})\n" for p in plots)
    (out_dir / "report.md").write_text(md)
    return out_dir / "report.md"
