"""Command-line tools: one dtype spelling, bad values refused by argparse up front."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fastirl._validate import dtype_arg
from fastirl.bench import main as bench_main

# tools/triton_aot.py is a developer tool outside the package: load it by path.
_spec = importlib.util.spec_from_file_location(
    "triton_aot", Path(__file__).resolve().parents[1] / "tools" / "triton_aot.py")
triton_aot = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("triton_aot", triton_aot)     # its dataclasses look themselves up there
_spec.loader.exec_module(triton_aot)


@pytest.mark.parametrize("text,want", [
    ("float32", "float32"), ("fp32", "float32"), ("bfloat16", "bfloat16"), ("bf16", "bfloat16"),
    ("BF16", "bfloat16"), ("torch.bfloat16", "bfloat16"), ("float16", "float16"),
    ("fp16", "float16"), ("half", "float16")])
def test_dtype_spellings(text, want):
    assert dtype_arg(text) == want


@pytest.fixture
def no_compile(monkeypatch):
    """triton_aot.main with the compilations replaced by a recorder."""
    calls = []

    def fake(archs, flags, kernels, dtypes, jobs, progress):
        calls.append(dict(archs=archs, flags=flags, kernels=kernels, dtypes=dtypes, jobs=jobs))
        return []

    monkeypatch.setattr(triton_aot, "compile_table", fake)
    return calls


@pytest.mark.parametrize("spelling", [["bfloat16", "float16"], ["bf16", "fp16"]])
def test_triton_aot_accepts_both_spellings(no_compile, spelling, capsys):
    assert triton_aot.main(["--dtype", *spelling, "--flags", "worst"]) == 0
    assert no_compile == [dict(archs=(80, 90), flags="worst", kernels=None,
                               dtypes=("bf16", "fp16"), jobs=1)]


@pytest.mark.parametrize("argv,needle", [
    (["--dtype", "bfloat17"], "invalid choice: 'bfloat17'"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--arch", "75"], "invalid choice: 75"),
    (["--kernel", "no_such_kernel"], "invalid choice: 'no_such_kernel'"),
    (["--flags", "some"], "invalid choice: 'some'"),
    (["--jobs", "0"], "expected an integer >= 1"),
])
def test_triton_aot_refuses_bad_values_before_compiling(no_compile, capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        triton_aot.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
    assert no_compile == []                       # nothing was compiled


TINY = ["--batch", "1", "--seq", "4", "--hidden", "8", "--vocab", "16", "--variants", "naive",
        "--dry-run"]


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16"])
def test_bench_accepts_both_spellings(capsys, spelling):
    assert bench_main([*TINY, "--dtype", spelling, "--device", "cpu"]) == 0
    assert "bfloat16" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--dtype", "bfloat17"], "invalid choice: 'bfloat17'"),
    (["--batch", "x"], "invalid int value"),
    (["--preset", "nope"], "invalid choice"),
    (["--loss-preset", "turbo"], "--loss-preset must be one of"),
    (["--td-weight", "-1"], "--td-weight must be >= 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--vocab", "1"], "--vocab must be >= 2"),
])
def test_bench_refuses_bad_values_before_running(capsys, monkeypatch, argv, needle):
    from fastirl.bench import cli
    monkeypatch.setattr(cli, "_run_worker", lambda *a, **k: pytest.fail("a benchmark ran"))
    assert bench_main([*TINY, "--device", "cpu", *argv]) == 2
    assert needle in capsys.readouterr().err
