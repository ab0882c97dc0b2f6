"""Knee of a burst: the largest number of groups that still meets the load target, and what ran out above it.

Runs ``bench/load.py`` (each run alone, one after the other, each with its own database and processes,
started and cleaned up by load.py) for a scenario at growing ``--groups``, by default the launch
(``--scenario launch``: 100 groups arriving within 30 s, time scale 0.1, phases 20 s) at 100, 150, 200,
250 and 300 groups, and stops at the first size that misses the target. The target is load.py's: 0 errors
(a 5xx other than a busy 503 with Retry-After is one), 0 participants never placed, every group completed,
none stalled, ack p99 and phase change p99 under 200 ms.

It reports the largest size that met the target and, for the first that missed it, what it missed and
which resource ran out first (load.py's ``first_limit``: CPU, database connections, Redis, the server's
event loop, the load generator) with when each did, and the peak of database connections of every run.

    .venv/bin/python bench/knee.py                                  # launch at 100, 150, 200, 250, 300 groups
    .venv/bin/python bench/knee.py --groups 120,140,160 --json
    .venv/bin/python bench/knee.py --start 100 --step 25 --max-groups 200 -- --rounds 1 --port 8651

Options after ``--`` (or any option this script does not know) go to every load.py run as they are, for
example ``--rounds``, ``--workers``, ``--database``, ``--redis-db`` or ``--port``.

Exit status: 0 a size met the target (the knee is found, or every size met it); 1 even the first size
missed it; 3 a run did not produce a report (it failed to start or was interrupted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAX_RUNS = 12
# Set by this script for every run; passing them through would contradict it.
OWN = ("--groups", "--participants", "--scenario", "--json")


def parse_args(argv: Iterable[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,  # a load.py option is never taken for one of these
        epilog="Any other option is passed to every bench/load.py run (see bench/load.py --help).")
    parser.add_argument("--scenario", default="launch", help="load.py scenario to run (default: launch).")
    parser.add_argument("--groups", help="Comma-separated sizes to run, in order, instead of --start/--step/--max-groups.")
    parser.add_argument("--start", type=int, default=100, help="First number of groups (default 100).")
    parser.add_argument("--step", type=int, default=50, help="Groups added per run (default 50).")
    parser.add_argument("--max-groups", type=int, default=300, help="Largest number of groups run (default 300).")
    parser.add_argument("--keep-going", action="store_true",
                        help="Run every size even after one missed the target (the knee is still the first miss).")
    parser.add_argument("--pause", type=float, default=10.0, help="Seconds between runs, for the machine to settle (default 10).")
    parser.add_argument("--run-timeout", type=float, default=1800.0,
                        help="Seconds after which one load.py run is stopped (load.py bounds itself by its --duration-limit).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
    rest = [a for a in rest if a != "--"]
    problems = [f"{a.split('=', 1)[0]} is set by knee.py" for a in rest if a.split("=", 1)[0] in OWN]
    if args.groups:
        try:
            args.sizes = [int(x) for x in args.groups.split(",") if x.strip()]
        except ValueError:
            args.sizes = []
        if not args.sizes or any(g < 1 for g in args.sizes):
            problems.append("--groups must be positive whole numbers separated by commas")
    else:
        if args.start < 1 or args.step < 1 or args.max_groups < args.start:
            problems.append("--start and --step must be at least 1 and --max-groups at least --start")
        args.sizes = list(range(args.start, args.max_groups + 1, max(1, args.step)))
    if len(args.sizes) > MAX_RUNS:
        problems.append(f"at most {MAX_RUNS} runs ({len(args.sizes)} asked for): take a larger --step or fewer --groups")
    if args.pause < 0 or args.run_timeout < 60:
        problems.append("--pause must be >= 0 and --run-timeout >= 60")
    if problems:
        parser.error("; ".join(problems))
    return args, rest


def run_load(scenario: str, groups: int, extra: list[str], *, timeout: float) -> tuple[int, dict[str, Any] | None, str]:
    """One load.py run: its exit status, its JSON report (None if it printed none) and its stderr's end."""
    argv = [sys.executable, str(ROOT / "bench" / "load.py"), "--scenario", scenario, "--groups", str(groups), "--json", *extra]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return -1, None, f"stopped after {timeout:.0f} s: {(exc.stderr or b'')[-2000:]!r}"
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = None
    return done.returncode, report, (done.stderr or done.stdout)[-3000:]


