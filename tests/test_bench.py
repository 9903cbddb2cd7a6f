"""The ``fastirl-bench`` command at a tiny shape (fast), its CSV, and its errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastirl.bench import main, memory, report, variants, worker

TINY = ["--batch", "2", "--seq", "16", "--hidden", "16", "--vocab", "64"]
ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_csv_table_and_plots(tmp_path):
    """The real command line (python -m fastirl.bench), each variant in its own worker."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "fastirl.bench", *TINY, "--variants",
         "naive,fastirl-torch,matmul-floor", "--repeats", "3", "--sweep", "tokens",
         "--sweep-tokens", "32", "--sweep-variants", "naive,fastirl-torch", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    text = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100%" in proc.stderr            # the progress bar
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    main_rows = {r["variant"]: r for r in rows if r["sweep"] == "main"}
    assert list(main_rows) == ["naive", "fastirl-torch", "matmul-floor"]
    for name, r in main_rows.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert float(r["fb_ms_median"]) > 0 and float(r["fwd_ms_median"]) > 0
        assert float(r["fb_ms_min"]) <= float(r["fb_ms_median"]) <= float(r["fb_ms_max"])
        assert len(r["fb_ms_all"].split(";")) == 3
        assert float(r["peak_mib"]) >= 0
        assert r["tokens"] == "32" and r["vocab"] == "64" and r["dtype"] == "float32"
        assert r["device"] == "cpu" or r["device"] == "cuda"
        for col in ("torch_version", "cpu_model", "git_rev", "device_name", "triton_version"):
            assert r[col]
    assert main_rows["naive"]["mode"] == "IQ" and main_rows["matmul-floor"]["mode"] == "floor"
    assert float(main_rows["naive"]["time_vs_naive"]) == pytest.approx(1.0)
    assert float(main_rows["matmul-floor"]["time_vs_floor"]) == pytest.approx(1.0)
    assert "max relative error" in main_rows["fastirl-torch"]["check"]
    sweep = {r["variant"]: r for r in rows if r["sweep"] == "tokens"}
    assert list(sweep) == ["naive", "fastirl-torch"]     # the main-shape point is reused
    for name, r in sweep.items():
        assert r["status"] == "ok" and r["fb_ms_all"] == main_rows[name]["fb_ms_all"]
    assert "fastirl-torch" in text and "time / naive" in text
    # the roofline model's prediction beside the measurement
    assert "predicted (/ measured)" in text and "roofline model" in text
    for name in ("naive", "fastirl-torch", "matmul-floor"):
        assert float(main_rows[name]["predicted_ms"]) > 0, name
        assert main_rows[name]["predicted_on"]
    assert (out / "table.md").read_text().count("|") > 10
    assert (out / "summary.png").stat().st_size > 0
    assert (out / "tokens.png").stat().st_size > 0


