"""The README's benchmark table, made from the committed results and nothing else.

    python -m bench.readme_table           # rewrite the table in README.md
    python -m bench.readme_table --check   # exit 1 when README.md says something else

Every figure in the table is read from `bench/results/<name>.json`, so a number the README
shows is the one the current code measured; a benchmark re-run changes the table on the next
write, and the test suite fails while README.md and the results disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

RESULTS: Final = Path(__file__).with_name("results")
README: Final = Path(__file__).resolve().parents[1] / "README.md"
START: Final = "<!-- bench-table:start (python -m bench.readme_table writes this table) -->"
END: Final = "<!-- bench-table:end -->"

Result = Mapping[str, Any]


@dataclass(frozen=True)
class Row:
    benchmark: str
    result_file: str
    result: Callable[[Result], str]
    goal: str


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _http(model: str) -> Callable[[Result], str]:
    def result(r: Result) -> str:
        m = r[model]
        ratio = m["agent_rps"] / m["kserve_rps"]
        unbatched = m["agent_nobatch_rps"] / m["kserve_rps"]
        return (
            f"agent {_n(m['agent_rps'])} req/s, p99 {_n(m['agent_p99_ms'])} ms "
            f"({m['agent_mean_batch_rows']:.1f} rows per call); KServe {r['setup']['kserve']} "
            f"{_n(m['kserve_rps'])} req/s, p99 {_n(m['kserve_p99_ms'])} ms: {ratio:.1f}× "
            f"with batching, {unbatched:.1f}× with batching off "
            f"({_n(m['agent_nobatch_rps'])} req/s)"
        )

    return result


def _swap(r: Result) -> str:
    rss = r["rss_mib"]
    growth = 100 * (rss["max"] / rss["before_swaps"] - 1)
    return (
        f"{r['swaps']} swaps of {r['setup']['model_mib']} MiB models under load: "
        f"{r['failed_requests']} failed requests, p99 {_n(r['p99_during_swap_ms'])} ms during "
        f"swaps vs {_n(r['p99_steady_ms'])} ms steady ({r['p99_ratio']:.2f}×), swap "
        f"{r['swap_seconds_median']:.2f} s (median, quarantine included), RSS {growth:+.1f} %"
    )


def _route(r: Result) -> str:
    rounds = r["ratio_per_round"]
    return (
        f"{_n(r['agent_msgs_per_s'])} msg/s against {_n(r['echo_msgs_per_s'])} for an echo "
        f"module ({r['ratio']:.2f}; per-round median {r['ratio_round_median']:.2f}, rounds "
        f"{min(rounds):.2f}–{max(rounds):.2f}); p99 {_n(r['p99_ms'])} ms"
    )


def _profile(r: Result) -> str:
    return (
        f"peak RSS {r['rss_error_pct']:+.1f} % of the prediction "
        f"({'under' if r['peak_under_memory_limit'] else 'over'} the recommended limit); "
        f"steady p99 {r['steady_p99_error_pct']:+.0f} %; p99 of the window with the swap "
        f"{r['p99_error_pct']:+.0f} % (swap {r['validation']['swap_s']:.1f} s)"
    )


def _overhead(r: Result) -> str:
    return (
        f"tiny b1 {r['tiny_b1_ratio']:.2f}, tiny b64 {r['tiny_b64_ratio']:.2f}, "
        f"mid b1 {r['mid_b1_ratio']:.2f}"
    )


def _overhead_drift(r: Result) -> str:
    extra = {name: d["drift_extra_us"] for name, d in r["details"].items()}
    return ", ".join(f"{name.replace('_', ' ')} {us:+.1f} µs" for name, us in extra.items())


def _fleet(r: Result) -> str:
    return (
        f"converged in {r['converge_10pct_s']:.2f} s and {r['converge_100pct_s']:.2f} s; "
        f"start {r['start_s']:.1f} s; RSS {r['rss_mb']:.0f} MB at start, "
        f"{r['rss_after_rollouts_mb']:.0f} MB after both rollouts"
    )


def _rollout(r: Result) -> str:
    return (
        f"publisher {r['hub_calls']} hub calls, {r['seconds']:.1f} s to a converged fleet; "
        f"naive per-twin publisher {_n(r['naive_hub_calls'])} calls, "
        f"{r['naive_seconds']:.1f} s"
    )


def _image(r: Result) -> str:
    c, p = r["container"], r["process"]
    return (
        f"image {r['image_mb']:.0f} MB (venv layer {r['venv_layer_mb']:.0f} MB, base "
        f"{r['base_mb']:.0f} MB); start to ready {c['ready_s_median']:.1f} s vs "
        f"{p['ready_s_median']:.1f} s ({r['ratios']['ready_s']:.2f}×); idle RSS "
        f"{c['idle_rss_mib_median']:.0f} vs {p['idle_rss_mib_median']:.0f} MiB"
    )


def _cli_start(r: Result) -> str:
    return (
        f"`keygen --help` {r['keygen_help_s']:.2f} s, `--help` {r['help_s']:.2f} s "
        f"(median of {r['setup']['runs']}; `python -c pass` {r['python_pass_s']:.2f} s)"
    )


_DELAYS: Final = ("mean_1sd", "mean_0.25sd", "variance_x2", "missing_burst")


def _delay(value: float | None) -> str:
    return "missed" if value is None else _n(value)


def _drift(r: Result) -> str:
    ours, adwin, ph = r["ours"], r["adwin"], r["page_hinkley"]
    delays = "; ".join(
        f"{change} {_delay(ours['delay'][change])} (ADWIN {_delay(adwin['delay'][change])}, "
        f"PH {_delay(ph['delay'][change])})"
        for change in _DELAYS
    )
    missed = sorted(c for c, rate in ours["miss_rate"].items() if rate >= 0.5)
    return (
        f"false alarms per 10k rows {ours['false_alarms_per_10k']:g} (ADWIN "
        f"{adwin['false_alarms_per_10k']:g}, PH {_n(ph['false_alarms_per_10k'])}); median delay "
        f"in rows: {delays}; missed on most seeds: {', '.join(missed) or 'none'}"
    )


def _drift_cost(r: Result) -> str:
    at = r["overhead"]["1000_rps"]
    return (
        f"{r['overhead_us_per_request']:.1f} µs per request at 1,000 req/s (1 in "
        f"{at['sample_every']} sampled; an empty call {at['empty_call_us']:.2f} µs in the same "
        f"run); closing a window {at['window_close_us'] / 1000:.1f} ms"
    )


ROWS: Final[tuple[Row, ...]] = (
    Row("`bench.cli_start`, `python -m deployment` start-up", "cli_start", _cli_start, "< 1 s"),
    Row("`bench.http`, tiny model, 32 clients", "http", _http("tiny"), "≥ 3×, p99 ≤ KServe's"),
    Row("`bench.http`, mid model, 32 clients", "http", _http("mid"), "≥ 3×, p99 ≤ KServe's"),
    Row("`bench.swap`, hot swaps under load", "swap", _swap, "0 failed, p99 ≤ 3×, RSS ≤ 5 %"),
    Row("`bench.route`, sensor → route → agent → `$upstream`", "route", _route, "≥ 0.85"),
    Row(
        "`bench.profile`, a model profiled, then served with the recommendation across a swap",
        "profile",
        _profile,
        "RSS within 15 %, p99 within 25 %, no OOM",
    ),
    Row(
        "`bench.overhead`, in-process path vs bare `InferenceSession.run`",
        "overhead",
        _overhead,
        "≤ 1.15, 1.05, 1.03",
    ),
    Row(
        "`bench.overhead --drift`, drift watching on vs off, per request",
        "overhead-drift",
        _overhead_drift,
        "a few µs",
    ),
    Row(
        "`bench.fleet`, 1,000 simulated devices, a layered deployment on 10 % then 100 %",
        "fleet",
        _fleet,
        "seconds, a few hundred MB",
    ),
    Row(
        "`bench.rollout`, 1,000 device stand-ins, three rings",
        "rollout",
        _rollout,
        "calls per ring, not per device; faster than naive",
    ),
    Row(
        "`bench.image`, the image vs `python -m agent serve` outside it",
        "image",
        _image,
        "image ≤ 400 MB, venv ≤ 190 MB; start and RSS ≤ 1.2× the process",
    ),
    Row(
        "`bench.drift`, the agent's detector vs river's ADWIN and Page–Hinkley (defaults)",
        "drift",
        _drift,
        "≤ 0.1; no worse than the better river detector",
    ),
    Row("`bench.drift`, cost of the hook", "drift", _drift_cost, "≤ 2 µs"),
)


def load(name: str, results: Path = RESULTS) -> Result:
    data: Result = json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
    return data


def render(rows: Sequence[Row] = ROWS, results: Path = RESULTS) -> str:
    lines = [
        START,
        "| benchmark | result (`bench/results/<file>.json`) | goal |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.benchmark} | {row.result(load(row.result_file, results))} "
            f"(`{row.result_file}`) | {row.goal} |"
        )
    return "\n".join([*lines, END])


def replaced(readme: str, table: str) -> str:
    """`readme` with the text between the markers (markers included) replaced by `table`."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {START!r} ... {END!r} block")
    return readme[:start] + table + readme[end + len(END) :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    wanted = replaced(current, render())
    if args.check:
        if current != wanted:
            print(f"{args.readme}: the benchmark table is stale: python -m bench.readme_table")
            return 1
        return 0
    args.readme.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