def step_summary(groups: int, code: int, r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that the knee is judged by."""
    res = r.get("resources", {})
    limits = r.get("limits", {})
    return {
        "groups": groups, "participants": r.get("config", {}).get("participants"), "exit": code,
        "target_met": bool(r.get("target_met")), "target_missed": r.get("target_missed", []),
        "errors": r.get("errors"), "errors_by_kind": r.get("errors_by_kind"), "unplaced": r.get("unplaced"),
        "groups_completed": r.get("groups_completed"), "never_seated": r.get("never_seated"), "gave_up": r.get("gave_up"),
        "ack_p99_ms": (r.get("ack_ms") or {}).get("p99"), "phase_change_p99_ms": (r.get("phase_change_ms") or {}).get("p99"),
        "http_status": r.get("http_status"), "busy": r.get("busy"),
        "db_connections_peak": (res.get("db_connections") or {}).get("peak"),
        "db_connections_server_peak": (res.get("db_connections") or {}).get("server_peak"),
        "max_connections": (res.get("db_connections") or {}).get("max_connections"),
        "redis_clients_peak": (res.get("redis_clients") or {}).get("db_peak"),
        "healthz_p99_ms": (res.get("healthz_ms") or {}).get("p99"),
        "cpu_peak_machine_cores": (limits.get("cpu") or {}).get("peak_machine_cores"),
        "cpu_peak_ours_cores": (limits.get("cpu") or {}).get("peak_ours_cores"),
        "cpu": r.get("cpu"), "first_limit": r.get("first_limit"), "limits": limits, "aborted": r.get("aborted"),
    }


def ran_out(step: dict[str, Any]) -> str:
    """In words: which resource ran out first in a run, and when the others did."""
    limits = step["limits"]
    first = step["first_limit"]
    reached = sorted((v["first_at_s"], name) for name, v in limits.items() if v.get("first_at_s") is not None)
    if first is None:
        return (f"no measured resource reached its limit (CPU peak {step['cpu_peak_machine_cores']} of "
                f"{(limits.get('cpu') or {}).get('cores')} cores, ours {step['cpu_peak_ours_cores']}; database connections "
                f"peak {step['db_connections_peak']}, server {step['db_connections_server_peak']} of {step['max_connections']}; "
                f"/healthz p99 {step['healthz_p99_ms']} ms): the target was missed without a resource running out")
    v = limits[first]
    detail = {
        "cpu": lambda: f"the machine's cores {_cpu_words(v)}",
        "db_connections": lambda: ", ".join(v.get("why") or []) + f"; peak {v.get('peak')} connections to the run's database, "
                                  f"{v.get('server_peak')} on the server of max_connections {v.get('max_connections')}",
        "redis": lambda: f"redis-server peak {v.get('peak_cores')} cores, {v.get('peak_clients')} clients",
        "event_loop": lambda: f"GET /healthz slowest {v.get('slowest_healthz_ms')} ms (the web processes' event loops were behind)",
        "load_generator": lambda: f"the load generator's loop up to {v.get('worst_lag_ms')} ms late (its figures overstate the server's)",
        "server_errors": lambda: f"{v.get('http_5xx')} HTTP 5xx not put down to the database (see the server logs)",
    }.get(first, lambda: "")()
    others = ", ".join(f"{name} at {t} s" for t, name in reached if name != first)
    return f"{first} first, at {v['first_at_s']} s after the start ({detail})" + (f"; then {others}" if others else "")


def _cpu_words(v: dict[str, Any]) -> str:
    then = v.get("then") or {}
    return (f"{then.get('machine_cores')} of {v.get('cores')} busy over 5 s (ours {then.get('ours_cores')}, "
            f"other programs {then.get('other_programs_cores')})")


def line(step: dict[str, Any]) -> str:
    busy = step.get("busy") or {}
    return (f"groups {step['groups']} ({step['participants']} participants): {'met' if step['target_met'] else 'MISSED'} | "
            f"errors {step['errors']}, unplaced {step['unplaced']}, completed {step['groups_completed']}/{step['groups']}, "
            f"ack p99 {step['ack_p99_ms']} ms, phase change p99 {step['phase_change_p99_ms']} ms | "
            f"busy answers {busy.get('http_503', 0) + busy.get('websocket', 0)} (lost {busy.get('clients_lost', 0)}), "
            f"DB connections peak {step['db_connections_peak']}, CPU peak {step['cpu_peak_machine_cores']} cores | "
            f"first limit: {step['first_limit'] or 'none'}")


def main(argv: Iterable[str] | None = None) -> int:
    args, extra = parse_args(argv)
    say = (lambda *_: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    steps: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    for i, groups in enumerate(args.sizes):
        if i and args.pause:
            time.sleep(args.pause)
        say(f"Running scenario {args.scenario} at {groups} groups …")
        code, report, tail = run_load(args.scenario, groups, extra, timeout=args.run_timeout)
        if report is None or "ack_ms" not in report:
            failure = {"groups": groups, "exit": code, "aborted": (report or {}).get("aborted"), "output": tail}
            say(f"groups {groups}: no report (exit {code}):\n{tail}")
            break
        steps.append(step_summary(groups, code, report))
        say(line(steps[-1]))
        if not steps[-1]["target_met"] and not args.keep_going:
            break
    met = [s for s in steps if s["target_met"]]
    first_miss = next((s for s in steps if not s["target_met"]), None)
    # The knee: the largest size met before the first miss (a larger one met after it, with --keep-going, is luck).
    knee = max((s["groups"] for s in steps if s["target_met"] and (first_miss is None or s["groups"] < first_miss["groups"])),
               default=None)
    result = {"scenario": args.scenario, "sizes": args.sizes, "extra_load_options": extra, "runs": steps,
              "knee_groups": knee, "first_miss": None, "failed_run": failure}
    if first_miss is not None:
        result["first_miss"] = {"groups": first_miss["groups"], "missed": first_miss["target_missed"],
                                "first_limit": first_miss["first_limit"], "ran_out": ran_out(first_miss),
                                "limits": first_miss["limits"]}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text(result))
    if failure is not None:
        return 3
    return 0 if met and (first_miss is None or knee is not None) else 1


def text(result: dict[str, Any]) -> str:
    lines = [f"Scenario {result['scenario']}, sizes {result['sizes']}"
             + (f", load.py options {' '.join(result['extra_load_options'])}" if result["extra_load_options"] else "")]
    lines += [line(s) for s in result["runs"]]
    runs = {s["groups"]: s for s in result["runs"]}
    if result["knee_groups"] is not None:
        k = runs[result["knee_groups"]]
        lines.append(f"Largest meeting the target: {k['groups']} groups ({k['participants']} participants), "
                     f"peak DB connections {k['db_connections_peak']}")
    else:
        lines.append("No size met the target.")
    miss = result["first_miss"]
    if miss is not None:
        lines.append(f"First to miss: {miss['groups']} groups: " + "; ".join(miss["missed"]))
        lines.append(f"  Ran out first: {miss['ran_out']}")
    elif result["runs"] and result["failed_run"] is None:
        lines.append(f"Every size met the target: the knee is above {result['runs'][-1]['groups']} groups.")
    if result["failed_run"] is not None:
        f = result["failed_run"]
        lines.append(f"Run at {f['groups']} groups gave no report (exit {f['exit']}): {f.get('aborted') or ''}\n{f['output']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
