"""Results JSON → a markdown section of BENCHMARKS.md and a PNG plot.

`python -m bench.report bench/results/<file>.json` redraws from a stored run.
Each run's section sits between markers named after its label, so a
"baseline" section and a "tuned" section live side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
NAMES = {
    "health": "empty RPC (Health/Check)",
    "auth_warm": "Authenticate, warm",
    "auth_cold": "Authenticate, cold (1 bcrypt)",
    "auth_invalid": "Authenticate, invalid tokens",
    "list": "ListTokens, first page",
    "create": "CreateToken",
    "rest_auth": "REST Authenticate (shim)",
    "flood": "Authenticate, warm, beside a flood",
    "flood_invalid": "the flood itself (invalid tokens)",
}


def _n(tokens: int) -> str:
    if tokens >= 1_000_000 and tokens % 1_000_000 == 0:
        return f"{tokens // 1_000_000}M"
    if tokens >= 1_000 and tokens % 1_000 == 0:
        return f"{tokens // 1_000}k"
    return str(tokens)


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    xs = [s["tokens"] for s in sizes]
    series = [("health", "gRPC empty RPC", ":"), ("auth_warm", "gRPC Authenticate", "-"),
              ("rest_auth", "REST Authenticate", "--"), ("list", "gRPC ListTokens", "-.")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in series:
        if not all(key in s["summary"] for s in sizes):
            continue
        left.plot(xs, [s["summary"][key]["rate"] for s in sizes], style, marker="o", label=label)
        right.plot(xs, [s["summary"][key]["p99_ms"] for s in sizes], style, marker="o",
                   label=label)
    for ax, title, unit in ((left, "throughput", "calls/s"), (right, "p99 latency", "ms")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens stored")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.set_xticks(xs, [_n(x) for x in xs])
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    s = results["settings"]
    fig.suptitle(f"tokenservice on {results['backend']}, {s['server_workers']} server process(es),"
                 f" concurrency {s['concurrency']}, {results['machine']['cores']} cores"
                 f" ({results['date'][:10]}{', ' + results['label'] if results['label'] else ''})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def section(results: dict[str, Any], png: Path) -> str:
    sizes = results["sizes"]
    s = results["settings"]
    m = results["machine"]
    lines = [
        f"Run of {results['date']} on {results['backend']}: `{results['command']}`",
        f"({results['elapsed_s']:.0f} s in all).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, Python {m['python']},"
        f" Linux {m['kernel']}. Server: `tokenservice serve`"
        f"{' --workers ' + str(s['server_workers']) if s['server_workers'] > 1 else ''},"
        f" bcrypt {s['bcrypt_rounds']} rounds. Load: one grpc.aio driver process,"
        f" {s['concurrency']} calls in flight (cold Authenticate and CreateToken:"
        f" {s['cold_concurrency']}), {s['duration_s']:g} s measured per phase,"
        f" {s['repeats']} repeats in rotating order; figures are medians over the repeats.",
        "",
        "| target | measured | goal | holds |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        where = f" ({t['where']})" if t["where"] else ""
        lines.append(f"| {t['target']}{where} | {t['measured']} | {t['goal']} |"
                     f" {'yes' if t['holds'] else '**no**'} |")
    header = "| phase | " + " | ".join(
        f"{_n(x['tokens'])}: calls/s | p50 ms | p99 ms" for x in sizes) + " |"
    lines += ["", header, "|---" * (1 + 3 * len(sizes)) + "|"]
    for key, name in NAMES.items():
        if not all(key in x["summary"] for x in sizes):
            continue
        cells = []
        for x in sizes:
            v = x["summary"][key]
            cells += [f"{v['rate']:.0f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| tokens stored | bulk load (s) | server peak RSS (MB, VmHWM) | exit code on SIGTERM |",
        "|---|---|---|---|",
    ]
    for x in sizes:
        rss = x["rss_mb"]
        detail = f" ({rss['processes']} processes)" if rss["processes"] > 1 else ""
        lines.append(f"| {_n(x['tokens'])} | {x.get('load_seconds', 0)} | {rss['sum']}{detail} |"
                     f" {x['server_exit']} |")
    flood = [x["summary"].get("flood_invalid", {}).get("codes", {}) for x in sizes]
    if flood and flood[-1]:
        lines += ["", "Flood statuses at the largest size: " + ", ".join(
            f"{k} {v}" for k, v in sorted(flood[-1].items())) + "."]
    lines += ["", f"![throughput and p99 against tokens stored](bench/results/{png.name})", ""]
    return "\n".join(lines)


def update(path: Path) -> None:
    results = json.loads(Path(path).read_text())
    png = Path(path).with_suffix(".png")
    plot(results, png)
    label = results["label"] or "latest"
    begin, end = f"<!-- bench:{label}:begin -->", f"<!-- bench:{label}:end -->"
    body = f"{begin}\n{section(results, png)}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Run: {label}\n\n{body}\n"
    DOC.write_text(text)
    print(f"updated {DOC.name} ({label}) and {png}", file=sys.stderr)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        update(Path(arg))
