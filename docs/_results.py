"""The numbers of the Reproducing page, read from the runs in docs/results/.

``docs/reproducing.md`` (executed at every docs build) and ``tests/test_readme.py``
use these helpers: a run directory, markdown tables of mean ± std over seeds,
per-seed paired differences and the rule that decides whether a claim held.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"
# Metrics where the lower value is favoured; for the others, the higher.
LOWER_IS_BETTER = ("Tr H", "lambda_max", "test error", "relative test error")
TASK_COLUMNS = ("test accuracy %", "train loss", "Tr H", "lambda_max", "logits RMS")
HALF = " (equal gradients)"  # SAM at half its steps: accuracies and loss only
CHANCE = 20.0  # test accuracy % below which a run is near chance (10 classes)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of examples/reproduce_paper.py: its results.json and run.json."""

    results: dict  # experiment -> method -> metric -> value
    info: dict  # command, date, machine, versions, seconds
    settings: dict  # experiment -> its settings, from the headings of results.md


def load(name: str, root: pathlib.Path = RESULTS) -> Run:
    directory = root / name
    headings = re.findall(
        r"^## (\S+) \((.*), [\d.]+ s\)$",
        (directory / "results.md").read_text(),
        flags=re.MULTILINE,
    )
    return Run(
        json.loads((directory / "results.json").read_text()),
        json.loads((directory / "run.json").read_text()),
        {name: re.sub(r", loss \w+", "", text) for name, text in headings},
    )


def fmt(value: float) -> str:
    """A table cell: 3 significant digits, whole numbers from 100 to 1e5."""
    value = float(value)
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.2e}"  # also nan and inf


def mean_std(row: dict, metric: str) -> str:
    return f"{fmt(row[metric])} ± {fmt(row[metric + ' std'])}"