def _err(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_unknown_variant_is_an_error(capsys, tmp_path):
    rc, err = _err(capsys, [*TINY, "--variants", "naive,bogus", "--out", str(tmp_path)])
    assert rc == 2
    assert "unknown variant 'bogus'" in err and "fastirl-torch" in err


def test_inputs_that_cannot_fit_are_refused_before_allocating(capsys, tmp_path):
    rc, err = _err(capsys, ["--batch", "65536", "--seq", "65536", "--hidden", "8192",
                            "--vocab", "1000", "--out", str(tmp_path)])
    assert rc == 2
    assert "for its inputs alone" in err and "GiB" in err


def test_variant_that_cannot_fit_is_skipped_or_refused(capsys, tmp_path):
    big = ["--batch", "1", "--seq", "1048576", "--hidden", "8", "--vocab", "1048576"]
    rc = main([*big, "--variants", "naive,fastirl-torch", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    naive_line = next(ln for ln in out.splitlines() if " naive " in ln)
    assert "SKIP" in naive_line and "estimate" in naive_line
    rc, err = _err(capsys, [*big, "--variants", "naive", "--out", str(tmp_path)])
    assert rc == 2 and "no requested variant can run" in err


def test_unavailable_only_variant_is_refused(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("liger may run on CUDA")
    rc, err = _err(capsys, [*TINY, "--variants", "liger", "--out", str(tmp_path)])
    assert rc == 2 and "Liger-Kernel runs on CUDA only" in err


@pytest.mark.parametrize("argv, needle", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--sweep", "tokens", "--sweep-tokens", "12,x"], "comma-separated integers"),
    (["--ignore-frac", "1.5"], "--ignore-frac"),
    (["--dtype", "float64"], "invalid choice"),
    (["--device", "tpu"], "device"),
])
def test_bad_arguments(capsys, argv, needle, tmp_path):
    rc, err = _err(capsys, [*TINY, "--variants", "naive", *argv, "--out", str(tmp_path)])
    assert rc == 2
    assert needle in err


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "cpu-fp32" in out and "--variants" in out


@pytest.mark.parametrize("name", ["naive", "naive-ce", "fastirl-torch", "fastirl-torch-ce",
                                  "torch-lce"])
def test_correctness_guard_accepts_the_real_variants(name):
    dev = torch.device("cpu")
    if variants.unavailable_reason(name, dev):
        pytest.skip(variants.unavailable_reason(name, dev))
    fn = variants.loss_fn(name, dev, td_weight=0.1)
    ok, err, detail = worker.correctness(torch, name, fn, device=dev, dtype=torch.float32,
                                         dtype_name="float32", td_weight=0.1, seed=0)
    assert ok, detail


def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch):
    real = variants.loss_fn

    def off_by_a_bit(name, device, **kw):
        fn = real(name, device, **kw)
        return lambda x, w, t: fn(x, w, t) * 1.01
    monkeypatch.setattr(variants, "loss_fn", off_by_a_bit)
    job = dict(variant="fastirl-torch", device="cpu", dtype="float32", batch=2, seq=8,
               hidden=8, vocab=32, repeats=3, warmup=0, td_weight=0.1, threads=1)
    res = worker.run_job(job)
    assert res["status"] == "wrong"
    assert "disagrees with the reference" in res["reason"]
    assert "fb_ms" not in res and "peak_bytes" not in res


def test_peak_meter_sees_an_allocation():
    meter = memory.PeakMeter(torch.device("cpu"))
    with meter.measure():
        t = torch.ones(16 << 20)          # 64 MiB, touched
        del t
    assert meter.peak >= 60 << 20, (meter.method, meter.peak)
    with meter.measure():
        pass
    assert meter.peak < 16 << 20


def test_variant_names_round_trip():
    for name in variants.all_names():
        assert variants.info(name).name == name
    with pytest.raises(ValueError, match="unknown variant"):
        variants.info("fastirl-nope")


@pytest.mark.parametrize("name,want", [
    ("fastirl-cpu", ("fastirl-cpu", None, None)),
    ("fastirl-cpu@compact", ("fastirl-cpu", "compact", None)),
    ("fastirl-cpu-ce@balanced", ("fastirl-cpu-ce", "balanced", None)),
    ("fastirl-triton@512MiB", ("fastirl-triton", 512 << 20, None)),
    ("fastirl-cpu@1.5GiB", ("fastirl-cpu", 3 << 29, None)),
    ("fastirl-cpu@4096", ("fastirl-cpu", None, 4096)),
    ("cce", ("cce", None, None))])
def test_variant_suffixes(name, want):
    assert variants.split_variant(name) == want
    if want[1] is not None:
        assert variants.with_memory(want[0], want[1]) == name.replace("1.5GiB", "1536MiB")


@pytest.mark.parametrize("name,needle", [("fastirl-cpu@huge", "unknown suffix"),
                                         ("fastirl-cpu@0", "chunk size"),
                                         ("cce@compact", "only fastirl variants")])
def test_bad_variant_suffixes(name, needle):
    with pytest.raises(ValueError, match=needle):
        variants.split_variant(name)


def test_memory_setting_reaches_the_loss(monkeypatch):
    """fastirl-bench and interleaved.py build fastirl variants with the suffix's
    memory= / chunk_size= (and nothing for the library's default)."""
    import fastirl
    calls = []
    monkeypatch.setattr(fastirl, "iq_loss", lambda *a, **k: calls.append(k))
    dev = torch.device("cpu")
    for name in ("fastirl-cpu", "fastirl-cpu@compact", "fastirl-cpu@256MiB", "fastirl-cpu@64"):
        variants.loss_fn(name, dev, td_weight=0.1)(None, None, None)
    assert "memory" not in calls[0] and "chunk_size" not in calls[0]
    assert calls[1]["memory"] == "compact" and calls[2]["memory"] == 256 << 20
    assert calls[3]["chunk_size"] == 64 and "memory" not in calls[3]
    assert variants.info("fastirl-cpu@compact").mode == "IQ"
    assert "memory='compact'" in variants.info("fastirl-cpu@compact").summary


def test_bench_resolves_suffixes_and_the_memory_group(capsys):
    from fastirl.bench import cli
    dev = torch.device("cpu")
    got = cli.resolve_variants("fastirl-torch@compact,memory", dev)
    assert got[0] == "fastirl-torch@compact"
    assert {"fastirl-torch@fast", "fastirl-torch@balanced"} <= set(got)
    assert not any(n.startswith("fastirl-triton") for n in got)      # interpreter only on CPU
    for bad, needle in (("fastirl-nope@compact", "unknown variant 'fastirl-nope'"),
                        ("fastirl-torch@lots", "unknown suffix"), ("naive@compact", "only")):
        with pytest.raises(cli.UsageError, match=needle):
            cli.resolve_variants(bad, dev)


def test_tiny_run_of_memory_settings_predicts_time_and_memory(tmp_path):
    """fastirl-cpu at two settings side by side, with the model's predicted
    time and peak memory beside the measured ones."""
    import fastirl
    if "cpu" not in fastirl.available_backends("cpu"):
        pytest.skip("the native cpu backend is not built here")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "fastirl.bench", "--batch", "2", "--seq", "64", "--hidden", "16",
         "--vocab", "3000", "--variants", "fastirl-cpu@fast,fastirl-cpu@64KiB,matmul-floor",
         "--repeats", "1", "--no-plots", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "predicted memory (/ measured)" in proc.stdout
    with open(out / "results.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for name in ("fastirl-cpu@fast", "fastirl-cpu@64KiB"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
        assert float(rows[name]["predicted_peak_mib"]) > 0
        assert float(rows[name]["predicted_ms"]) > 0
    assert float(rows["fastirl-cpu@64KiB"]["predicted_peak_mib"]) < \
        float(rows["fastirl-cpu@fast"]["predicted_peak_mib"])
