"""Documents for the benchmark: an embedded story generator (no network), local text files, or
any ``datasets`` dataset (TinyStories when the Hub is reachable); and a locally trained tokenizer.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable

# ---- the embedded generator: short, plausible English stories -----------------------------------

NAMES = ("Lily Tom Mia Ben Sam Anna Max Zoe Leo Emma Jack Lucy Noah Ella Finn Ruby Owen Grace Theo Ivy Jake Rosa "
         "Milo Nora Luke Ava Eli Maya Adam Lena Oscar Clara Hugo Iris Felix Hazel Omar Lola Ravi June Kai Nina "
         "Dan Tara Pip Molly Otto Sara").split()
CREATURES = ("girl boy bunny puppy kitten bear fox owl duck mouse frog turtle bird lion pig horse squirrel deer "
             "dragon robot farmer king princess baker sailor").split()
TRAITS = ("little happy curious brave shy kind silly tiny sleepy clever gentle grumpy lonely proud busy quiet "
          "friendly young old wise").split()
PLACES = ("house forest garden village farm castle park beach school river hill meadow cave town pond library "
          "bakery island valley zoo kitchen market").split()
OBJECTS = ("ball kite book hat box key shell cake apple flower drum boat star map lamp blanket toy car sock "
           "feather stone cup bell basket ribbon coin sandwich umbrella").split()
COLORS = "red blue green yellow shiny big small soft old new golden purple pink striped".split()
SPOTS = ("under the bed", "behind a tree", "in the grass", "near the pond", "on the table", "in a hole",
         "by the door", "under a rock", "in the sand", "on the roof", "inside a log", "next to the fence")
FEELINGS = "happy sad scared excited surprised angry proud worried glad curious".split()
ACTIONS = ("ran to", "walked to", "hopped to", "flew to", "went back to", "raced to", "climbed up to", "danced to")
EVENTS = (
    "it started to rain", "the wind blew very hard", "a loud noise came from the sky", "the sun went down",
    "a big dog barked", "the bridge broke", "the lights went out", "a storm came", "the snow began to fall",
    "the river rose high", "a little bird got stuck", "the door would not open",
)
SAYINGS = (
    "Can you help me?", "Look what I found!", "Let's play together!", "I am not scared.", "Where did it go?",
    "This is the best day ever!", "We can share it.", "Thank you, friend.", "I will try again.",
    "Please be careful.", "What a surprise!", "Let's go home.", "I love it!", "Don't worry, I am here.",
)
ENDINGS = (
    "From that day on, {a} and {b} were best friends.", "{a} learned that sharing makes everyone happy.",
    "That night, {a} slept with a big smile.", "{a} never forgot that day.",
    "{a} and {b} played until the sun went down.", "Everyone cheered for {a}.",
    "{a} felt {f} and warm inside.", "{a} knew it was time to go home.",
    "{a} learned to be brave, even when things are hard.", "They all had a party in the {p}.",
)


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    ca, cb = rng.choice(CREATURES), rng.choice(CREATURES)
    place, place2 = rng.sample(PLACES, 2)
    obj, color = rng.choice(OBJECTS), rng.choice(COLORS)
    opener = rng.choice((
        f"Once upon a time, there was a {rng.choice(TRAITS)} {ca} named {a}.",
        f"{a} was a {rng.choice(TRAITS)} {ca} who lived in a {rng.choice(TRAITS)} {place}.",
        f"One day, a {rng.choice(TRAITS)} {ca} named {a} woke up early.",
        f"There once lived a {ca} called {a} in a {place} near the {place2}.",
    ))
    middle = [
        f"{a} found a {color} {obj} {rng.choice(SPOTS)}.",
        f"{a} {rng.choice(ACTIONS)} the {place2} to see {b} the {cb}.",
        f"Then {rng.choice(EVENTS)}, and {a} felt {rng.choice(FEELINGS)}.",
        f'"{rng.choice(SAYINGS)}" said {a}.',
        f'{b} smiled and said, "{rng.choice(SAYINGS)}"',
        f"{b} had a {rng.choice(COLORS)} {rng.choice(OBJECTS)} too.",
        f"They looked for the {obj} in the {rng.choice(PLACES)}.",
        f"{a} gave the {obj} to {b}.",
    ]
    rng.shuffle(middle)
    body = middle[: rng.randint(2, 4)]
    end = rng.choice(ENDINGS).format(a=a, b=b, f=rng.choice(FEELINGS), p=place)
    return " ".join([opener, *body, end])


def embedded_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct generated stories (deterministic in ``seed``)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        story = _story(rng)
        if story not in seen:
            seen.add(story)
            out.append(story)
    return out


# ---- other sources -----------------------------------------------------------------------------------


def _read_local(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise KeyError(f"{path}:{i + 1} has no {text_field!r} field")
                    docs.append(str(record[text_field]))
        return docs
    text = path.read_text(encoding="utf-8")
    blocks = [b.strip() for b in text.split("\n\n")]
    if sum(1 for b in blocks if b) > 1:  # blank-line-separated documents
        return [" ".join(b.split("\n")) for b in blocks if b]
    return [line.strip() for line in text.splitlines() if line.strip()]  # one document per line


def load_documents(source: str = "embedded", n: int | None = None, *, text_field: str = "text",
                   split: str = "train", seed: int = 0) -> list[str]:
    """Documents from ``source``: ``"embedded"``; a ``.txt`` file (one document per line, or
    blank-line-separated blocks) or ``.jsonl`` file (``text_field``); a directory saved with
    ``datasets.save_to_disk``; or a Hub dataset name (e.g. ``roneneldan/TinyStories``)."""
    if source == "embedded":
        if n is None:
            raise ValueError("the embedded corpus needs a document count")
        return embedded_stories(n, seed)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        docs = _read_local(path, text_field)
    else:
        import datasets

        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if text_field not in ds.column_names:
            raise KeyError(f"{source} has no {text_field!r} column (have {ds.column_names})")
        if n is not None:
            ds = ds.select(range(min(n, len(ds))))
        docs = [str(t) for t in ds[text_field]]
    docs = [d for d in dict.fromkeys(docs) if d.strip()]  # drop exact repeats: the benchmark adds its own
    if n is not None:
        if len(docs) < n:
            raise CorpusTooSmall(source, len(docs), n)
        docs = docs[:n]
    return docs


class CorpusTooSmall(ValueError):
    """A corpus with fewer distinct documents than a setting needs."""

    def __init__(self, source: str, available: int, needed: int):
        super().__init__(f"{source} has {available} distinct documents; the config needs {needed}")
        self.source, self.available, self.needed = source, available, needed


# ---- tokenizer ----------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here (no download), as a ``PreTrainedTokenizerFast``
    with ``<|endoftext|>`` as BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def load_or_train_tokenizer(spec, texts: list[str]):
    """The tokenizer at ``spec.path``, else a BPE of ``spec.vocab_size`` trained on ``texts``."""
    if spec.path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec.path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return train_tokenizer(texts, spec.vocab_size)
