"""The task: GSM8K-style three-step word problems generated from a seed.

Eight templates, two question wordings each, many names, objects and number
ranges; an expert answer is a step-by-step solution ending in ``#### <number>``.
Every problem has several correct solutions (orders of the steps, four phrasings,
operand orders), so the expert distribution is itself diverse.  Test problems use
names and objects never seen in training and a band of starting numbers that
training never uses.
"""

from __future__ import annotations

import dataclasses
import random

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

