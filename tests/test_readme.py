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
