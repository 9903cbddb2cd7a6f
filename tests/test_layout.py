"""The shape of the package: data flows one way (no import cycle), every option
is declared once, and every module imports on its own."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import fastirl
from fastirl import options as fo

ROOT = Path(fastirl.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastirl modules ``name`` imports (at any depth of its code, lazy
    imports inside functions included: a cycle through one is still a cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                for cand in (f"{base}.{alias.name}", base):
                    if cand in modules and cand != name:
                        found.add(cand)
                        break
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules and a.name != name}
    # a package's __init__ only re-exports: importing a package is not a dependency on it
    return {m for m in found if modules[m].name != "__init__.py"}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles, done = [], set()

    def visit(node, stack):
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, "import cycles in fastirl/:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(
    fastirl.__path__, "fastirl.") if not m.name.startswith("fastirl.integrations")
    and not m.name.endswith("__main__")))
def test_every_module_imports_alone(name):
    importlib.import_module(name)


# Listed from the files (walking the packages would import transformers at collection).
_INTEGRATIONS = sorted(m for m in _modules() if m.startswith("fastirl.integrations"))


@pytest.mark.parametrize("name", _INTEGRATIONS)
def test_every_integration_module_imports_alone(name):
    """The integrations too, where their libraries are installed."""
    if name.startswith("fastirl.integrations.transformers"):
        for lib in ("transformers", "trl"):
            pytest.importorskip(lib)
    importlib.import_module(name)


def test_integration_modules_are_small():
    """One job per module: none grows past 500 lines."""
    sizes = {m: len(_modules()[m].read_text().splitlines()) for m in _INTEGRATIONS}
    assert all(n <= 500 for n in sizes.values()), sizes


def test_integrations_hold_no_list_of_loss_options():
    """The integrations read the loss options from the declaration: the patch's
    options, IQConfig's fields and the rewards' options are derived from it."""
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    from fastirl.integrations.transformers import config, patch, rewards
    assert patch.LOSS_OPTIONS == fo.names(fo.ModuleOptions)
    assert set(config.CONFIG_FIELDS.values()) == {
        n for n in fo.names(fo.ModuleOptions) if fo.OPTIONS[n].spec.config is not None}
    assert set(rewards._REWARD_OPTIONS) <= set(fo.names(fo.RewardOptions))
    # the per-call tensors of the loss, in HF's conventions, are inputs of the patched forward
    from fastirl.integrations.transformers.forward import EXTRA_INPUTS
    per_call = set(fo.names(fo.Sequences)) | set(fo.names(fo.Samples))
    assert per_call - {"position_ids"} <= set(EXTRA_INPUTS)      # position_ids: a model input


def test_public_signatures_come_from_the_declaration():
    """Every keyword option of the public functions is the declaration's, with its
    default; nothing else is an option."""
    for fn, td in ((fastirl.iq_loss, fo.LinearOptions),
                   (fastirl.iq_loss_from_logits, fo.LogitsOptions),
                   (fastirl.implicit_rewards, fo.RewardOptions)):
        params = inspect.signature(fn).parameters
        kw = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY
              and not n.startswith("return_")}
        assert kw == {n: fo.OPTIONS[n].default for n in fo.names(td)}
        for n in fo.names(td):
            assert f"        {n} (" in fn.__doc__, n          # documented from the table


def test_preset_and_memory_names_agree_with_the_code():
    from fastirl.engine import PRESETS
    assert tuple(PRESETS) == fo.PRESETS_NAMES


def test_a_misspelt_option_fails_at_every_entry_point():
    """One validator: a bad option fails where it is given, whichever entry point."""
    from fastirl.distributed import FusedLMHeadLoss
    import torch
    head = torch.nn.Linear(4, 7)
    for make in (lambda: fastirl.LinearIQLoss(backend="cdua"),
                 lambda: fastirl.IQLoss(preset="turbo"),
                 lambda: FusedLMHeadLoss(head, backend="cdua"),
                 lambda: fastirl.LinearIQLoss(td_wieght=0.1)):
        with pytest.raises((ValueError, TypeError)):
            make()


def test_options_doc_is_generated_from_the_declaration():
    doc = (ROOT.parent / "docs" / "options.md").read_text()
    assert doc == fo.markdown(), "run: python -m fastirl.options > docs/options.md"
