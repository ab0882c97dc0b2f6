"""Benchmark: many LLM bot decisions issued in the same instant against the fake LLM.

Each decision runs the code of a bot's turn without its database steps: render the seat's view into
chat messages (``bots.prompts``), build the JSON schema, call the model through the real ``openai``
async client (``bots.llm.acomplete``, aiohttp transport), parse the reply and validate it with the
game's rules (``bots.prompts.interpret``). Seat views cycle through the four phases a bot can act in.

The fake LLM (``python -m bots.fake_openai``) runs as its own process with a fixed latency (1.0 s by
default), so the ideal wall time is the latency itself; the overhead is our code, the client and
the machine. The decisions are spread over ``--processes`` event loops (worker processes), which all
start at the same instant.

    .venv/bin/python bench/bots.py                         # 500 decisions, 1.0 s latency, 2 processes
    .venv/bin/python bench/bots.py --processes 1           # everything on one event loop (embedded default)
    .venv/bin/python bench/bots.py --decisions 2000 --json

Two bursts run from the same processes: ``cold`` (no connection open yet, as in a session's first
phase) and ``warm`` (the first burst's connections reused, as in every later phase: the client keeps
them for 5 minutes).

Exit status: 0 when every warm decision was valid within ``--target`` (1.3 s); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django

    django.setup()


# ---- seat views: what seat_state gives a bot in each phase ------------------------------------------------

EXPERIMENT = {"rounds": 10, "endowment": 10, "multiplier": 3, "message_max_chars": 200, "fixed_send": False}


def seat_view(i: int, now: datetime) -> dict[str, Any]:
    phase = ("pitch", "choice", "return", "belief")[i % 4]
    deadline = (now + timedelta(seconds=60)).isoformat()
    cards = [{"seat": s, "name": f"Candidate {s}", "label": "AI bot" if s in "BD" else "Human", "position": n + 1,
              "message": f"Candidate {s} promises to return half, round {i % 10 + 1}.",
              "history": {"rounds": [1, 2] if s == "A" else [], "sent": 12 if s == "A" else 0, "returned": 15 if s == "A" else 0}}
             for n, s in enumerate("ABCD")]
    if phase in ("pitch", "return"):
        me = {"seat": "B", "role": "candidate", "name": "Candidate B"}
    else:
        me = {"seat": "S2", "role": "selector", "name": "Selector 2"}
    game: dict[str, Any] = {"round": 3, "rounds": 10, "phase": phase, "deadline": deadline, "payoff_total": 37, "todo": True,
                            "candidates": cards}
    if phase == "return":
        game["to_return"] = [{"selector": "S1", "name": "Selector 1", "sent": 6, "multiplied": 18, "returned": None},
                             {"selector": "S3", "name": "Selector 3", "sent": 10, "multiplied": 30, "returned": None}]
    return {"me": me, "experiment": EXPERIMENT, "game": game}


# ---- one worker process: its share of the decisions on one event loop -------------------------------------

def worker(index: int, share: int, base_url: str, go_at: Any, ready: Any, results: Any, bursts: int,
           threads: bool) -> None:
    _django()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request would be measured too
    from bots import decisions, llm, prompts
    from bots.models import DEFAULT_PERSONA
    from experiment.models import DEFAULT_INSTRUCTIONS

    settings = llm.LLMSettings(base_url=base_url, api_key="bench", model="fake-model", temperature=1.0,
                               max_tokens=300, timeout=30.0)
    now = datetime.now(UTC)
    views = [seat_view(index * share + i, now) for i in range(share)]
    history = [{"round": r, "your_message": "I return half.", "chosen_by": [{"selector": "Selector 1", "sent": 6,
                "you_received": 18, "you_returned": 9}], "you_earned": 9} for r in (1, 2)]

    def prepare(view: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        messages = prompts.messages_for(persona=DEFAULT_PERSONA, instructions=DEFAULT_INSTRUCTIONS, state=view,
                                        history=history if view["me"]["role"] == "candidate" else [], now=now)
        name, schema = prompts.schema_for(view)
        return messages, settings.response_format(name, schema)

    def judge(view: dict[str, Any], result: llm.ChatResult, started: float) -> tuple[bool, float, str]:
        if not result.ok:
            return False, time.perf_counter() - started, f"{result.error_class}: {result.error_message}"
        try:
            prompts.interpret(view, result.text, result.refusal)
        except prompts.InvalidAnswer as exc:
            return False, time.perf_counter() - started, exc.message
        return True, time.perf_counter() - started, ""

    async def decide(view: dict[str, Any]) -> tuple[bool, float, str]:
        started = time.perf_counter()
        messages, response_format = prepare(view)
        return judge(view, await llm.acomplete(settings, messages, response_format), started)

    def decide_in_thread(view: dict[str, Any]) -> tuple[bool, float, str]:
        """What a Celery thread-pool worker's task does: the request goes to the process's shared loop."""
        started = time.perf_counter()
        messages, response_format = prepare(view)
        return judge(view, decisions._request(settings, messages, response_format), started)

    if threads:
        run_threads(share, views, decide_in_thread, go_at, ready, results, bursts, index)
        return

    async def run() -> None:
        llm.async_client(settings)  # the client a long-running worker already has
        for burst in range(bursts):
            ready.release()
            while go_at[burst] == 0.0:  # noqa: ASYNC110 - a value shared between processes, not an asyncio.Event
                await asyncio.sleep(0.001)
            await asyncio.sleep(max(0.0, go_at[burst] - time.time()))
            cpu0, start = time.process_time(), time.time()
            outcomes = await asyncio.gather(*(decide(v) for v in views))
            end, cpu = time.time(), time.process_time() - cpu0
            results.put((burst, index, _burst_result(start, end, cpu, outcomes)))
        await llm.close_async_clients()

    asyncio.run(run())


def _burst_result(start: float, end: float, cpu: float, outcomes: list[tuple[bool, float, str]]) -> dict[str, Any]:
    return {"start": start, "end": end, "cpu": cpu, "latencies": [o[1] for o in outcomes],
            "valid": sum(o[0] for o in outcomes), "errors": [o[2] for o in outcomes if not o[0]][:5]}


def run_threads(share: int, views: list[dict[str, Any]], decide: Any, go_at: Any, ready: Any, results: Any,
                bursts: int, index: int) -> None:
    """One thread per decision, as a Celery worker with ``--pool threads --concurrency N`` runs them."""
    import threading

    from bots import llm
    from bots.decisions import background

    for burst in range(bursts):
        outcomes: list[Any] = [None] * share
        barrier = threading.Barrier(share + 1)

        def one(i: int, barrier: threading.Barrier, outcomes: list[Any]) -> None:
            barrier.wait()
            outcomes[i] = decide(views[i])

        pool = [threading.Thread(target=one, args=(i, barrier, outcomes)) for i in range(share)]
        for t in pool:
            t.start()
        ready.release()
        while go_at[burst] == 0.0:
            time.sleep(0.001)
        time.sleep(max(0.0, go_at[burst] - time.time()))
        cpu0, start = time.process_time(), time.time()
        barrier.wait()
        for t in pool:
            t.join()
        end, cpu = time.time(), time.process_time() - cpu0
        results.put((burst, index, _burst_result(start, end, cpu, outcomes)))
    background.submit(llm.close_async_clients()).result(5)


# ---- the run --------------------------------------------------------------------------------------------

def _free_port(candidates: range) -> int:
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"no free port in {candidates.start}-{candidates.stop - 1}")


def _start_fake(port: int, latency: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "bots.fake_openai", "--host", HOST, "--port", str(port),
                             "--latency", str(latency)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 15
    while time.monotonic() < end:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the fake LLM did not start")


def _summary(out: dict[int, dict[str, Any]], decisions: int, processes: int) -> dict[str, Any]:
    latencies = sorted(x for r in out.values() for x in r["latencies"])
    wall = max(r["end"] for r in out.values()) - min(r["start"] for r in out.values())
    return {
        "decisions": decisions, "processes": processes, "wall_seconds": round(wall, 3),
        "valid": sum(r["valid"] for r in out.values()),
        "latency_seconds": {"p50": round(statistics.median(latencies), 3),
                            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 3), "max": round(latencies[-1], 3)},
        "client_cpu_seconds": [round(out[i]["cpu"], 3) for i in sorted(out)],
        "errors": [e for r in out.values() for e in r["errors"]][:5],
    }


BURSTS = ("cold", "warm")


def bench(*, decisions: int, processes: int, base_url: str, threads: bool = False) -> dict[str, dict[str, Any]]:
    """Two bursts from the same worker processes: ``cold`` (no open connection yet: the first phase of a
    session) and ``warm`` (the connections the first burst opened are reused: every later phase)."""
    ctx = mp.get_context("fork")
    go_at, ready, results = ctx.Array("d", [0.0] * len(BURSTS)), ctx.Semaphore(0), ctx.Queue()
    shares = [decisions // processes + (1 if i < decisions % processes else 0) for i in range(processes)]
    procs = [ctx.Process(target=worker, args=(i, shares[i], base_url, go_at, ready, results, len(BURSTS), threads))
             for i in range(processes)]
    for p in procs:
        p.start()
    summaries = {}
    try:
        for burst, name in enumerate(BURSTS):
            for _ in procs:
                if not ready.acquire(timeout=120):
                    raise SystemExit("a worker did not get ready")
            time.sleep(0.5)  # let the machine settle after the previous burst
            go_at[burst] = time.time() + 0.2  # every process fires at this instant
            out: dict[int, dict[str, Any]] = {}
            for _ in procs:
                got, index, data = results.get(timeout=300)
                assert got == burst
                out[index] = data
            summaries[name] = _summary(out, decisions, processes)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return summaries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=500)
    parser.add_argument("--processes", type=int, default=2, help="event loops (worker processes) sharing the decisions")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the fake LLM takes per reply")
    parser.add_argument("--target", type=float, default=1.3, help="wall-time target in seconds")
    parser.add_argument("--url", help="use this OpenAI-compatible endpoint instead of starting the fake LLM")
    parser.add_argument("--port", type=int, default=0, help="port for the fake LLM (default: first free in 8401-8409)")
    parser.add_argument("--threads", action="store_true",
                        help="one thread per decision, requests on the process's shared loop (a Celery worker with "
                             "--pool threads) instead of one event loop running whole decisions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    fake = None
    base_url = args.url
    if base_url is None:
        port = args.port or _free_port(range(8401, 8410))
        fake = _start_fake(port, args.latency)
        base_url = f"http://{HOST}:{port}/v1"
    try:
        load_before = os.getloadavg()[0]
        result = bench(decisions=args.decisions, processes=args.processes, base_url=base_url,
                       threads=args.threads)
    finally:
        if fake is not None:
            fake.terminate()
            fake.wait(10)
    met = {name: r["valid"] == args.decisions and r["wall_seconds"] <= args.target for name, r in result.items()}
    if args.json:
        print(json.dumps({"bursts": result, "target_seconds": args.target, "met": met, "latency": args.latency,
                          "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_before": round(load_before, 2)}, indent=2))
    else:
        print(f"LLM bot decisions: {args.decisions} issued at the same instant against the fake LLM "
              f"({args.latency:g} s latency), {args.processes} process(es) x async openai client (aiohttp)"
              + (", one thread per decision (Celery thread pool)" if args.threads else ", one event loop per process"))
        print(f"machine: {os.cpu_count()} CPUs, load average before the run {load_before:.2f}, Python {platform.python_version()}")
        for name, r in result.items():
            lat = r["latency_seconds"]
            what = "no open connection" if name == "cold" else "connections of the previous burst reused"
            print(f"{name} ({what}):")
            print(f"  wall time, first request to last validated decision: {r['wall_seconds']:.3f} s "
                  f"(target <= {args.target:g} s: {'met' if met[name] else 'MISSED'})")
            print(f"  valid decisions: {r['valid']}/{args.decisions}; per decision p50 {lat['p50']:.3f} s, "
                  f"p95 {lat['p95']:.3f} s, max {lat['max']:.3f} s")
            print(f"  client CPU per process: {', '.join(f'{c:.2f} s' for c in r['client_cpu_seconds'])}")
            for error in r["errors"]:
                print(f"  error: {error}")
    return 0 if met["warm"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
