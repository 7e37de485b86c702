"""The hybrid families' GPU table (issue 15 item 6) from ``bench/gpu_hybrid_run.sh``'s result
folders: per family, Pensieve and llama-server (defaults, and ``--cache-ram 0``) side by side on
the same file, with Pensieve's speed-up over each (tok/s: ours / theirs; ms: theirs / ours).

    python -m bench.gpu_hybrid_table /tmp/hy        # reads /tmp/hy/{p,l,l0}_<family>/gpu_bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ("qwen35moe", "gpt-oss", "glm47flash")
SHOWN = ("decode", "x8 parallel streams: aggregate output", "Claude Code turn 1 (cold): TTFT",
         "Claude Code turn 1: prefill", "Claude Code turn 2 (follow-up on that prefix): TTFT",
         "turn 2 TTFT / turn 1 TTFT (target ≤ 5%)", "turn 2 prompt tokens read from the cache (usage)",
         "turn 1 / turn 2 prompt tokens")
SERVERS = (("p", "Pensieve"), ("l", "llama.cpp"), ("l0", "llama.cpp --cache-ram 0"))


def medians(folder: Path) -> dict[str, tuple[float | None, str]]:
    f = folder / "gpu_bench.json"
    if not f.exists():
        return {}
    rows = json.loads(f.read_text())["metrics"]
    return {r["name"]: (r["median"], r["unit"]) for r in rows}


def speedup(ours: float | None, theirs: float | None, unit: str) -> str:
    if not ours or not theirs or unit not in ("tok/s", "ms"):
        return ""
    return f"{(ours / theirs if unit == 'tok/s' else theirs / ours):.2f}×"


def table(state: Path, family: str) -> str:
    got = {key: medians(state / f"{key}_{family}") for key, _ in SERVERS}
    if not any(got.values()):
        return f"## {family}: no results\n"
    head = "| metric | unit | " + " | ".join(n for _, n in SERVERS) + \
        " | Pensieve vs llama.cpp | vs --cache-ram 0 |"
    lines = [f"## {family}", "", head, "|---|---|" + "---:|" * (len(SERVERS) + 2)]
    for name in SHOWN:
        cells = [got[key].get(name, (None, ""))[0] for key, _ in SERVERS]
        unit = next((got[key][name][1] for key, _ in SERVERS if name in got[key]), "")
        if all(c is None for c in cells):
            continue
        shown = ["—" if c is None else f"{c:.0f}" if abs(c) >= 100 else f"{c:.3g}"
                 for c in cells]
        lines.append(f"| {name} | {unit} | " + " | ".join(shown) + f" | "
                     f"{speedup(cells[0], cells[1], unit)} | {speedup(cells[0], cells[2], unit)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state = Path(args[0] if args else "/tmp/hy")
    print("\n".join(table(state, f) for f in FAMILIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
