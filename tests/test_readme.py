"""CI runs the README's test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert len(ci) == 1, ci
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:3]            # the two commands, main job first
    commands = [b.split("\n```")[0].strip() for b in blocks]
    assert "fastirl-bench" in commands[0]
    assert commands[1] == ci[0]


def test_the_cpu_tables_are_the_committed_measurements():
    """README's and docs/benchmarks.md's measured CPU table is what
    benchmarks/make_table.py makes of benchmarks/results/memory-*.csv."""
    import subprocess
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_table import section
    csvs = sorted(str(p) for p in (ROOT / "benchmarks" / "results").glob("memory-*.csv"))
    assert len(csvs) == 6
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_table.py"),
                            "--side-by-side", *csvs], capture_output=True, text=True,
                           check=True).stdout
    for doc, marker in (("README.md", "cpu-table"), ("docs/benchmarks.md", "measured-cpu-table")):
        text = (ROOT / doc).read_text()
        begin, end = section(text, marker)
        assert text[begin:end] == table, doc