def table(header, rows) -> str:
    lines = [list(header), ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def metrics(row: dict) -> list[str]:
    """A results.json row's metrics, in order: no std, seeds, grid or layers."""
    skip = r" std$| per seed$|^(sigma|rho)$|\((sigma|rho)=|^Tr H ."  # "Tr H <layer>"
    skip += r"|^gradient evaluations$"
    return [k for k in row if not re.search(skip, k)]


def toy_table(experiment: dict, reference: dict) -> str:
    names = metrics(next(iter(experiment.values())))
    rows = [
        [method, *(mean_std(row, m) for m in names), reference.get(method, "-")]
        for method, row in experiment.items()
    ]
    return table(["method", *names, "reference"], rows)


def chosen(row: dict) -> str:
    """The grid point a method chose on validation: "0.03", "rho 0.05" or "-"."""
    if row.get("rho"):
        return f"rho {fmt(row['rho'])}"
    return fmt(row["sigma"]) if row.get("sigma") else "-"


def task_rows(experiment: dict, suffix: str = "") -> list[list[str]]:
    rows = []
    for method, row in experiment.items():
        if method.endswith(HALF):
            continue  # in budget_rows
        cells = [mean_std(row, m) for m in TASK_COLUMNS]
        cells[2] += f" ({fmt(row['Tr H s.e.'])})"
        rows.append([method + suffix, chosen(row), *cells])
    return rows


def budget_rows(experiment: dict, suffix: str = "") -> list[list[str]]:
    """Each method's gradient evaluations and test accuracy, SAM's halfway too."""
    rows = []
    for method, row in experiment.items():
        if method.endswith(HALF):
            evaluations = experiment[method.removesuffix(HALF)]["gradient evaluations"]
            evaluations //= 2
        elif "gradient evaluations" in row:
            evaluations = row["gradient evaluations"]
        else:
            continue  # the sharp start's starting point
        accuracy = mean_std(row, "test accuracy %")
        rows.append([method + suffix, f"{evaluations:,}", accuracy])
    return rows


BUDGET_HEADER = ("method", "gradient evaluations per run", "test accuracy %")


def layers(row: dict) -> list[str]:
    """The layers of a row's ``"Tr H <layer>"`` metrics (block traces), in order."""
    found = (re.fullmatch(r"Tr H (\w+)", k) for k in row)
    return [m[1] for m in found if m and m[1] != "std"]


def layer_rows(experiment: dict, suffix: str = "") -> list[list[str]]:
    """Per method, each layer's ``Tr H`` (mean ± std) and its share of the whole."""
    rows = []
    for method, row in experiment.items():
        if method.endswith(HALF):
            continue  # no Hessian at the halfway point
        total = sum(row[f"Tr H {layer}"] for layer in layers(row))
        rows.append(
            [method + suffix]
            + [
                f"{mean_std(row, f'Tr H {layer}')} "
                f"({100 * row[f'Tr H {layer}'] / total:.0f}%)"
                for layer in layers(row)
            ]
        )
    return rows


def layer_comparison(experiment: dict, a: str, b: str) -> str:
    """Where a's ``Tr H`` is below b's, layer by layer, with the seeds agreeing."""
    parts = []
    for layer in layers(experiment[a]):
        diff = paired(experiment, a, b, f"Tr H {layer}")
        lower, _ = diff.favour
        word = "below" if diff.mean < 0 else "above"
        parts.append(f"{layer} {word} ({lower} of {len(diff.diff)} seeds lower)")
    return f"{short(a)}'s `Tr H` against {short(b)}'s, by layer: " + ", ".join(parts)


TASK_HEADER = ("method", "sigma (SAM: rho)", *TASK_COLUMNS[:2], "Tr H (s.e.)")
TASK_HEADER += TASK_COLUMNS[3:]


def sigma_grid(row: dict) -> str:
    """Mean test accuracy at every grid point: "91.6% at sigma 0.01, 8.9% at 0.1"."""
    cells = []
    for key, value in row.items():
        point = re.fullmatch(r"test accuracy % \((sigma|rho)=(.*)\)", key)
        if point:
            chance = " (near chance)" if not value >= CHANCE else ""
            at = f"at {point[1]}" if not cells else "at"
            cells.append(f"{fmt(value)}% {at} {point[2]}{chance}")
    return ", ".join(cells)


def rounded(value: float, digits: int) -> str:
    text = f"{abs(value):.{digits}f}"
    return text if float(text) == 0 else ("+" if value > 0 else "-") + text


@dataclasses.dataclass(frozen=True)
class Paired:
    """The per-seed differences a - b of one metric."""

    metric: str
    diff: np.ndarray

    @property
    def sign(self) -> int:  # +1: a higher value is favoured
        lower = self.metric in LOWER_IS_BETTER or self.metric.startswith("Tr H ")
        return -1 if lower else 1

    @property
    def mean(self) -> float:
        return float(self.diff.mean())

    @property
    def std(self) -> float:
        return float(self.diff.std())

    @property
    def favour(self) -> tuple[int, int]:
        """The number of seeds favouring a, and b (ties: neither)."""
        favoured = self.sign * self.diff
        return int(np.sum(favoured > 0)), int(np.sum(favoured < 0))

    @property
    def status(self) -> str:
        """The rule: "held" when at least 4 of 5 seeds favour a and |mean| > std."""
        favoured, enough = self.sign * self.mean, self.favour[0] >= 0.8 * len(self.diff)
        if favoured > self.std:
            return "held" if enough else "few"
        return "spread" if favoured > 0 else "reversed"

    def cell(self) -> str:
        sign = "+" if self.mean > 0 else ""
        a, b = self.favour
        return f"{sign}{fmt(self.mean)} ± {fmt(self.std)} ({a}/{b})"

    def text(self) -> str:
        """For prose, 2 significant digits: "+2.1 ± 0.3 points, 5 of 5 seeds"."""
        scale = max(abs(self.mean), self.std, 1e-12)
        digits = max(0, 1 - math.floor(math.log10(scale)))
        while digits < 4 and f"{abs(self.mean):.{digits}f}" == f"{self.std:.{digits}f}":
            digits += 1  # where rounding would hide which of the two is the larger
        unit = " points" if "accuracy" in self.metric else ""
        return (
            f"{rounded(self.mean, digits)} ± {self.std:.{digits}f}{unit}, "
            f"{self.favour[0]} of {len(self.diff)} seeds"
        )


def paired(experiment: dict, a: str, b: str, metric: str) -> Paired:
    diff = np.subtract(
        experiment[a][f"{metric} per seed"], experiment[b][f"{metric} per seed"]
    )
    return Paired(metric, np.asarray(diff, np.float64))


def short(method: str) -> str:
    """A method's name without its note: "start (GD converged)" -> "start"."""
    return method.split(" (")[0]


def paired_rows(experiment: dict, comparisons, suffix: str = "") -> list[list[str]]:
    """``a - b`` per metric; "-" where b has no such metric (SAM halfway)."""
    rows = []
    for a, b in comparisons:
        label = f"{short(a)} - {b if b.endswith(HALF) else short(b)}{suffix}"
        cells = [
            paired(experiment, a, b, m).cell()
            if f"{m} per seed" in experiment[b]
            else "-"
            for m in ("test accuracy %", "Tr H", "lambda_max")
        ]
        rows.append([label, *cells])
    return rows


PAIRED_HEADER = ("a - b, paired by seed", "test accuracy %", "Tr H", "lambda_max")
FAILED = {
    "few": "went the claimed way on only {k} of {n} seeds",
    "spread": "went the claimed way but stayed inside the seed spread",
    "reversed": "went the other way",
}


def verdict(loss: str, parts: list[tuple[str, Paired]], against: str = "") -> str:
    """A claim's verdict: held if every part held, with each part's numbers.

    ``against`` names the comparison, for claims made against several methods
    (each gets its own verdict).
    """
    held = all(p.status == "held" for _, p in parts)
    numbers = "; ".join(f"{label} {p.text()}" for label, p in parts)
    claim = f"against {against} the claim" if against else "the claim"
    text = f"With {loss}, {claim} **{'held' if held else 'did not hold'}**: {numbers}."
    failed = "; ".join(
        f"{label} " + FAILED[p.status].format(k=p.favour[0], n=len(p.diff))
        for label, p in parts
        if p.status != "held"
    )
    if failed:
        text += f" {failed[0].upper()}{failed[1:]}."
    return text


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{seconds:.0f} s" + (f" ({minutes} min {rest} s)" if minutes else "")
