"""`circatt bench`: the report files of a tiny --quick run, the correctness guard, the cost formulas, bad options."""

from __future__ import annotations

import csv
import json
import math
import weakref

import pytest
import torch
from typer.testing import CliRunner

from circatt_cli import bench, peers
from circatt_cli.app import app
from circatt_cli.peers import Case, CirculantPeer
from circatt_cli.timing import measure
from circatt_ops import backends

CPU_PEERS = {"cpu", "reference", "unfused", "csr", "sdpa"}
TINY = ["--quick", "--sizes", "16,24", "--windows", "5", "--repeat", "3", "--warmup", "1"]


def _cpu_kernels_build() -> bool:
    try:
        backends.resolve("cpu", torch.device("cpu"))
    except Exception:  # no compiler, or a kernel source that does not build right now
        return False
    return True


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny quick bench, written as JSON, CSV and PNG."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "b.json", "csv": out / "b.csv", "plot": out / "b.png"}
    args = ["bench", "--device", "cpu", *TINY, "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["plot"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return paths, json.loads(paths["json"].read_text()), result.output


def test_a_run_cut_off_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The JSON and CSV are rewritten after every group: a bench killed mid-way (a device call's time
    limit) still leaves the groups it finished, marked incomplete."""
    real, calls = bench.bench_group, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cut off")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_group", dies_on_the_second)
    paths = [tmp_path / "b.json", tmp_path / "b.csv"]
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *TINY, "--json", str(paths[0]), "--csv", str(paths[1])])
    assert isinstance(result.exception, RuntimeError) and len(calls) == 2
    doc = json.loads(paths[0].read_text())
    assert doc["meta"]["complete"] is False and doc["rows"]
    assert len({(r["case"], r["shape"], r["op"], r["mode"]) for r in doc["rows"]}) == 1  # the first group only
    assert len(list(csv.DictReader(paths[1].open()))) == len(doc["rows"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "b.json"]  # no temporary left behind


def test_json_has_every_cpu_peer_checked_and_timed(report):
    _, doc, _ = report
    op_rows = [r for r in doc["rows"] if r["section"] == "op"]
    assert {r["impl"] for r in op_rows} >= CPU_PEERS | {"flex"}
    for r in op_rows:
        if r["impl"] == "flex":
            assert r["status"] == "skipped" and "cuda" in r["note"]
        elif r["impl"] in ("cpu", "unfused") and not _cpu_kernels_build():
            assert r["status"] in ("ok", "skipped") and (r["status"] == "ok" or "unavailable" in r["note"])
        elif r["impl"] in CPU_PEERS:
            assert r["status"] == "ok", r
            assert r["max_rel_err"] <= bench.TOLERANCE[torch.float32]
    assert {r["op"] for r in op_rows if r["impl"] == "csr"} == {"apply"}
    assert {r["op"] for r in op_rows if r["impl"] == "sdpa"} == {"attention"}
    assert {r["op"] for r in op_rows if r["impl"] == "unfused"} == {"attention"}
    assert {(r["mode"], r["pixels"]) for r in op_rows} == {(m, n) for m in bench.MODES for n in (256, 576)}


def test_json_fields_are_sane(report):
    _, doc, _ = report
    assert doc["meta"]["device"].startswith("CPU") and doc["meta"]["torch"] == torch.__version__
    assert doc["meta"]["complete"] is True
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"]["float32"] > 0
    timed = [r for r in doc["rows"] if r["median_ms"] is not None]
    assert timed
    for r in timed:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["runs"] >= 1
        if r["section"] == "op":
            assert r["flops"] > 0 and r["bytes"] > 0 and r["x_floor"] > 0
            assert math.isclose(r["tflops"], r["flops"] / r["median_ms"] / 1e9, rel_tol=1e-9)
    peers = [r for r in timed if r["section"] == "op" and r["impl"] not in ("cpu", "bccb")]
    if _cpu_kernels_build():
        assert all(r["ours_speedup"] > 0 for r in peers)


def test_terminal_table_and_model_rows(report):
    _, doc, output = report
    assert "median ms" in output and "measured ceilings" in output
    model = [r for r in doc["rows"] if r["section"] == "model"]
    assert model and all(r["status"] in ("ok", "skipped") for r in model)


def test_csv_matches_json(report):
    paths, doc, _ = report
    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    assert {"impl", "status", "median_ms", "tflops", "gbps", "x_floor", "ours_speedup"} <= set(rows[0])


def test_plot_is_a_png(report):
    paths, _, _ = report
    from PIL import Image

    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ops", "nonsense"], "nonsense"),
        (["--shapes", "S9"], "S9"),
        (["--sizes", "0"], "not a size"),
        (["--windows", "8"], "odd window"),
        (["--dtype", "bfloat16", "--device", "cpu"], "CUDA-only"),
        (["--tf32", "--device", "cpu"], "TF32 is a CUDA matmul mode"),
        (["--device", "tpu"], "device"),
        (["--repeat", "0"], "at least 1"),
        (["--plot", "out.jpg"], "PNG"),
        (["--json", "/nonexistent-folder/x.json"], "does not exist"),
        (["--shapes", "sweep", "--sizes", "16", "--windows", "35"], "no shape left"),
        (["--impls", "flex", "--ops", "apply"], "none of flex implements apply"),
        (["--impls", "flex", "--ops", "attention", "--device", "cpu"], "flex runs on cuda only"),
    ],
)
def test_bad_options_are_usage_errors(args, message):
    result = CliRunner().invoke(app, ["bench", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_baseline_run_shows_each_row_against_the_same_row_there(report, tmp_path):
    """--baseline: a row timed in both runs gets the baseline's median and the ratio; a row the
    baseline lacks gets neither; one summary line says how many matched."""
    base = report[1]
    dropped = next(r for r in base["rows"] if r["impl"] == "cpu" and r["median_ms"])
    base["rows"] = [r for r in base["rows"] if r is not dropped]
    (tmp_path / "base.json").write_text(json.dumps(base))
    args = ["bench", "--device", "cpu", *TINY, "--baseline", str(tmp_path / "base.json"), "--json", str(tmp_path / "now.json")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "vs base" in result.output and "rows matched; ours" in result.output
    def key(r: dict) -> tuple:
        return tuple(r[k] for k in ("section", "case", "shape", "op", "mode", "dtype", "impl"))

    before = {key(r): r["median_ms"] for r in base["rows"] if r["median_ms"]}
    rows = json.loads((tmp_path / "now.json").read_text())["rows"]
    compared = [r for r in rows if r["vs_baseline"] is not None]
    assert compared
    for r in compared:
        assert r["baseline_ms"] == before[key(r)] and r["vs_baseline"] == pytest.approx(r["baseline_ms"] / r["median_ms"])
    assert [r["vs_baseline"] for r in rows if key(r) == key(dropped)] == [None]


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read"), ("{not json", "is not JSON"), ('{"meta": {}}', "is not the JSON of `circatt bench")],
)
def test_a_baseline_that_is_not_a_bench_json_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *TINY, "--baseline", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_absent_is_an_error_not_a_fallback():
    result = CliRunner().invoke(app, ["bench", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


class _OffByOne(CirculantPeer):
    """A broken implementation: the right answer plus one."""

    def __init__(self) -> None:
        super().__init__("reference")
        self.name = "broken"

    def run(self, op, case, *inputs):
        return super().run(op, case, *inputs) + 1


@pytest.mark.parametrize("mode", bench.MODES)
def test_a_wrong_implementation_is_marked_and_not_timed(mode):
    settings = bench._settings(
        device="cpu", ops="attention", shapes=None, sizes=None, windows=None, dtype=None, modes=mode, impls=None,
        model_sizes=None, repeat=3, warmup=1, seed=0, quick=True, tf32=False,
    )
    group = bench.Group(Case("t", 1, 8, 9, 7, 3, 2, "distance"), "attention", mode, torch.float32)
    rows = bench.bench_group(group, [CirculantPeer("reference"), _OffByOne()], settings, ceilings=None)
    status = {r.impl: r for r in rows}
    assert status["reference"].status == "ok" and status["reference"].median_ms is not None
    assert status["broken"].status == "WRONG" and status["broken"].median_ms is None


def test_cost_formulas():
    case = Case("t", 2, 8, 6, 5, 3, 2, "dot")
    R, nkc = 2 * 2 * 30 * 9, 2 * 30 * 9 * 8
    assert bench.op_cost("similarity", case, 4, False) == (2 * nkc, (2 * 2 * 8 * 30 + R) * 4)
    assert bench.op_cost("apply", case, 2, False) == (2 * nkc, (R + 2 * 2 * 8 * 30) * 2)
    fwd, fwd_bwd = bench.op_cost("attention", case, 4, False), bench.op_cost("attention", case, 4, True)
    assert fwd == (2 * nkc + 5 * R + 2 * nkc, 4 * 2 * 8 * 30 * 4)
    assert fwd_bwd[0] > 2 * fwd[0] and fwd_bwd[1] == 3 * fwd[1]


def test_measure_rotates_and_respects_the_budget():
    calls = []
    timing = measure([lambda i=i: calls.append(i) for i in range(3)], torch.device("cpu"), warmup=2, repeat=7, budget_s=10.0)
    assert timing.runs == 7 and calls[:4] == [0, 1, 2, 0] and len(calls) == 9
    assert timing.min_s <= timing.median_s <= timing.max_s and timing.peak_bytes is None


def test_rounding_on_an_exactly_zero_reference_output_is_not_wrong():
    """At window 1 the q and k gradients of attention are exactly zero in the reference."""
    zero, big = torch.zeros(4), torch.ones(4)
    assert bench.max_rel_err([big, zero + 6e-7], [big, zero]) < 1e-3
    assert bench.max_rel_err([big, zero + 0.1], [big, zero]) > bench.TOLERANCE[torch.float32]


def test_peer_constants_are_kept_for_the_latest_shape_only():
    """An N x N mask or a CSR pattern is built once per shape and freed when the bench moves to the next shape."""
    cpu = torch.device("cpu")
    for build, pick in ((peers.dense_mask, lambda m: m), (peers.csr_pattern, lambda p: p[1])):
        first = weakref.ref(pick(build(6, 5, 3, cpu)))
        assert pick(build(6, 5, 3, cpu)) is first()  # built once
        build(7, 5, 3, cpu)
        assert first() is None  # the previous shape's is gone
