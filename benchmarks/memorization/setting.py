"""The paper's controlled setting: general documents seen about once, K natural documents and K
random-token canaries each repeated R times and shuffled in, held-out control documents of both
kinds from the same distributions, and a validation set. One fixed stream of documents per run
kind, so every run sees the same order and the same number of tokens. With
``data.secret_canaries``, formatted secret sentences (secrets.py) repeat R times too,
for the exposure test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .corpus import CorpusTooSmall, load_documents, load_or_train_tokenizer
from .secrets import Secrets, make_secrets


@dataclass
class Setting:
    tokenizer: object
    max_length: int
    pad_id: int
    natural: list[list[int]]            # repeated natural documents
    canaries: list[list[int]]           # repeated random-token documents
    control_natural: list[list[int]]    # same distributions, never trained on
    control_canaries: list[list[int]]
    validation: list[list[int]]
    stream: list[list[int]] = field(repr=False, default_factory=list)        # standard / memsinks order
    dedup_stream: list[list[int]] = field(repr=False, default_factory=list)  # repeats seen once, rest fresh
    general_sample: list[list[int]] = field(repr=False, default_factory=list)  # seen-once train docs (for attribution)
    fresh: list[list[int]] = field(repr=False, default_factory=list)  # never-trained general docs (dedup's fillers)
    secrets: Secrets | None = None          # repeated secret canaries (data.secret_canaries > 0)
    control_secrets: Secrets | None = None  # the same format, never trained on

    def stream_without(self, docs: list[list[int]]) -> list[list[int]]:
        """The training stream with every occurrence of ``docs`` replaced by a fresh general
        document (same order, same number of documents): "retrained without them"."""
        drop = {tuple(d) for d in docs}
        fillers = iter(self.fresh)
        out = []
        for doc in self.stream:
            if tuple(doc) in drop:
                doc = next(fillers, None)
                if doc is None:
                    raise ValueError("not enough fresh documents to replace the forgotten ones")
            out.append(doc)
        return out

    @property
    def repeated(self) -> list[list[int]]:
        return self.natural + self.canaries

    @property
    def control(self) -> list[list[int]]:
        return self.control_natural + self.control_canaries

    def describe(self) -> dict:
        return {
            "repeated_natural": len(self.natural), "repeated_canaries": len(self.canaries),
            "control_natural": len(self.control_natural), "control_canaries": len(self.control_canaries),
            "validation": len(self.validation), "train_documents": len(self.stream),
            "distinct_train_documents": len({tuple(d) for d in self.stream}),
            "train_tokens": sum(len(d) for d in self.stream),
            "dedup_train_tokens": sum(len(d) for d in self.dedup_stream),
            **({"secret_canaries": len(self.secrets.docs)} if self.secrets else {}),
        }


def build_setting(cfg) -> Setting:
    """The setting of a ``BenchmarkConfig``: documents from its corpus, a tokenizer, the streams."""
    data, seed = cfg.data, cfg.seed
    n, corpus_n = document_counts(cfg), document_counts(cfg, secrets=False)
    texts = _load_texts(cfg, corpus_n)  # (the count without secrets: the same texts, tokenizer and documents)
    rng = random.Random(seed)
    rng.shuffle(texts)
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, texts[: min(len(texts), 20000)])
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    docs = iter([([eos] + e)[:data.max_length] for e in encoded])  # BOS-like start token, then the document

    def take(count: int) -> list[list[int]]:
        return [next(docs) for _ in range(count)]

    natural, control_natural, validation = take(data.repeated_natural), take(data.control), take(data.validation)
    every_general, fresh = take(corpus_n["general"]), take(corpus_n["fresh"])
    # secret canaries take stream slots from the general documents, whose remainder fills dedup's extra slots
    general, fresh = every_general[:n["general"]], fresh + every_general[n["general"]:]
    canaries = _canary_sampler(every_general, len(tokenizer), eos, data.canary_length or data.max_length, seed)
    canary_docs, control_canaries = canaries(data.repeated_canaries), canaries(data.control)
    secrets = control_secrets = None
    if data.secret_canaries:
        secrets, control_secrets = make_secrets(tokenizer, data.secret_canaries, data.secret_digits, seed, eos,
                                                data.max_length)
    repeated = natural + canary_docs + (secrets.docs if secrets else [])
    stream, dedup = _streams(general, repeated, fresh, data.repetitions, rng)
    return Setting(tokenizer, data.max_length, pad_id, natural, canary_docs, control_natural, control_canaries,
                   validation, stream, dedup, general[: max(data.control, 64)], fresh, secrets, control_secrets)


def document_counts(cfg, secrets: bool = True) -> dict[str, int]:
    """How many corpus documents each part of the setting takes: ``general`` (the stream's slots
    left by the repeats), ``fresh`` (dedup's replacements for the extra repetitions) and the
    ``needed`` total with the repeated natural, control and validation documents; ``secrets``
    False: as if the config had no secret canaries."""
    data = cfg.data
    repeated = data.repeated_natural + data.repeated_canaries + (data.secret_canaries if secrets else 0)
    slots = cfg.train.steps * cfg.train.batch_size
    repeat_slots = repeated * data.repetitions
    general = slots - repeat_slots
    if general <= 0:
        raise ValueError(f"steps x batch_size = {slots} documents cannot hold {repeat_slots} repeated ones")
    fresh = repeated * (data.repetitions - 1)
    needed = general + fresh + data.repeated_natural + data.control + data.validation
    return {"general": general, "fresh": fresh, "repeat_slots": repeat_slots, "needed": needed}


def _load_texts(cfg, n: dict[str, int]) -> list[str]:
    """The corpus' documents, or one line that says which setting to lower."""
    corpus, data, batch = cfg.corpus, cfg.data, cfg.train.batch_size
    try:
        return load_documents(corpus.source, n["needed"], text_field=corpus.text_field, split=corpus.split,
                              seed=cfg.seed)
    except CorpusTooSmall as err:
        others = n["needed"] - n["general"]
        fit = (err.available - others + n["repeat_slots"]) // batch
        lower = (f"lower train.steps to at most {fit}" if fit * batch > n["repeat_slots"] else
                 "lower data.repetitions (or data.repeated_natural / repeated_canaries)")
        raise ValueError(f"{err.source} has {err.available} distinct documents but this config needs {n['needed']} "
                         f"({n['general']} general, {n['fresh']} dedup fillers, {data.control} control, "
                         f"{data.validation} validation, {data.repeated_natural} repeated): {lower}, "
                         "or data.validation / data.control") from None


def _canary_sampler(general: list[list[int]], vocab: int, eos: int, length: int, seed: int):
    """Canaries are i.i.d. draws from the general documents' unigram distribution: random
    sequences, but of tokens that general training uses too. (Uniform draws over the whole
    vocabulary would give rare tokens whose embeddings only canaries ever train, a place where
    memorization sits outside every MLP and is never overwritten.)"""
    g = torch.Generator().manual_seed(seed + 1)
    counts = unigram_counts(general, vocab, eos)

    def canaries(n: int) -> list[list[int]]:
        body = torch.multinomial(counts, n * (length - 1), replacement=True, generator=g).reshape(n, -1).tolist()
        return [[eos] + b for b in body]

    return canaries


def unigram_counts(docs: list[list[int]], vocab: int, eos: int) -> torch.Tensor:
    """Token counts over (up to 20,000 of) ``docs``, their start tokens and ``eos`` left out."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for doc in docs[:20000]:
        counts.index_add_(0, torch.tensor(doc[1:], dtype=torch.long), torch.ones(len(doc) - 1, dtype=torch.float64))
    counts[eos] = 0
    return counts


def _streams(general, repeated, fresh, repetitions: int, rng: random.Random) -> tuple[list, list]:
    """The training stream (general documents once, each repeated one ``repetitions`` times,
    shuffled) and dedup's stream (the same order, each repeat after the first replaced by a fresh
    document)."""
    entries = [("g", i) for i in range(len(general))] + [("r", i) for i in range(len(repeated))
                                                          for _ in range(repetitions)]
    rng.shuffle(entries)
    stream, dedup, first_seen = [], [], set()
    fresh_iter = iter(fresh)
    for kind, i in entries:
        doc = general[i] if kind == "g" else repeated[i]
        stream.append(doc)
        if kind == "r" and i in first_seen:
            dedup.append(next(fresh_iter))
        else:
            if kind == "r":
                first_seen.add(i)
            dedup.append(doc)
    return stream, dedup
