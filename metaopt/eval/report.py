"""Writes an evaluation's results: ``report.md``, ``runs.csv`` and ``plots/*.png``."""

from __future__ import annotations

import csv
import math
import pathlib
import re
import statistics
from typing import Any, Sequence

import numpy as np

from metaopt.eval import metrics
from metaopt.eval import summary
from metaopt.eval import sweep

CSV_COLUMNS = ("task", "task_config", "width", "optimizer", "kind", "source", "schedule",
               "lr", "seed", "stage", "num_steps", "initial_loss", "final_loss",
               "diverged", "test_loss", "test_accuracy", "ms_per_step", "compile_s")
REFERENCE = "adamw"  # speedups are measured against the tuned AdamW

DEFINITIONS = f"""\
- **Final loss**: mean training loss over the last {metrics.TAIL_FRACTION:.0%} of the
  steps of a run (Schedule-Free at its averaged point x), then mean ± std over the
  seeds that did not diverge.
- **Diverged**: a NaN/inf loss at any step, or a final loss above the loss at the first
  step. Diverged runs are counted (column *div*), never averaged into the loss; a
  setting with a diverged seed ranks after every setting without one, and counts as
  diverged when compared.
- **Tuned baselines**: learning rate on a log grid crossed with the schedules
  (constant; linear warmup + cosine decay to 0), the same step budget as the LO. Every
  setting runs on the tuning seeds, the best finalists on the remaining seeds; the
  reported setting is the finalist with the lowest loss over all seeds. *Untuned*
  baselines run once per seed at their defaults; the LO runs untuned (multiplier 1).
- **Beats / tie / loses**: the LO's final loss against the baseline's reported setting;
  a tie is a relative difference within {metrics.TIE_TOLERANCE:.0%}.
- **Speedup** (vs tuned AdamW): steps / (first step at which the LO's seed-mean loss,
  averaged over a trailing window of {metrics.TAIL_FRACTION:.0%} of the steps, reaches
  AdamW's final loss); if it never does, (step at which AdamW's curve reaches the LO's
  final loss) / steps, < 1.
- **Rank**: per task, by final loss among all optimizers (diverged last, ties share);
  averaged over tasks.
- **ms/step**: wall time of a vmapped batch of runs / (steps x runs in the batch), so
  an amortized per-run cost; tests metrics are on the task's fixed evaluation batch.
"""


def write_csv(path: pathlib.Path, records: Sequence[dict]) -> None:
  """One row per run: (task, optimizer, schedule, lr, seed) and its metrics."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in records:
      writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _fmt(x: float, spec: str = ".4g") -> str:
  return "—" if x is None or not np.isfinite(x) else format(x, spec)


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _learned(chosen) -> list[str]:
  return list(dict.fromkeys(o for (_, o), s in chosen.items() if s.kind == "learned"))


def _baselines(chosen) -> list[str]:
  return list(dict.fromkeys(o for (_, o), s in chosen.items() if s.kind != "learned"))


def _grids(stats: Sequence[summary.SettingStats]) -> dict[tuple[str, str], list[float]]:
  grids = {}
  for s in stats:
    grids.setdefault((s.task, s.optimizer), set()).add(s.lr)
  return {k: sorted(v) for k, v in grids.items()}


def summary_lines(chosen, tasks: Sequence[str]) -> list[str]:
  """Markdown: wins/ties/losses of each learned optimizer, median speedup, ranks."""
  lines = ["| learned | vs baseline | wins | ties | losses |", "|---|---|---|---|---|"]
  for lo in _learned(chosen):
    for base in _baselines(chosen):
      counts = list(summary.outcomes(chosen, lo, base).values())
      lines.append(f"| {lo} | {base} | {counts.count('win')} | {counts.count('tie')} | "
                   f"{counts.count('loss')} |")
  lines.append("")
  if any(o == REFERENCE for _, o in chosen):
    for lo in _learned(chosen):
      speedups = [summary.speedup(chosen, t, lo, REFERENCE) for t in tasks]
      finite = [s for s in speedups if np.isfinite(s)]
      median = statistics.median(finite) if finite else math.nan
      lines.append(f"Median speedup of **{lo}** vs tuned {REFERENCE}: **{_fmt(median, '.2f')}x** "
                   f"over {len(finite)} of {len(tasks)} tasks.")
    lines.append("")
  ranks = summary.average_ranks(chosen)
  div = {}
  ms = {}
  for (_, o), s in chosen.items():
    div[o] = div.get(o, 0) + (s.diverged > 0)
    ms.setdefault(o, []).append(s.ms_per_step)
  lines += ["| optimizer | average rank | tasks diverged | median ms/step |",
            "|---|---|---|---|"]
  lines += [f"| {o} | {r:.2f} | {div[o]} | {_fmt(statistics.median(ms[o]), '.3f')} |"
            for o, r in ranks.items()]
  return lines


def task_lines(task: str, chosen, grids) -> list[str]:
  """Markdown table of one task: each optimizer's reported setting."""
  rows = [(o, s) for (t, o), s in chosen.items() if t == task]
  rows.sort(key=lambda r: (summary.reported_loss(r[1]) if np.isfinite(
      summary.reported_loss(r[1])) else math.inf))
  any_s = rows[0][1]
  lines = [f"### {task}", "", f"{any_s.num_steps} steps.", "",
           "| optimizer | kind | schedule | lr | final loss | div | test loss | "
           "test acc | ms/step |", "|---|---|---|---|---|---|---|---|---|"]
  for o, s in rows:
    edge = " †" if s.kind != "untuned" and sweep.on_grid_edge(s.lr, grids[(task, o)]) else ""
    loss = f"{_fmt(s.final_mean)} ± {_fmt(s.final_std, '.2g')}"
    lines.append(f"| {o} | {s.kind} | {s.schedule} | {s.lr:.4g}{edge} | {loss} | "
                 f"{s.diverged}/{s.seeds} | {_fmt(s.test_loss)} | "
                 f"{_fmt(s.test_accuracy, '.3f')} | {_fmt(s.ms_per_step, '.3f')} |")
  if (task, REFERENCE) in chosen:
    for lo in _learned(chosen):
      if (task, lo) in chosen:
        lines.append(f"\n{lo} vs tuned {REFERENCE}: speedup "
                     f"{_fmt(summary.speedup(chosen, task, lo, REFERENCE), '.2f')}x.")
  return lines + [""]


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt
  except ImportError:
    return None


