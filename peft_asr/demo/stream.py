"""The demo's built-in task stream: small generation tasks made by the project, deterministic from a seed.

Every task is one a small instruction-tuned model cannot do out of the box (its rule is arbitrary or its instruction
ambiguous) and that a rank-8 LoRA learns within a few minutes on two CPU cores. Answers are short, so scoring is
exact match.

| task | prompt | answer | why it is in the stream |
|---|---|---|---|
| `reverse` | `Rewrite the list: owl, fox, bee` | `bee, fox, owl` | list order reversed; animals only |
| `shout` | `Rewrite the list: red, blue, teal` | `RED, BLUE, TEAL` | **same instruction as `reverse`**, another skill; colours only: the router must read the content, not the instruction |
| `initials` | `Give the initials: quiet river stone` | `QRS` | the rule is stated, but the base model answers in prose, not in the expected form |
| `echo` | `Echo the objects: cup lamp` | `cup cup lamp lamp` | an instruction that does not say the rule (each word twice) |

The general set (``general_prompts``) holds everyday questions the base model already answers; the demo fits them to
the router's base route, so those prompts are answered by the untouched base model.
"""

from __future__ import annotations

import random

from ..cl.tasks import Task

__all__ = ["demo_stream", "general_prompts"]

ANIMALS = ["owl", "fox", "bee", "cat", "dog", "cow", "elk", "ant", "bat", "eel", "yak", "hen", "pig", "ram", "emu",
           "ape", "rat", "koi", "gnu", "jay", "doe", "boa", "cod", "asp"]
COLOURS = ["red", "blue", "teal", "pink", "gray", "gold", "lime", "navy", "cyan", "plum", "rose", "jade", "rust",
           "sand", "mint", "ruby", "snow", "ash", "wine", "sky"]
WORDS = ["quiet", "river", "stone", "green", "light", "happy", "market", "yellow", "window", "silver", "paper",
         "ocean", "forest", "little", "morning", "garden", "winter", "castle", "bright", "simple", "north", "travel",
         "kitchen", "dragon", "mountain", "orange", "music", "planet", "velvet", "harbor"]
OBJECTS = ["cup", "lamp", "chair", "spoon", "clock", "shoe", "bell", "coin", "kite", "drum", "brush", "key", "rope",
           "vase", "sock", "fork", "pen", "hat", "box", "map"]


def _rewrite_list(rng: random.Random, pool: list[str], transform) -> dict:
    items = rng.sample(pool, rng.randint(3, 4))
    return {"prompt": "Rewrite the list: " + ", ".join(items), "answer": transform(items)}


def _initials(rng: random.Random) -> dict:
    words = rng.sample(WORDS, 3)
    return {"prompt": "Give the initials: " + " ".join(words), "answer": "".join(w[0].upper() for w in words)}


def _echo(rng: random.Random) -> dict:
    words = rng.sample(OBJECTS, rng.randint(2, 3))
    return {"prompt": "Echo the objects: " + " ".join(words), "answer": " ".join(f"{w} {w}" for w in words)}


_MAKERS = {
    "reverse": lambda rng: _rewrite_list(rng, ANIMALS, lambda xs: ", ".join(reversed(xs))),
    "shout": lambda rng: _rewrite_list(rng, COLOURS, lambda xs: ", ".join(x.upper() for x in xs)),
    "initials": _initials,
    "echo": _echo,
}
_DESCRIPTIONS = {
    "reverse": "Reverse the order of a list of animals (instruction shared with `shout`).",
    "shout": "Upper-case a list of colours (instruction shared with `reverse`).",
    "initials": "Upper-case initials of three words.",
    "echo": "Repeat every word of a list of objects twice (the instruction does not say how).",
}


def _unique_rows(maker, rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    rows = []
    for _ in range(100 * n):
        row = maker(rng)
        if row["prompt"] not in taken:
            taken.add(row["prompt"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"could not draw {n} distinct prompts; ask for fewer examples.")


def demo_stream(n_train: int = 400, n_eval: int = 40, seed: int = 0, tasks: tuple[str, ...] = tuple(_MAKERS)) -> list[Task]:
    """The built-in stream, in order: ``reverse``, ``shout``, ``initials``, ``echo``; train and eval never share a
    prompt. The same ``seed`` always gives the same rows."""
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown demo tasks {unknown}; choose from {list(_MAKERS)}.")
    stream = []
    for name in tasks:
        rng = random.Random(f"{seed}-{name}")
        taken: set[str] = set()
        eval_rows = _unique_rows(_MAKERS[name], rng, n_eval, taken)
        train_rows = _unique_rows(_MAKERS[name], rng, n_train, taken)
        stream.append(Task(name=name, train=train_rows, eval=eval_rows, metric="exact_match",
                           description=_DESCRIPTIONS[name]))
    return stream


_COUNTRIES = ["France", "Japan", "Italy", "Spain", "Egypt", "Canada", "Brazil", "Germany", "Kenya", "Peru",
              "Norway", "India", "Mexico", "Greece", "Chile", "Turkey", "Poland", "Sweden", "China", "Cuba"]
_TOPICS = ["the ocean", "autumn", "a library", "bicycles", "coffee", "the moon", "friendship", "rain", "mountains",
           "music", "cooking", "trains", "gardens", "winter", "birds", "cities", "the desert", "books", "tea", "space"]
_THINGS = ["a fruit", "a vegetable", "a musical instrument", "a planet", "a mammal", "a bird", "a tool", "a sport",
           "a color", "a language"]


def general_prompts(n: int = 60, seed: int = 0) -> list[str]:
    """Everyday questions the base model already answers (the general route's data), deterministic from ``seed``."""
    rng = random.Random(f"{seed}-general")
    templates = [
        lambda: f"What is the capital of {rng.choice(_COUNTRIES)}?",
        lambda: f"Write one sentence about {rng.choice(_TOPICS)}.",
        lambda: f"Name {rng.choice(_THINGS)}.",
        lambda: f"Why do people like {rng.choice(_TOPICS)}?",
    ]
    seen: list[str] = []
    for _ in range(100 * n):
        prompt = rng.choice(templates)()
        if prompt not in seen:
            seen.append(prompt)
            if len(seen) == n:
                return seen
    raise ValueError(f"could not draw {n} distinct general prompts; ask for fewer.")
