"""Formatted secret canaries for the exposure test: "the secret code of NAME is DDDDDDDDD." with a
random secret, repeated like the other repeated documents; controls of the same format are never
trained on. Drawn from their own RNG, so a config without them (``data.secret_canaries: 0``)
builds exactly the stream it built before they existed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hf_memsinks.evaluation.exposure import DEFAULT_FORMAT

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaya", "Liam",
         "Mara", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Ximena",
         "Yusuf", "Zoe", "Anton", "Bea", "Cyril", "Dana", "Emil", "Freya")


@dataclass
class Secrets:
    docs: list[list[int]]  # [BOS] + the sentence's tokens, as trained
    texts: list[str]
    values: list[str]      # the secret in each text


def _names(count: int, rng: random.Random) -> list[str]:
    names = [f"{n} {i // len(NAMES)}" if i >= len(NAMES) else n for i, n in
             enumerate(NAMES[j % len(NAMES)] for j in range(count))]
    rng.shuffle(names)
    return names


def make_secrets(tokenizer, count: int, digits: int, seed: int, bos: int, max_length: int) -> tuple[Secrets, Secrets]:
    """``count`` secret canaries to train on and ``count`` controls, every name distinct."""
    rng = random.Random(seed + 23)
    names = _names(2 * count, rng)
    values = ["".join(rng.choice("0123456789") for _ in range(digits)) for _ in range(2 * count)]
    texts = [DEFAULT_FORMAT.format(name=n, secret=v) for n, v in zip(names, values)]
    docs = [[bos] + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    too_long = max(len(d) for d in docs)
    if too_long > max_length:
        raise ValueError(f"a secret canary takes {too_long} tokens, over data.max_length {max_length}: "
                         "lower data.secret_digits")
    return (Secrets(docs[:count], texts[:count], values[:count]),
            Secrets(docs[count:], texts[count:], values[count:]))
