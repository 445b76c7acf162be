"""Results JSON → a summary for the terminal and a markdown section for BENCHMARKS.md.

`python -m bench.report bench/results/<file>.json` prints the section;
`--update-doc` also writes it into BENCHMARKS.md between the markers named
after the run's backend (and label), adding them at the end the first time.
Only results of the h2load driver are understood; older files are history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"


def _range(m: dict[str, Any], key: str, fmt: str = "{:.0f}") -> str:
    lo, hi = m.get(key + "_min"), m.get(key + "_max")
    if lo is None:
        return ""
    return f"{fmt.format(lo)}–{fmt.format(hi)}"


def _la(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _checked_by(phase: dict[str, Any]) -> str:
    if phase["load"].get("python"):
        return "the Python driver reads every status"
    if phase["load"].get("h1"):
        if phase["method"]:
            return "HTTP statuses, and the server log"
        return "HTTP statuses, one call before and after"
    if phase["method"]:
        return "the server log, per status"
    return "one call before and after"


def summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    bare = results["phases"].get("bare", {}).get("median", {}).get("rate")
    for name, p in results["phases"].items():
        m = p["median"]
        ceiling = f" ({m['rate'] / bare:.2f} of bare)" if bare else ""
        mark = "" if m["verified"] else "  NOT VERIFIED: " + p["rounds"][-1].get("check", "")
        lines.append(f"{name:10} {m['rate']:9.0f} calls/s{ceiling}, p99 {m['p99_ms']:.2f} ms{mark}")
    for r in results["ratios"]:
        mark = {True: "holds ", False: "MISSED", None: "      "}[r["holds"]]
        lines.append(f"{mark} {r['ratio']}: {r['median']} ({r['min']}–{r['max']})"
                     + (f" goal {r['goal']}" if r["goal"] else ""))
    return "\n".join(lines)


def section(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    la = results["load_average"]
    phases = results["phases"]
    bare = phases.get("bare", {}).get("median", {})
    lines = [
        f"Run of {results['date']} on {results['backend']}: `{results['command']}`"
        f" ({results['elapsed_s']:.0f} s in all). Machine: {m['cpu']}, {m['cores']} cores,"
        f" Python {m['python']}; load average (1, 5, 15 min) {_la(la['start'])} at the start,"
        f" {_la(la['end'])} at the end (the machine is shared)."
        f" Driver: {results['driver']} on core(s)"
        f" {','.join(map(str, s['driver_cores']))}; servers on core(s)"
        f" {','.join(map(str, s['server_cores']))}"
        " (the `--workers` phases and the peer: every core)."
        f" gRPC: `-c {s['grpc_connections']} -m {s['grpc_streams']}`; REST:"
        f" `--h1 -c {s['rest_connections']}`; {s['duration_s']:g} s measured after"
        f" {s['warmup_s']:g} s of warm-up; {s['rounds']} rounds, interleaved in rotating order;"
        f" bcrypt {s['bcrypt_rounds']} rounds. Figures are medians over the rounds (range in"
        " brackets); the ÷ bare column divides those medians, the ratios below the table are"
        " taken within each round.",
        "",
        "| phase | calls/s | ÷ bare | p50 ms | p99 ms | server CPU ms/call | server core busy"
        " | h2load core busy | every call OK? (how checked) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in phases.items():
        md = p["median"]
        share = f"{md['rate'] / bare['rate']:.2f}" if bare.get("rate") and name != "bare" else "1"
        cpu = md.get("server_cpu_ms_per_call")
        busy = md.get("server_busy")
        drv = md.get("driver_busy")
        lines.append(
            f"| {p['title']} | {md['rate']:.0f} ({_range(md, 'rate')}) | {share} |"
            f" {md['p50_ms']:.2f} | {md['p99_ms']:.2f} |"
            f" {'' if cpu is None else f'{cpu:.3f}'} | {'' if busy is None else f'{busy:.2f}'} |"
            f" {'' if drv is None else f'{drv:.2f}'} |"
            f" {'yes' if md['verified'] else '**no**'} ({_checked_by(p)}) |")
    lines += ["", "| ratio, within each round | median | range | goal | holds |",
              "|---|---|---|---|---|"]
    for r in results["ratios"]:
        holds = {True: "yes", False: "**no**", None: ""}[r["holds"]]
        spread = f"{r['min']:.3f}–{r['max']:.3f}" if r["min"] != r["max"] else ""
        lines.append(f"| {r['ratio']} | {r['median']:.3f} | {spread} | {r['goal']} | {holds} |")
    flood = phases.get("flood")
    if flood:
        f = [r.get("flood", {}) for r in flood["rounds"]]
        logged: dict[str, int] = {}
        for r in flood["rounds"]:
            for k, v in r["logged"].items():
                logged[k] = logged.get(k, 0) + v
        lines += ["", "The flood (a second h2load, same connections and streams, one well-formed"
                  " unknown token, as its own client address) got "
                  + ", ".join(f"{x.get('rate', 0):.0f}" for x in f)
                  + " calls/s answered per round; the server logged, over the flood phases: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(logged.items())) + "."]
    redis = phases.get("lim_redis", {}).get("median", {}).get("redis_cpu_ms_per_call")
    if redis is not None:
        lines += ["", f"redis-server (on the servers' core) spent {redis:.3f} ms of CPU per"
                  " call of the Redis-limited phase (median), not counted in its server CPU"
                  " column."]
    lines += ["", "| server | peak RSS (MB, VmHWM, summed over processes) |", "|---|---|"]
    for name, rss in results["rss_mb"].items():
        detail = f" ({rss['processes']} processes)" if rss["processes"] > 1 else ""
        lines.append(f"| {name} | {rss['sum']}{detail} |")
    for name, crash in (results.get("crashes") or {}).items():
        lines += ["", f"**{name} exited with code {crash['exit_code']}** during"
                  f" {crash['phase']} in round {crash['round'] + 1}; its phases after that are"
                  " marked failed. The end of its log:", "", "```",
                  crash["log_tail"].strip()[-2500:], "```"]
    db = [(p["title"], p["median"]["db_cpu_ms_per_call"]) for p in phases.values()
          if p["median"].get("db_cpu_ms_per_call") is not None]
    if db:
        lines += ["", "PostgreSQL's own processes (on the server's cores) used, per call, on top"
                  " of the server CPU column: "
                  + "; ".join(f"{title} {ms:.3f} ms" for title, ms in db) + "."]
    again = [f"{p['title']} (round {r['round'] + 1}: {r['starved_first']['server_busy']:.2f}"
             " of a core)" for p in phases.values() for r in p["rounds"] if "starved_first" in r]
    if again:
        lines += ["", "Measured once more because a neighbour starved the server (under half a"
                  " core over the phase; the table has the second measurement): "
                  + "; ".join(again) + "."]
    busy = [(p["title"], p["median"]["process_busy"]) for p in phases.values()
            if p["median"].get("process_busy")]
    if busy:
        lines += ["", "Where the CPU went in the multi-process servers (share of a core, median"
                  " over the rounds; the first process, then each child):", ""]
        lines += [f"- {title}: " + " + ".join(f"{b:.2f}" for b in shares) for title, shares in busy]
    profile = results.get("profile") or {}
    if "self_pct" in profile:  # one profile, from before --profile covered REST too
        profile = {"auth": {**profile, "title": "warm Authenticate"}}
    for report in profile.values():
        if "self_pct" not in report:
            continue
        lines += _profile(report)
    return "\n".join(lines) + "\n"


def _profile(report: dict[str, Any]) -> list[str]:
    lines = ["", f"py-spy under {report['title']} ({report['samples']} samples with the GIL held;"
             " own time of the innermost frame):", "", "| frame | % |", "|---|---|"]
    for frame, pct in list(report["self_pct"].items())[:12]:
        lines.append(f"| `{frame}` | {pct} |")
    ours = [(f, pct) for f, pct in report["inclusive_pct"].items()
            if any(k in f for k in ("tokenservice_server/", "logging/", "peewee", "json/",
                                    "prometheus_client/", "grpc/", "uvicorn/", "starlette/"))]
    if ours:
        lines += ["", "Inclusive (the frame and what it calls): tokenservice's code, grpc's"
                  " Python layer, uvicorn, starlette, peewee, logging, json and metrics only:",
                  "", "| frame | % |", "|---|---|"]
        lines += [f"| `{frame}` | {pct} |" for frame, pct in ours[:14]]
    return lines


def update(path: Path) -> None:
    results = json.loads(Path(path).read_text())
    label = ("h2load-" + results["backend"] + ("-quick" if results.get("quick") else "")
             + (f"-{results['label']}" if results["label"] else ""))
    begin, end = f"<!-- bench:{label}:begin -->", f"<!-- bench:{label}:end -->"
    body = f"{begin}\n{section(results)}{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Run: {label}\n\n{body}\n"
    DOC.write_text(text)
    print(f"updated {DOC.name} ({label})", file=sys.stderr)


def main(argv: list[str]) -> int:
    write = "--update-doc" in argv
    for arg in (a for a in argv if a != "--update-doc"):
        if write:
            update(Path(arg))
        else:
            print(section(json.loads(Path(arg).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
