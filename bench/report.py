"""Markdown tables from a results document (the generated part of ``docs/BENCHMARKS.md``).

    python -m bench.report bench/results/latest.json [docs/BENCHMARKS.md]
    python -m bench.report --compare BEFORE.json AFTER.json   # headline figures, before → after

Without a target file the markdown goes to stdout. In a target file, only the text between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced (appended when missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["BEGIN", "END", "render", "update_markdown"]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int | float):
        if digits == 0 and abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.{max(digits, 1)}f}" if digits or abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _x(ratio: Any) -> str:
    return f"{ratio:.2f}x" if isinstance(ratio, int | float) else "-"


def _get(doc: dict[str, Any], *path: str) -> Any:
    node: Any = doc
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _machine(doc: dict[str, Any]) -> list[str]:
    m = doc.get("machine", {})
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    ram = m.get("ram_bytes", 0) / 2**30
    notes = [
        f"- `{name}`: {section['note']}"
        for name, section in doc.get("results", {}).items()
        if isinstance(section, dict) and section.get("note")
    ]
    return [
        f"Run: size `{doc.get('size')}`, {doc.get('started_at')} → {doc.get('finished_at')}.",
        *(["", "Sections taken from other runs of the runner:", "", *notes] if notes else []),
        "",
        f"- CPU: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores "
        f"({m.get('cpus_visible')} visible); RAM {ram:.1f} GiB; load average at start "
        f"{m.get('loadavg_at_start')}",
        f"- {m.get('platform')}; Python {m.get('python')}",
        f"- {libs}",
    ]


def _summary(doc: dict[str, Any]) -> list[str]:
    r = doc.get("results", {})
    rows: list[tuple[str, str, str, str, str, str]] = []
    gate = _get(r, "interceptor", "attempt_cpu")
    if gate:
        yard = _get(gate, "yardstick", "message_bytes")
        for sink, v in gate["sinks"].items():
            target = v.get("target_ratio_vs_yardstick")
            rows.append(
                (
                    f"1. gate CPU per attempt, sink `{sink}` (median / p99, µs)",
                    f"{_n(v['cpu_us']['p50'], 1)} / {_n(v['cpu_us']['p99'], 1)}",
                    f"{_n(v.get('yardstick_cpu_us'), 1)} (one PyNaCl signature of the "
                    f"receipt's {yard} signed bytes)",
                    _x(v.get("ratio_cpu_vs_yardstick")),
                    f"median ≤ {target:g}x yardstick"
                    if target
                    else "(upper bound: the fsync wait's loop work is in the window)",
                    _n(v.get("target_met")),
                )
            )
    out_cost = _get(r, "outcomes", "attempt_cost")
    if out_cost and "yardstick_cpu_us" in out_cost["sinks"].get("none", {}):
        v = out_cost["sinks"]["none"]
        proc = v["process_cpu_us_per_attempt"]
        path = v["path_cpu_us"]["with_outcomes"]["p50"]
        rows.append(
            (
                "1. CPU per attempt with the outcome record, sink `none`: whole process "
                "(record signed in the background) / activity's path median (µs)",
                f"{_n(proc['with_outcomes'], 1)} / {_n(path, 1)}",
                f"{_n(v['yardstick_cpu_us'], 1)} (one PyNaCl signature, same bytes)",
                f"{_x(v['ratio_process_cpu_vs_yardstick']['with_outcomes'])} / "
                f"{_x(v['ratio_path_cpu_vs_yardstick']['with_outcomes'])}",
                f"whole process ≤ {out_cost['target_ratio_vs_yardstick']:g}x yardstick",
                _n(v["target_met"]),
            )
        )
    wt = _get(r, "interceptor", "worker_throughput")
    if wt:
        base = wt["activities_per_s"]["without_interceptor"]
        for mode, ratio in wt["ratio_vs_without"].items():
            rows.append(
                (
                    f"1. activities/s on the dev server, interceptor `{mode}`",
                    _n(wt["activities_per_s"][mode]),
                    f"{_n(base)} (no interceptor)",
                    f"{ratio:.2f}x",
                    "≥ 0.9x",
                    _n(wt["target_met"][mode]),
                )
            )
    prod = r.get("producer")
    if prod:
        base = prod["receipts_per_s"]["raw_aiokafka_keyed"]
        for mode, ratio in prod["ratio_vs_raw_keyed"].items():
            rows.append(
                (
                    f"2. producer receipts/s, `{mode}` (same bytes as the baseline)",
                    _n(prod["receipts_per_s"][mode]),
                    f"{_n(base)} (raw aiokafka, same records)",
                    f"{ratio:.2f}x",
                    "≥ 0.8x",
                    _n(prod["target_met"][mode]),
                )
            )
    cons = r.get("consumer")
    if cons:
        sps = cons["steps_per_s"]
        ours = sps["builder_with_verification"]
        floor = sps.get("floor_kafka_and_chdb_insert")
        met = cons["target_met"]
        if floor is not None:
            rows.append(
                (
                    "3. consumer verified steps/s, Kafka → chDB, one builder process",
                    _n(ours),
                    f"{_n(floor)} (floor: raw aiokafka + chDB insert of the same rows)",
                    f"{cons['ratio_vs_floor']:.3f}x",
                    f"≥ {cons['target_steps_per_s']:,}/s and ≥ "
                    f"{cons['target_ratio_vs_floor']:g}x floor",
                    f"{_n(met['steps_per_s'])} / {_n(met['ratio_vs_floor'])}",
                )
            )
        rows.append(
            (
                "3. consumer verified steps/s vs raw consume (reference)",
                _n(ours),
                f"{_n(sps['raw_aiokafka'])} (raw aiokafka, no decoding, no insert)",
                f"{cons['ratio_vs_raw']:.3f}x",
                "(reference, no target)",
                "-",
            )
        )
    e2e = r.get("e2e")
    if e2e:
        lat = e2e["to_clickhouse"]["latency_ms"]
        base = e2e["to_kafka_consumer_baseline"]["latency_ms"]
        asked = e2e["rate"]
        reached = e2e.get("achieved_rate", e2e["to_clickhouse"].get("achieved_rate"))
        target_rate = e2e.get("target_rate", 2_000)
        met = _n(e2e["target_met"])
        if asked < target_rate:
            met = f"- (run at {asked:,}/s, not {target_rate:,}/s)"
        rows.append(
            (
                f"4. completion → row queryable, {_n(reached)}/s reached of {asked:,}/s asked "
                "(p50 / p95, ms)",
                f"{_n(lat['p50'], 1)} / {_n(lat['p95'], 1)}",
                f"{_n(base['p50'], 1)} / {_n(base['p95'], 1)} (to a raw Kafka consumer)",
                f"{e2e['ratio_p95_vs_kafka_transit']:.1f}x (p95)",
                f"p95 ≤ 1,000 ms at {target_rate:,}/s",
                met,
            )
        )
    mem = _get(r, "memory", "builder")
    if mem:
        rows.append(
            (
                f"5. builder bytes per open run ({_n(mem['open_runs'])} runs, one step each, "
                "body excluded)",
                _n(mem["bytes_per_run_state_excluding_body"]),
                f"{_n(mem['raw_avro_bytes_per_message'])} (the message's Avro bytes)",
                f"{mem['ratio_state_vs_message_bytes']:.2f}x",
                "≤ 1,200 B",
                _n(mem["target_met"]),
            )
        )
    rss = _get(r, "memory", "rss")
    if rss:
        rows.append(
            (
                f"5. RSS over a steady {rss['seconds']:.0f} s run at "
                f"{rss['attempts_per_s_target']}/s (first → last, MB)",
                f"{rss['rss_mb_first']:.1f} → {rss['rss_mb_last']:.1f}",
                "-",
                f"{rss['rss_growth_mb_per_min_after_warmup']:+.2f} MB/min",
                "flat over 10 min",
                "10-min run: " + _n(rss["ten_minute_run"]),
            )
        )
    dec = _get(r, "sidecar", "decisions")
    if dec:
        ours = dec["ours"]["sequential"]["latency_ms"]
        kernel = _get(dec, "kernel", "sequential", "latency_ms")
        rows.append(
            (
                "7. mediated `POST /v1/evaluate` over loopback HTTP, our served sidecar, "
                "sequential (p50 / p99, ms)",
                f"{_n(ours['p50'], 2)} / {_n(ours['p99'], 2)}",
                f"{_n(kernel['p50'], 2)} / {_n(kernel['p99'], 2)} (the kernel's sidecar, "
                "ephemeral receipts)"
                if kernel
                else f"kernel not measured ({_get(dec, 'kernel', 'skipped')})",
                f"{dec['ratio_p50_ours_vs_kernel']:.2f}x (p50)" if kernel else "-",
                "(measured, no target)",
                "-",
            )
        )
    swt = _get(r, "sidecar", "worker_throughput")
    if swt:
        rows.append(
            (
                "7. activities/s on the dev server, interceptor via `HttpSidecar` to the served "
                "sidecar (no-op sink)",
                _n(swt["activities_per_s"]["http_sidecar"]),
                f"{_n(swt['activities_per_s']['without_interceptor'])} (no interceptor)",
                f"{swt['ratio_vs_without']:.2f}x",
                "≥ 0.9x",
                _n(swt["target_met"]),
            )
        )
    codec = _get(r, "micro", "codec")
    if codec:
        rows.append(
            (
                "6. codec encode records/s (Avro single-object vs json)",
                _n(codec["encode_per_s"]["avro"]),
                _n(codec["encode_per_s"]["json"]),
                f"{codec['encode_per_s']['ratio']:.2f}x",
                "(for the README)",
                "-",
            )
        )
        rows.append(
            (
                "6. codec decode records/s (schemas.decode / consumer's decode_plain vs json)",
                f"{_n(codec['decode_per_s']['avro_logical_types'])} / "
                f"{_n(codec['decode_per_s']['avro_plain_consumer_path'])}",
                _n(codec["decode_per_s"]["json"]),
                f"{codec['decode_per_s']['ratio']:.2f}x / "
                f"{codec['decode_per_s']['ratio_plain']:.2f}x",
                "(for the README)",
                "-",
            )
        )
    out = [
        "| benchmark | ours | baseline (same run) | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    out += [f"| {' | '.join(row)} |" for row in rows]
    missed = [row[0] for row in rows if "**no**" in row[5]]
    if missed:
        out += [
            "",
            'Targets missed in this run (what bounds each: "What bounds the targets that are '
            'missed"):',
            "",
            *(f"- {label}" for label in missed),
        ]
    return out


def _details(doc: dict[str, Any]) -> list[str]:
    r = doc.get("results", {})
    out: list[str] = []
    stages = _get(r, "consumer", "stages")
    if stages and "error" in stages:
        out += ["", f"Consumer stages not measured: {stages['error']}"]
    elif stages:
        out += [
            "",
            "Consumer stages, each measured alone in the same run (µs per step, one core):",
            "",
            "| decode (per batch) | Chio check + Ed25519 (per batch) | aggregate + row "
            "| chDB insert | sum | bound, steps/s |",
            "|---:|---:|---:|---:|---:|---:|",
            "| "
            + " | ".join(
                _n(stages["us_per_step"][k], 1)
                for k in ("decode", "verify", "aggregate_and_row", "insert")
            )
            + f" | {_n(stages['sum_us_per_step'], 1)}"
            + f" | {_n(stages['bound_steps_per_s_one_core'])} |",
            "",
            f"Without verification the same stages bound one core at "
            f"{_n(stages['bound_without_verify_steps_per_s'])} steps/s; the whole builder used "
            f"{_get(r, 'consumer', 'cores_busy', 'builder'):.2f} cores on average.",
        ]
    prod = r.get("producer")
    if prod:
        out += [
            "",
            "Producer, all variants (receipts/s, median; CPU µs per receipt):",
            "",
            "| variant | receipts/s | CPU µs/receipt |",
            "|---|---:|---:|",
        ]
        for k, v in prod["receipts_per_s"].items():
            out.append(f"| {k} | {_n(v)} | {_n(prod['cpu_us_per_receipt'][k], 1)} |")
    crypto = _get(r, "micro", "crypto")
    if crypto:
        nacl = crypto["pynacl"]
        cr = crypto.get("cryptography") or {}
        out += [
            "",
            f"Ed25519 on a {crypto['message_bytes']}-byte receipt body (ops/s):",
            "",
            "| library | sign | verify |",
            "|---|---:|---:|",
            f"| PyNaCl (used) | {_n(nacl['sign_per_s'])} | {_n(nacl['verify_per_s'])} |",
            f"| cryptography | {_n(cr.get('sign_per_s'))} | {_n(cr.get('verify_per_s'))} |",
        ]
    comp = _get(r, "micro", "compression")
    if comp:
        out += [
            "",
            f"Compression of a {comp['batch_records']}-receipt batch ({_n(comp['batch_bytes'])} "
            "bytes), aiokafka's codecs at Kafka's default levels:",
            "",
            "| codec | compressed bytes | size ratio | compress MB/s | decompress MB/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("lz4", "zstd"):
            c = comp[name]
            out.append(
                f"| {name} | {_n(c['compressed_bytes'])} | {c['size_ratio']:.2f}x | "
                f"{_n(c['compress_mb_per_s'])} | {_n(c['decompress_mb_per_s'])} |"
            )
    opt = _get(r, "micro", "optimisations")
    if opt:
        out += [
            "",
            "Schemas hot path, before → after (old code kept in `bench/_legacy.py`, same run):",
            "",
            "| function | before µs | after µs | speed-up |",
            "|---|---:|---:|---:|",
        ]
        for name, v in opt.items():
            out.append(
                f"| {name} | {v['before_us']:.2f} | {v['after_us']:.2f} | {v['speedup']:.2f}x |"
            )
    dec = _get(r, "sidecar", "decisions")
    if dec:
        out += [
            "",
            f"Sidecar decisions over HTTP ({dec['requests_per_block']} requests per block, "
            f"{dec['reps']} interleaved repetitions; latency in ms):",
            "",
            "| server | callers | p50 | p99 | mean | requests/s | verdicts |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for server in ("ours", "kernel", "kernel_durable"):
            node = dec.get(server, {})
            if "skipped" in node:
                out.append(f"| {server} | - | - | - | - | - | skipped: {node['skipped']} |")
                continue
            for block, b in node.items():
                if not isinstance(b, dict) or "latency_ms" not in b:
                    continue
                callers = "1" if block == "sequential" else block.rsplit("_", 1)[1]
                lat = b["latency_ms"]
                mix = ", ".join(f"{k} {v}" for k, v in sorted(b["mix"].items()))
                out.append(
                    f"| {server} | {callers} | {_n(lat['p50'], 2)} | {_n(lat['p99'], 2)} | "
                    f"{_n(lat['mean'], 2)} | {_n(b['requests_per_s'])} | {mix} |"
                )
    out += _native_rounds(r)
    if doc.get("errors"):
        out += ["", "Benchmarks that failed in this run:", ""]
        out += [f"- `{k}`: {v}" for k, v in doc["errors"].items()]
    return out


def _native_rounds(r: dict[str, Any]) -> list[str]:
    """The native core's pieces against the Python they replaced (or a library), same run."""
    rows: list[str] = []
    check = r.get("native_check")
    if check:
        us = check["us_per_step_cpu"]
        rows.append(
            f"| builder's Chio check + Ed25519 of a step | Python check + `verify_batch` "
            f"{_n(us['python_check_verify_batch'], 1)} | native `check_steps` "
            f"{_n(us['native_check_steps'], 1)} | {_x(check['ratio_cpu'])} |"
        )
    decode = _get(r, "native_decode", "decode")
    if decode:
        us = decode["us_per_item_cpu"]
        rows.append(
            f"| decode of a step message | fastavro {_n(us['fastavro'], 1)} | native "
            f"{_n(us['native'], 1)} | {_x(decode['ratio_cpu'])} |"
        )
    insert = _get(r, "native_decode", "insert")
    if insert:
        us = insert["us_per_item_cpu"]
        rows.append(
            f"| chDB insert of a step row | rows {_n(us['rows'], 1)} | columns "
            f"{_n(us['columns'], 1)} (not applied) | {_x(insert['ratio_cpu'])} |"
        )
    gate = _get(r, "native_gate", "after")
    if gate:
        rows.append(
            f"| step event Avro encode | fastavro {_n(gate['encode_fastavro_us'], 1)} | native "
            f"{_n(gate['encode_step_us'], 1)} | "
            f"{_x(gate['encode_fastavro_us'] / gate['encode_step_us'])} |"
        )
        rows.append(
            f"| gate CPU per attempt (no-op sink) | one PyNaCl signature "
            f"{_n(gate['yardstick_pynacl_sign_us'], 1)} | {_n(gate['gate_cpu_us_median'], 1)} | "
            f"{_x(gate['gate_ratio_vs_yardstick'])} the yardstick |"
        )
    if not rows:
        return []
    return [
        "",
        "Native core, µs of CPU per item, each against what it replaced in the same run:",
        "",
        "| piece | before / baseline | native | speed-up |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def render(doc: dict[str, Any]) -> str:
    """The generated markdown for ``doc``."""
    lines = [*_machine(doc), "", *_summary(doc), *_details(doc)]
    return "\n".join(lines) + "\n"


# (label, path into "results", True when higher is better)
_COMPARED: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (
        "gate CPU per attempt, no-op sink, median µs",
        ("interceptor", "attempt_cpu", "sinks", "none", "cpu_us", "p50"),
        False,
    ),
    (
        "gate CPU per attempt, `queued` streamer, median µs",
        ("interceptor", "attempt_cpu", "sinks", "streamer_queued", "cpu_us", "p50"),
        False,
    ),
    ("`sign_receipt` alone, µs", ("interceptor", "attempt_cpu", "floor_sign_receipt_us"), False),
    (
        "yardstick: one PyNaCl signature, µs",
        ("interceptor", "attempt_cpu", "yardstick", "cpu_us"),
        False,
    ),
    (
        "gate CPU per attempt, no-op sink, ratio to the yardstick",
        ("interceptor", "attempt_cpu", "sinks", "none", "ratio_cpu_vs_yardstick"),
        False,
    ),
    (
        "CPU per attempt with the outcome record, ratio to the yardstick",
        (
            "outcomes",
            "attempt_cost",
            "sinks",
            "none",
            "ratio_process_cpu_vs_yardstick",
            "with_outcomes",
        ),
        False,
    ),
    ("producer `queued`, receipts/s", ("producer", "receipts_per_s", "streamer_queued"), True),
    (
        "producer `queued`, ratio vs raw aiokafka",
        ("producer", "ratio_vs_raw_keyed", "streamer_queued"),
        True,
    ),
    (
        "producer `queued`, CPU µs per receipt",
        ("producer", "cpu_us_per_receipt", "streamer_queued"),
        False,
    ),
    (
        "producer `before_execute`, receipts/s",
        ("producer", "receipts_per_s", "streamer_before_execute"),
        True,
    ),
    (
        "producer `before_execute`, ratio vs raw aiokafka",
        ("producer", "ratio_vs_raw_keyed", "streamer_before_execute"),
        True,
    ),
    (
        "raw aiokafka (producer baseline), receipts/s",
        ("producer", "receipts_per_s", "raw_aiokafka_keyed"),
        True,
    ),
    (
        "consumer, steps/s with verification",
        ("consumer", "steps_per_s", "builder_with_verification"),
        True,
    ),
    (
        "consumer floor (raw aiokafka + chDB insert), steps/s",
        ("consumer", "steps_per_s", "floor_kafka_and_chdb_insert"),
        True,
    ),
    ("consumer, ratio vs the floor", ("consumer", "ratio_vs_floor"), True),
    ("consumer, ratio vs raw aiokafka", ("consumer", "ratio_vs_raw"), True),
    (
        "raw aiokafka (consumer baseline), messages/s",
        ("consumer", "steps_per_s", "raw_aiokafka"),
        True,
    ),
    ("end to end, attempts/s reached", ("e2e", "achieved_rate"), True),
    ("end to end, p50 ms", ("e2e", "to_clickhouse", "latency_ms", "p50"), False),
    ("end to end, p95 ms", ("e2e", "to_clickhouse", "latency_ms", "p95"), False),
    ("codec encode, records/s", ("micro", "codec", "encode_per_s", "avro"), True),
    (
        "sidecar evaluate over HTTP, ours, sequential p50 ms",
        ("sidecar", "decisions", "ours", "sequential", "latency_ms", "p50"),
        False,
    ),
    (
        "sidecar evaluate over HTTP, kernel, sequential p50 ms",
        ("sidecar", "decisions", "kernel", "sequential", "latency_ms", "p50"),
        False,
    ),
    (
        "activities/s via HttpSidecar, ratio vs no interceptor",
        ("sidecar", "worker_throughput", "ratio_vs_without"),
        True,
    ),
)


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A markdown table of the headline figures of two result files (before → after)."""
    lines = [
        f"Before: {before.get('started_at')} (load {_get(before, 'machine', 'loadavg_at_start')}); "
        f"after: {after.get('started_at')} (load {_get(after, 'machine', 'loadavg_at_start')}).",
        "",
        "| figure | before | after | change |",
        "|---|---:|---:|---:|",
    ]
    for label, path, higher in _COMPARED:
        b = _get(before.get("results", {}), *path)
        a = _get(after.get("results", {}), *path)
        if not isinstance(b, int | float) or not isinstance(a, int | float) or not b or not a:
            continue
        gain = a / b if higher else b / a
        digits = 2 if abs(a) < 10 else 1 if abs(a) < 100 else 0
        lines.append(
            f"| {label} | {_n(b, digits)} | {_n(a, digits)} | "
            f"{gain:.2f}x {'better' if gain >= 1 else 'worse'} |"
        )
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, doc: dict[str, Any]) -> None:
    """Replace the generated block of ``path`` (create or append it when missing)."""
    block = f"{BEGIN}\n{render(doc)}{END}"
    text = path.read_text("utf-8") if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json [MARKDOWN]``, or ``--compare BEFORE AFTER``."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write(__doc__ or "")
        return 2
    if args[0] == "--compare" and len(args) == 3:
        docs = [json.loads(Path(a).read_text("utf-8")) for a in args[1:]]
        sys.stdout.write(compare(docs[0], docs[1]))
        return 0
    doc = json.loads(Path(args[0]).read_text("utf-8"))
    if len(args) > 1:
        update_markdown(Path(args[1]), doc)
    else:
        sys.stdout.write(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
