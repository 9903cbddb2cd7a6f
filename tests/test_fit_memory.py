"""benchmarks/fit_memory.py: the search (two short points, the line, the measured
maximum, the step down), the plan, the table and the figure on synthetic points,
and one tiny configuration end to end (a fresh process per measurement, the CSV,
resuming, the table) with a tiny budget."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
fm = pytest.importorskip("fit_memory")

GiB = fm.GiB


def linear(a: float, b: float):
    """A row whose peak is a + b T (GiB)."""
    return lambda T: a + b * T


def search(peak, budget: float, **kwargs) -> tuple[dict, list[int]]:
    points, order = {}, []
    while True:
        T = fm.next_length(points, budget, **kwargs)
        if T is None:
            return points, order
        order.append(T)
        points[T] = peak(T)


# ----------------------------------------------------------------------------- the search


def test_linear_memory_is_found_with_two_points_and_one_measured_maximum():
    peak = linear(0.1, 1e-4)                       # budget 1 GiB: T = 9000 -> 8960
    points, order = search(peak, 1.0, t1=512, t2=1024)
    assert order == [512, 1024, 8960]
    r = _result(points, 1.0)
    assert r.max_tokens == 8960 and r.state == "predicted" and r.predicted == 8960


def test_a_prediction_that_does_not_fit_steps_down():
    # Convex: the line through the short points overshoots; the secant through the point
    # that fitted and the one that did not lands on the answer, measured.
    peak = lambda T: 0.1 + 1e-4 * T + 2e-9 * T * T          # noqa: E731
    points, order = search(peak, 1.0, t1=512, t2=1024)
    best = max(T for T in range(256, 20000, 256) if peak(T) <= 1.0)
    r = _result(points, 1.0)
    assert r.max_tokens == best and peak(best) <= 1.0
    assert order[:2] == [512, 1024] and order[2] > best and peak(order[2]) > 1.0
    assert len(order) <= 5


def test_short_points_over_the_budget_halve_down():
    peak = linear(0.0, 1e-3)                       # budget 0.3: 300 tokens -> 256
    points, order = search(peak, 0.3, t1=512, t2=1024)
    assert order == [512, 256]
    assert _result(points, 0.3).max_tokens == 256
    # Nothing fits at all.
    points, order = search(linear(1.0, 1e-3), 0.3, t1=512, t2=1024)
    assert order == [512, 256] and _result(points, 0.3).max_tokens is None


def test_killed_points_count_as_over_and_caps_hold():
    points = {512: 0.2, 1024: 0.4, 4096: math.inf}
    assert fm.next_length(points, 1.0) == 2560     # the line says 2560, below the killed 4096
    # A killed point with no value above the line's prediction: bisect.
    assert fm.next_length({512: 0.2, 1024: 0.4, 2048: math.inf}, 1.0) == 1536
    # The watchdog's value (a lower bound of the peak) is a point of the line.
    rows = _rows("tiny-llama", "lora", "hf", {512: 0.2, 1024: 0.4})
    rows.append(dict(rows[-1], tokens=8192, status="over", peak_gib=2.0))
    assert fm.points_of(rows, "tiny-llama", "lora", "hf")[8192] == 2.0
    points = {512: 0.1, 1024: 0.1 + 1e-9}
    assert fm.next_length(points, 1.0, max_tokens=4096) == 4096
    points[4096] = 0.2
    assert fm.next_length(points, 1.0, max_tokens=4096) is None


def test_max_runs_bounds_a_row():
    peak = lambda T: 0.1 + 1e-4 * T + 2e-9 * T * T          # noqa: E731
    _, order = search(peak, 1.0, t1=512, t2=1024, max_runs=3)
    assert len(order) == 3


def _rows(model, mode, loss, points, step_s=10.0):
    return [dict(model=model, mode=mode, loss=loss, tokens=T, status="ok" if math.isfinite(p)
                 else "over", peak_gib=p if math.isfinite(p) else None, baseline_gib=3.0,
                 model_gib=2.0, step_cpu_s=step_s * T / 1024, run_cpu_s=step_s * T / 1024 + 30.0)
            for T, p in points.items()]


def _result(points, budget):
    return fm.row_result(_rows("tiny-llama", "lora", "hf", points), "tiny-llama", "lora", "hf",
                         budget)


def test_plan_uses_measured_points_and_times():
    rows = _rows("qwen3-0.6b", "lora", "hf", {512: 1.0, 1024: 2.0})
    runs = fm.plan(rows, ["qwen3-0.6b"], ["lora"], ["hf", "fastirl-iq"], 3.0)
    hf = [r for r in runs if r["loss"] == "hf"]
    assert [(r["tokens"], r["kind"]) for r in hf] == [(1536, "max")] and hf[0]["memory_known"]
    # Its time: the overhead (30 s) + flops scaled by the rate measured on the same row.
    rate = fm.step_flops("qwen3-0.6b", "lora", "hf", 1024) / 10.0
    assert hf[0]["seconds"] == pytest.approx(30 + fm.step_flops("qwen3-0.6b", "lora", "hf", 1536)
                                             / rate, rel=0.05)
    iq = [r for r in runs if r["loss"] == "fastirl-iq"]
    assert [(r["kind"], r["tokens"]) for r in iq][:2] == [("short", 2048), ("short", 4096)]
    assert iq[-1]["kind"] == "max" and not iq[-1]["memory_known"] and iq[-1]["tokens"] > 4096
    assert all(r["timed"] for r in runs)           # the rate of the same model and mode


def test_flops_grow_quadratically_only_on_full_attention_layers():
    f = lambda m, T: fm.step_flops(m, "lora", "hf", T)       # noqa: E731
    # Gemma-3: 22 of 26 layers attend to a 512 window, so it is closer to linear than Qwen3.
    assert f("gemma-3-1b", 16384) / f("gemma-3-1b", 8192) < f("qwen3-0.6b", 16384) / f(
        "qwen3-0.6b", 8192)
    assert fm.layer_types(fm.MODELS["gemma-3-1b"]["values"]).count("full") == 4


def test_published_configurations_build_as_transformers_configs():
    pytest.importorskip("transformers")
    for name, params in (("llama-3.2-1b", 1.24e9), ("qwen3-0.6b", 0.60e9),
                         ("gemma-3-1b", 1.00e9)):
        config = fm.model_config(name)
        d = fm._dims(name)
        total = d["L"] * d["layer_params"] + d["V"] * d["H"]      # tied embeddings
        assert total == pytest.approx(params, rel=0.03), name
        assert config.tie_word_embeddings and config.vocab_size == fm.MODELS[name]["values"][
            "vocab_size"]
    gemma = fm.model_config("gemma-3-1b")
    assert gemma.sliding_window == 512 and gemma.final_logit_softcapping is None
    assert gemma.layer_types.count("full_attention") == 4


def test_table_marks_open_rows():
    rows = (_rows("qwen3-0.6b", "lora", "hf", {512: 1.0, 1024: 2.0, 1536: 2.9, 1792: 3.4})
            + _rows("qwen3-0.6b", "lora", "fastirl-iq", {512: 0.2}))
    text = fm.table(rows, ["qwen3-0.6b"], ["lora"], ["hf", "fastirl-iq"], 3.0)
    line = [ln for ln in text.splitlines() if ln.startswith("| Qwen3-0.6B")][0]
    assert "| 1,536 |" in line and "| 512* |" in line


# ----------------------------------------------------------------------------- end to end


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("peft") is None,
                    reason="needs transformers and peft")
def test_tiny_model_end_to_end(tmp_path, capsys):
    csv_path = tmp_path / "fit.csv"
    common = ["--models", "tiny-llama", "--modes", "lora", "--losses", "hf", "--csv",
              str(csv_path), "--t1", "256", "--t2", "512", "--budget", "0.08", "--max-runs", "4"]
    assert fm.main(common + ["--plan"]) == 0
    plan = capsys.readouterr().out
    assert "tiny-llama" in plan and "estimated total" in plan
    assert fm.main(common + ["--short-only"]) == 0          # the two short points only
    assert [r["tokens"] for r in fm.read_rows(csv_path)] == [256, 512]
    assert fm.main(common) == 0                             # the sweep goes on from them
    rows = fm.read_rows(csv_path)
    assert [r["tokens"] for r in rows][:2] == [256, 512]
    assert all(r["status"] == "ok" for r in rows), rows
    assert 2 < len(rows) <= 4
    points = fm.points_of(rows, "tiny-llama", "lora", "hf")
    # Memory grows with T, and the reported maximum was measured within the budget.
    assert points[512] > points[256] > 0
    r = fm.row_result(rows, "tiny-llama", "lora", "hf", 0.08, t1=256, t2=512, max_runs=4)
    assert r.max_tokens and r.max_tokens > 512 and r.max_tokens in points
    assert points[r.max_tokens] <= 0.08 and r.state != "open"
    assert rows[0]["baseline_gib"] > 0 and rows[0]["model_gib"] > 0 and rows[0]["step_s"] > 0
    # Resuming measures nothing more; the plan has nothing left; the table has the maximum.
    capsys.readouterr()
    assert fm.main(common) == 0
    assert len(fm.read_rows(csv_path)) == len(rows)
    assert fm.main(common + ["--plan", "--table", "--plot", str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    assert "0 runs" in out
    assert f"| {r.max_tokens:,} |" in out and "tiny Llama" in out
    assert (tmp_path / "fit.png").stat().st_size > 0
