"""Summaries and figures of a lorakit.experiments results file: mean and spread over seeds, per grid row.

    from lorakit.experiments_report import load, summary, markdown_table
    results = load()                        # data/experiments/grid.json
    rows = summary(results)                 # name -> Row (mean, std, min, max over seeds of each measurement)
    print(markdown_table(rows, ["r1", "r8", "full-lr1e-03"]))
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lorakit.experiments import OUT


def load(path: str | Path = OUT) -> dict:
    return json.loads(Path(path).read_text())


@dataclass
class Spread:
    """A measurement over seeds: its values (in seed order), mean, sample standard deviation, min and max."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def pct(self) -> str:
        """'92.3% ± 1.5 (91–94)': mean ± standard deviation in points, and the range over seeds."""
        return f"{100 * self.mean:.1f}% ± {100 * self.std:.1f} ({100 * self.lo:.0f}–{100 * self.hi:.0f})"


@dataclass
class Row:
    name: str
    setting: dict
    accuracy: Spread
    skills: Spread       # the base's nine skills after training, all 400 questions
    forgetting: Spread   # base skills minus skills after training, in accuracy points (0.0-1.0)
    seconds: Spread
    trainable: int
    peak_mib: float
    seeds: list[int]


def summary(results: dict) -> dict[str, Row]:
    """name -> Row, in grid order; each measurement over that row's seeds."""
    runs = defaultdict(list)
    for run in sorted(results["runs"], key=lambda r: r["seed"]):
        runs[run["name"]].append(run)
    base = results["base_skills"]["all"]
    rows = {}
    for setting in results["grid"]:
        group = runs[setting["name"]]
        if not group:
            continue
        rows[setting["name"]] = Row(
            setting["name"], setting, Spread([r["accuracy"] for r in group]),
            Spread([r["skills"]["all"] for r in group]), Spread([base - r["skills"]["all"] for r in group]),
            Spread([r["train_seconds"] for r in group]), group[0]["trainable_params"],
            group[0]["peak_step_bytes"] / 2**20, [r["seed"] for r in group])
    return rows


def describe(setting: dict) -> str:
    """A short human label: 'LoRA r=8 α=16 q,v lr 3e-3', 'full FT lr 1e-3', 'QLoRA ... all linear'."""
    targets = {2: "q,v", 4: "attention", 7: "all linear"}[len(setting["targets"])]
    method = {"lora": "DoRA" if setting["dora"] else "LoRA", "qlora": "QLoRA", "full": "full FT"}[setting["method"]]
    lr = f"lr {setting['lr']:.0e}".replace("e-0", "e-")
    if setting["method"] == "full":
        return f"{method} {lr}"
    alpha = f"α={setting['alpha']:g}" + ("/√r (rsLoRA)" if setting["rslora"] else "")
    return f"{method} r={setting['r']} {alpha} {targets} {lr}"


def markdown_table(rows: dict[str, Row], names: list[str] | None = None, seconds: bool = False) -> str:
    """The headline table: accuracy and skills kept (mean ± std, range over seeds), parameters, memory; with
    seconds=True also the mean training seconds (machine-dependent: not for a notebook's compared outputs)."""
    lines = ["| setting | held-out exact match | base skills kept (base 74.2%) | trainable params | peak step MiB |"
             + " train s |" * seconds, "|---|---|---|---|---|" + "---|" * seconds]
    for name in names or list(rows):
        row = rows[name]
        lines.append(f"| {describe(row.setting)} | {row.accuracy.pct()} | {row.skills.pct()} | {row.trainable:,} "
                     f"| {row.peak_mib:.1f} |" + f" {row.seconds.mean:.0f} |" * seconds)
    return "\n".join(lines)


def errorbar(ax, xs, spreads: list[Spread], label: str | None = None, **kwargs) -> None:
    """Mean with a bar spanning min..max over seeds, and every seed's value as a faint dot."""
    means = [100 * s.mean for s in spreads]
    lower = [100 * (s.mean - s.lo) for s in spreads]
    upper = [100 * (s.hi - s.mean) for s in spreads]
    line = ax.errorbar(xs, means, yerr=[lower, upper], capsize=3, marker="o", label=label, **kwargs)
    for x, s in zip(xs, spreads, strict=True):
        ax.scatter([x] * len(s.values), [100 * v for v in s.values], s=8, alpha=0.4, color=line[0].get_color())


RESULT_KEYS = ("accuracy", "skills", "train_loss", "trainable_params", "peak_step_bytes")  # not the seconds


def differences(committed: dict, again: dict) -> list[str]:
    """'name seed key: committed -> again' for every run of `again` whose results differ from the committed run's;
    [] when all of them reproduce (timings are not compared)."""
    stored = {(r["name"], r["seed"]): r for r in committed["runs"]}
    lines = []
    for run in again["runs"]:
        old = stored.get((run["name"], run["seed"]))
        if old is None:
            lines.append(f"{run['name']} seed {run['seed']}: not in the committed results")
            continue
        lines += [f"{run['name']} seed {run['seed']} {key}: {old[key]} -> {run[key]}" for key in RESULT_KEYS
                  if old[key] != run[key]]
    return lines
