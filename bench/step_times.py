"""Summarise ``PENSIEVE_STEP_TIMES`` files (``engine/step_times.py``): per server process, the
decode steps by how many rows they ran — count, how many chained (launched on the previous
step's ids still on the device), median and p90 wall time inside ``Engine.step`` and the median
period from one such step's start to the next one's (what a stream sees a token).

    .venv/bin/python -m bench.step_times DIR [DIR…]
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def summarise(path: Path) -> list[str]:
    rows = [(float(r["start_s"]), float(r["took_ms"]), int(r["tokens"]), int(r["running"]),
             r["chained"] == "1") for r in csv.DictReader(path.open())]
    out = [f"{path}: {len(rows)} steps"]
    for width in sorted({t for _, _, t, n, _ in rows if t == n and t <= 64}):
        picked = [i for i, (_, _, t, n, _) in enumerate(rows) if t == n == width]
        if len(picked) < 8:
            continue
        took = sorted(rows[i][1] for i in picked)
        periods = [rows[i + 1][0] - rows[i][0] for i in picked  # < 0.1 s: not between requests
                   if i + 1 < len(rows) and rows[i + 1][2] == rows[i + 1][3] == width
                   and rows[i + 1][0] - rows[i][0] < 0.1]
        chained = sum(rows[i][4] for i in picked)
        out.append(f"  decode x{width}: {len(picked)} steps, {chained} chained; in step() median "
                   f"{statistics.median(took):.2f} ms, p90 {took[int(0.9 * (len(took) - 1))]:.2f} ms; "
                   + (f"period median {1e3 * statistics.median(periods):.2f} ms, mean "
                      f"{1e3 * statistics.fmean(periods):.2f} ms, max {1e3 * max(periods):.1f} ms, "
                      f"{sum(p > 2 * statistics.median(periods) for p in periods)} over 2x the median"
                      if periods else ""))
    return out


def main() -> None:
    for d in sys.argv[1:]:
        for f in sorted(Path(d).glob("steps-*.csv")):
            print("\n".join(summarise(f)))


if __name__ == "__main__":
    main()
