"""The benchmarks run at a small size on the session's real stack and produce sane JSON.

Not timed: these tests check that every benchmark runs, measures our path and its baseline, and
reports positive rates and ratios; the numbers themselves belong to ``make bench``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from bench._common import Size
from bench._env import Env
from bench.report import BEGIN, END, compare, render, update_markdown
from bench.run import SECTIONS, run_all


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
async def results(
    kafka_bootstrap: str, temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    env = Env(
        kafka_bootstrap=kafka_bootstrap,
        temporal_client=temporal_client,
        scratch=tmp_path_factory.mktemp("bench"),
    )
    doc = await run_all(Size.of("small"), list(SECTIONS), env=env)
    # What the runner writes must survive a JSON round trip.
    decoded: dict[str, Any] = json.loads(json.dumps(doc))
    return decoded


@pytest.mark.integration
def test_every_benchmark_ran(results: dict[str, Any]) -> None:
    assert results["errors"] == {}
    assert set(results["results"]) == set(SECTIONS)
    machine = results["machine"]
    assert machine["cpu_model"]
    assert machine["cpus_visible"] >= 1
    assert machine["ram_bytes"] > 0
    assert machine["libraries"]["fastavro"] != "not installed"


@pytest.mark.integration
def test_interceptor_rates_and_ratios(results: dict[str, Any]) -> None:
    r = results["results"]["interceptor"]
    gate = r["attempt_cpu"]
    assert _positive(gate["floor_sign_receipt_us"])
    # The yardstick: one PyNaCl signature of the bytes the gate signed, measured in this run.
    yard = gate["yardstick"]
    assert _positive(yard["cpu_us"])
    assert yard["message_bytes"] > 64
    assert len(yard["cpu_us_per_block"]) >= 2
    assert gate["target_ratio_vs_yardstick"] == 2.0
    assert set(gate["sinks"]) == {"none", "streamer_queued", "streamer_before_execute"}
    for name, sink in gate["sinks"].items():
        assert _positive(sink["cpu_us"]["p50"])
        assert sink["cpu_us"]["p99"] >= sink["cpu_us"]["p50"]
        assert _positive(sink["ratio_cpu_vs_floor"])
        assert _positive(sink["gate_attempts_per_s"])
        assert _positive(sink["yardstick_cpu_us"])
        assert _positive(sink["ratio_cpu_vs_yardstick"])
        # The ratio divides the median of the samples (p50 is the nearest sample to it).
        assert sink["ratio_cpu_vs_yardstick"] == pytest.approx(
            sink["cpu_us"]["p50"] / sink["yardstick_cpu_us"], rel=0.05
        )
        if name == "streamer_before_execute":  # an upper bound: judged on the other sinks
            assert sink["target_met"] is None
        else:
            assert isinstance(sink["target_met"], bool)
    wt = r["worker_throughput"]
    assert all(_positive(v) for v in wt["activities_per_s"].values())
    assert set(wt["ratio_vs_without"]) == {"queued", "before_execute"}
    assert all(_positive(v) for v in wt["ratio_vs_without"].values())
    # The interceptor really gated the activities: one allowed receipt per activity.
    expected = wt["workflows"] * wt["activities_per_workflow"]
    assert wt["receipts_allowed_last_rep"]["queued"] == expected
    assert wt["receipts_allowed_last_rep"]["before_execute"] == expected


@pytest.mark.integration
def test_outcome_cost_against_the_yardstick(results: dict[str, Any]) -> None:
    cost = results["results"]["outcomes"]["attempt_cost"]
    assert cost["target_ratio_vs_yardstick"] == 2.6
    assert set(cost["sinks"]) == {"none", "streamer_queued"}
    for name, sink in cost["sinks"].items():
        assert _positive(sink["yardstick_cpu_us"])
        for key in ("ratio_path_cpu_vs_yardstick", "ratio_process_cpu_vs_yardstick"):
            assert set(sink[key]) == {"decision_only", "with_outcomes"}
            assert all(_positive(v) for v in sink[key].values())
        # Judged on the whole process with the no-op sink; the streamer's row is for reading.
        judged = sink["target_met"]
        assert isinstance(judged, bool) if name == "none" else judged is None


@pytest.mark.integration
def test_producer_and_consumer_rates(results: dict[str, Any]) -> None:
    prod = results["results"]["producer"]
    assert all(_positive(v) for v in prod["receipts_per_s"].values())
    assert set(prod["ratio_vs_raw_keyed"]) == {"streamer_queued", "streamer_before_execute"}
    assert all(_positive(v) for v in prod["ratio_vs_raw_keyed"].values())
    cons = results["results"]["consumer"]
    assert set(cons["steps_per_s"]) == {
        "builder_with_verification",
        "floor_kafka_and_chdb_insert",
        "raw_aiokafka",
    }
    assert all(_positive(v) for v in cons["steps_per_s"].values())
    assert _positive(cons["ratio_vs_raw"])
    assert _positive(cons["ratio_vs_floor"])
    assert cons["ratio_vs_floor"] == pytest.approx(
        cons["steps_per_s"]["builder_with_verification"]
        / cons["steps_per_s"]["floor_kafka_and_chdb_insert"]
    )
    assert set(cons["target_met"]) == {"steps_per_s", "ratio_vs_floor"}
    assert cons["target_steps_per_s"] == 20_000
    assert cons["target_ratio_vs_floor"] == 0.3
    assert cons["rows_written_last_rep"] == cons["steps"]
    # The floor inserted one row per step message, into a table that holds them (and the
    # warm-up run's rows).
    assert cons["floor_rows_inserted_last_rep"] == cons["steps"]
    assert cons["floor_rows_in_table_last_rep"] >= cons["steps"]
    assert cons["floor_inserts_last_rep"] >= 1
    stages = cons["stages"]
    assert all(_positive(v) for v in stages["us_per_step"].values())
    assert _positive(stages["bound_steps_per_s_one_core"])


@pytest.mark.integration
def test_native_core_rates(results: dict[str, Any]) -> None:
    native = results["results"]["native"]
    verify = native["verify"]
    assert set(verify["per_cpu_second"]) == {
        "pynacl_one_at_a_time",
        "native_one_at_a_time",
        "native_batch_64",
        "native_batch_256",
        "native_batch_256_two_threads",
        "native_batch_256_one_bad",
    }
    assert all(_positive(v) for v in verify["per_cpu_second"].values())
    assert verify["ratio_to_pynacl_cpu"]["pynacl_one_at_a_time"] == 1.0
    builder = native["builder_verify"]
    assert all(_positive(v) for v in builder["us_per_step_cpu"].values())
    assert _positive(builder["ratio_cpu"])
    assert _positive(native["sign"]["ratio_cpu"])
    assert _positive(native["receipts"]["verify_kernel_receipt"]["ratio_cpu"])


@pytest.mark.integration
def test_native_pieces_against_what_they_replaced(results: dict[str, Any]) -> None:
    r = results["results"]
    check = r["native_check"]
    assert set(check["us_per_step_cpu"]) == {
        "python_check_verify_batch",
        "native_check_steps",
        "verify_batch_only",
    }
    assert all(_positive(v) for v in check["us_per_step_cpu"].values())
    assert _positive(check["ratio_cpu"])
    decode = r["native_decode"]
    assert set(decode["decode"]["us_per_item_cpu"]) == {"fastavro", "native"}
    assert _positive(decode["decode"]["ratio_cpu"])
    assert set(decode["insert"]["us_per_item_cpu"]) == {"rows", "columns"}
    gate = r["native_gate"]["after"]
    for key in ("yardstick_pynacl_sign_us", "gate_cpu_us_median", "encode_step_us"):
        assert _positive(gate[key])
    assert _positive(gate["gate_ratio_vs_yardstick"])
    assert "Native core, µs of CPU per item" in render(results)


@pytest.mark.integration
def test_end_to_end_and_memory(results: dict[str, Any]) -> None:
    e2e = results["results"]["e2e"]
    assert e2e["rate"] == Size.of("small").e2e_target_rate
    assert e2e["target_rate"] == 2_000
    assert _positive(e2e["achieved_rate"])
    assert isinstance(e2e["rate_reached"], bool)
    ours = e2e["to_clickhouse"]
    assert _positive(ours["completed_rate"])
    assert ours["seconds_until_last_finished"] >= e2e["seconds"] * 0.9
    assert ours["attempts"] > 0
    assert ours["rows_seen"] == ours["attempts"]
    assert _positive(ours["latency_ms"]["p50"])
    assert ours["latency_ms"]["p95"] >= ours["latency_ms"]["p50"]
    assert _positive(e2e["ratio_p95_vs_kafka_transit"])
    mem = results["results"]["memory"]
    assert _positive(mem["builder"]["bytes_per_run_state_excluding_body"])
    assert _positive(mem["builder"]["ratio_state_vs_message_bytes"])
    assert _positive(mem["rss"]["rss_mb_last"])
    assert mem["rss"]["ten_minute_run"] is False


def _check_decisions(block: dict[str, Any], blocks: tuple[str, ...]) -> None:
    for name in blocks:
        b = block[name]
        assert _positive(b["latency_ms"]["p50"])
        assert _positive(b["latency_ms"]["mean"])
        assert b["latency_ms"]["p99"] >= b["latency_ms"]["p50"]
        assert _positive(b["requests_per_s"])
        assert sum(b["mix"].values()) == b["latency_ms"]["n"]


@pytest.mark.integration
def test_sidecar_decisions_and_worker_throughput(results: dict[str, Any]) -> None:
    sc = results["results"]["sidecar"]
    dec = sc["decisions"]
    _check_decisions(dec["ours"], ("sequential", "concurrency_8"))
    # Every request is in scope: our sidecar allows all of them.
    assert dec["ours"]["sequential"]["all_allow"]
    assert dec["ours"]["concurrency_8"]["all_allow"]
    kernel = dec["kernel"]
    if "skipped" in kernel:  # the kernel's sidecar is not built: recorded, not an error
        assert kernel["skipped"]
        assert "skipped" in dec["kernel_durable"]
    else:
        _check_decisions(kernel, ("sequential", "concurrency_8"))
        assert kernel["sequential"]["all_allow"]
        assert kernel["concurrency_8"]["all_allow"]
        _check_decisions(dec["kernel_durable"], ("sequential",))
        assert _positive(dec["ratio_p50_ours_vs_kernel"])
    wt = sc["worker_throughput"]
    assert all(_positive(v) for v in wt["activities_per_s"].values())
    assert _positive(wt["ratio_vs_without"])
    # The interceptor really decided through the served sidecar: one allow per activity.
    assert wt["receipts_allowed_last_rep"] == wt["workflows"] * wt["activities_per_workflow"]


@pytest.mark.integration
def test_policy_guards_cost(results: dict[str, Any]) -> None:
    pol = results["results"]["policy"]
    inproc = pol["in_process"]
    for config in ("baseline", "constraints", "cedar_50"):
        assert _positive(inproc[config]["decision_us"])
        assert _positive(inproc[config]["decision_ratio"])
        assert inproc[config]["first_verdict"] == {"allow": 1}
    assert _positive(inproc["cedar_50_parse"]["ratio"])
    at = pol["http"]["at_500_per_s"]
    for config in ("baseline", "constraints", "cedar_50"):
        assert at[config]["all_allow"]  # every call is in scope and satisfies every guard
        assert _positive(at[config]["p50_ratio"])
        assert _positive(at[config]["achieved_rate_per_s"])
    assert "skipped" in at["kernel"] or at["kernel"]["all_allow"]
    assert pol["budget"]["skipped"]


@pytest.mark.integration
def test_micro_benchmarks(results: dict[str, Any]) -> None:
    micro = results["results"]["micro"]
    assert _positive(micro["codec"]["encode_per_s"]["ratio"])
    assert _positive(micro["codec"]["decode_per_s"]["ratio"])
    assert _positive(micro["crypto"]["pynacl"]["verify_per_s"])
    comp = micro["compression"]
    assert comp["lz4"]["compressed_bytes"] < comp["batch_bytes"]
    assert comp["zstd"]["compressed_bytes"] < comp["batch_bytes"]
    assert all(_positive(v["speedup"]) for v in micro["optimisations"].values())


@pytest.mark.integration
def test_markdown_block_is_replaced_in_place(results: dict[str, Any], tmp_path: Path) -> None:
    table = render(results)
    assert "| benchmark | ours | baseline (same run) | ratio | target | met |" in table
    assert "(floor: raw aiokafka + chDB insert of the same rows)" in table
    assert "median ≤ 2x yardstick" in table
    assert "whole process ≤ 2.6x yardstick" in table
    assert "p95 ≤ 1,000 ms at 2,000/s" in table
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{BEGIN}\nstale-table\n{END}\n\nprose after\n")
    update_markdown(doc, results)
    text = doc.read_text()
    assert "stale-table" not in text
    assert text.startswith("# Benchmarks\n\nprose before")
    assert text.rstrip().endswith("prose after")
    assert text.count(BEGIN) == 1


@pytest.mark.integration
def test_compare_lists_every_headline_figure_of_both_runs(results: dict[str, Any]) -> None:
    slower = json.loads(json.dumps(results))
    slower["results"]["producer"]["receipts_per_s"]["streamer_queued"] /= 2
    table = compare(slower, results)
    assert "| figure | before | after | change |" in table
    producer_row = next(
        line for line in table.splitlines() if "producer `queued`, receipts/s" in line
    )
    assert producer_row.endswith("| 2.00x better |")
    # Every figure the smoke run produced has its row (the memory section has none).
    assert table.count("\n| ") >= 12


@pytest.mark.integration
def test_watcher_rate_and_memory(results: dict[str, Any]) -> None:
    r = results["results"]["watcher"]
    rate = r["rate"]
    assert _positive(rate["server_closes_per_s"])
    assert _positive(rate["watcher_runs_per_s"])
    assert _positive(rate["ratio_vs_server"])
    for m in r["memory"]:
        assert m["pages"] == math.ceil(m["runs"] / 500)
        assert _positive(m["peak_bytes"])
        assert _positive(m["peak_bytes_holding_listing"])
        # The dedup set ends at the runs of one lag window, never the whole listing.
        assert m["dedup_ids_after"] == m["runs_in_window"]