def _colors(chosen) -> dict[str, str]:
  """One color per optimizer across every plot (the LO black)."""
  names = [o for o in dict.fromkeys(o for _, o in chosen) if o != "lo"]
  return {"lo": "black", **{o: f"C{i % 10}" for i, o in enumerate(names)}}


def plot_curves(plt, path: pathlib.Path, task: str, chosen) -> None:
  """Seed-mean training loss of each optimizer's reported setting (log scale)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = _colors(chosen)
  positive = True
  for (t, o), s in chosen.items():
    if t != task:
      continue
    curve = np.asarray(s.curve)
    positive &= bool(np.all(curve[np.isfinite(curve)] > 0))
    ax.plot(s.curve_steps, curve, label=o, lw=2.5 if s.kind == "learned" else 1.2,
            color=colors[o])
  if positive:
    ax.set_yscale("log")
  ax.set(xlabel="step", ylabel="training loss", title=task)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_ranks(plt, path: pathlib.Path, ranks: dict[str, float]) -> None:
  fig, ax = plt.subplots(figsize=(6, 0.35 * len(ranks) + 1))
  names = list(ranks)[::-1]
  ax.barh(names, [ranks[n] for n in names], color=["black" if n == "lo" else "gray"
                                                   for n in names])
  ax.set(xlabel="average rank over tasks (1 = best)", title="rank summary")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_widths(plt, path: pathlib.Path, chosen, widths: dict[str, int]) -> None:
  """Final loss and chosen learning rate of each optimizer against width."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  colors = _colors(chosen)
  for o in dict.fromkeys(o for _, o in chosen):
    pts = sorted((widths[t], s) for (t, oo), s in chosen.items() if oo == o and t in widths)
    if not pts:
      continue
    a1.plot([w for w, _ in pts], [summary.reported_loss(s) for _, s in pts], "o-", label=o,
            color=colors[o])
    if pts[0][1].kind == "tuned":
      a2.plot([w for w, _ in pts], [s.lr for _, s in pts], "o-", label=o, color=colors[o])
  ticks = sorted(set(widths.values()))
  for ax, ylabel, title in ((a1, "final training loss", "width scaling"),
                            (a2, "chosen learning rate", "tuned learning rate")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [str(w) for w in ticks])
    ax.set(xlabel="width", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(out_dir: str | pathlib.Path, records: Sequence[dict], *,
                 header: dict[str, Any], skipped: Sequence[str] = ()) -> dict[str, Any]:
  """Writes report.md, runs.csv and plots/; returns their paths."""
  out = pathlib.Path(out_dir)
  (out / "plots").mkdir(parents=True, exist_ok=True)
  write_csv(out / "runs.csv", records)
  stats = summary.setting_stats(records)
  chosen = summary.chosen_settings(stats)
  tasks = list(dict.fromkeys(r["task"] for r in records))
  widths = {r["task"]: r["width"] for r in records if r.get("width")}
  plt = _pyplot()
  plots = []
  if plt is not None:
    for t in tasks:
      plots.append(out / "plots" / f"curves_{_slug(t)}.png")
      plot_curves(plt, plots[-1], t, chosen)
    plots.append(out / "plots" / "ranks.png")
    plot_ranks(plt, plots[-1], summary.average_ranks(chosen))
    if widths:
      plots.append(out / "plots" / "widths.png")
      plot_widths(plt, plots[-1], chosen, widths)
  lines = [f"# metaopt evaluation: suite `{header.get('suite')}`", ""]
  lines += [f"- {k}: {v}" for k, v in header.items()]
  lines += ["", "## Summary", ""] + summary_lines(chosen, tasks)
  if plt is not None:
    lines += ["", "![rank summary](plots/ranks.png)", ""]
    if widths:
      lines += ["![width scaling](plots/widths.png)", ""]
  else:
    lines += ["", "(plots skipped: matplotlib is not installed)", ""]
  lines += ["## Per task", "", "†: the chosen learning rate is at the edge of its grid.", ""]
  grids = _grids(stats)
  for t in tasks:
    lines += task_lines(t, chosen, grids)
    if plt is not None:
      lines += [f"![{t}](plots/curves_{_slug(t)}.png)", ""]
  if skipped:
    lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
  lines += ["## Definitions", "", DEFINITIONS]
  (out / "report.md").write_text("\n".join(lines))
  return {"report": out / "report.md", "csv": out / "runs.csv", "plots": plots}
