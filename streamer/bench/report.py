"""Benchmark figures and how they are printed: value, machine limit, baseline, goal."""

from __future__ import annotations

import json

import msgspec


class Figure(msgspec.Struct, kw_only=True):
    name: str
    value: float
    unit: str
    #: The same quantity at this machine's limit, measured in the same run.
    limit: float | None = None
    limit_name: str = ""
    #: The same workload on the baseline (SQLite), measured in the same run.
    baseline: float | None = None
    baseline_name: str = ""
    #: Goal as a fraction of the limit (``goal_ratio``) and/or an absolute floor (``goal_min``).
    goal_ratio: float | None = None
    goal_min: float | None = None
    #: For latencies lower is better: ratios are inverted so > 1 always means "we are better".
    lower_is_better: bool = False
    note: str = ""

    @property
    def limit_ratio(self) -> float | None:
        if self.limit is None or self.limit == 0 or self.value == 0:
            return None
        return self.limit / self.value if self.lower_is_better else self.value / self.limit

    @property
    def baseline_ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or self.value == 0:
            return None
        return self.baseline / self.value if self.lower_is_better else self.value / self.baseline

    @property
    def goal_met(self) -> bool | None:
        checks: list[bool] = []
        if self.goal_ratio is not None and self.limit_ratio is not None:
            checks.append(self.limit_ratio >= self.goal_ratio)
        if self.goal_min is not None:
            checks.append(
                self.value <= self.goal_min if self.lower_is_better else self.value >= self.goal_min
            )
        return all(checks) if checks else None


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.3g}{unit}"


def render(figures: list[Figure]) -> str:
    rows = [("benchmark", "value", "limit", "of limit", "baseline", "vs baseline", "goal", "met")]
    for f in figures:
        goal = []
        if f.goal_ratio is not None:
            goal.append(f">= {f.goal_ratio:.0%} of limit")
        if f.goal_min is not None:
            goal.append(f"{'<=' if f.lower_is_better else '>='} {_fmt(f.goal_min)} {f.unit}")
        met = {None: "", True: "yes", False: "NO"}[f.goal_met]
        rows.append(
            (
                f.name,
                f"{_fmt(f.value)} {f.unit}",
                f"{_fmt(f.limit)} ({f.limit_name})" if f.limit is not None else "-",
                f"{f.limit_ratio:.0%}" if f.limit_ratio is not None else "-",
                f"{_fmt(f.baseline)} ({f.baseline_name})" if f.baseline is not None else "-",
                f"{f.baseline_ratio:.2f}x" if f.baseline_ratio is not None else "-",
                ", ".join(goal) or "-",
                met,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def to_json(figures: list[Figure]) -> str:
    out = []
    for f in figures:
        d = msgspec.to_builtins(f)
        d.update(limit_ratio=f.limit_ratio, baseline_ratio=f.baseline_ratio, goal_met=f.goal_met)
        out.append(d)
    return json.dumps(out, indent=2)
