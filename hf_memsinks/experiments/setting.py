"""The paper's controlled setting: general documents seen about once, K natural documents and K
random-token canaries each repeated R times and shuffled in, held-out control documents of both
kinds from the same distributions, and a validation set. One fixed stream of documents per run
kind, so every run sees the same order and the same number of tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .corpus import CorpusTooSmall, load_documents, load_or_train_tokenizer


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
            "train_tokens": sum(len(d) for d in self.stream), "dedup_train_tokens": sum(len(d) for d in self.dedup_stream),
        }


def build_setting(cfg: dict) -> Setting:
    data, train = cfg["data"], cfg["train"]
    seed = int(cfg.get("seed", 0))
    k_nat, k_can = int(data["repeated_natural"]), int(data["repeated_canaries"])
    reps = int(data["repetitions"])
    n_ctrl, n_val = int(data["control"]), int(data["validation"])
    max_length = int(data["max_length"])
    slots = int(train["steps"]) * int(train["batch_size"])
    n_repeat_slots = (k_nat + k_can) * reps
    n_general = slots - n_repeat_slots
    if n_general <= 0:
        raise ValueError(f"steps x batch_size = {slots} documents cannot hold {n_repeat_slots} repeated ones")
    n_fresh = (k_nat + k_can) * (reps - 1)  # dedup replaces the extra repetitions with fresh documents
    needed = n_general + n_fresh + k_nat + n_ctrl + n_val

    corpus = cfg["corpus"]
    try:
        texts = load_documents(corpus.get("source", "embedded"), needed, text_field=corpus.get("text_field", "text"),
                               split=corpus.get("split", "train"), seed=seed)
    except CorpusTooSmall as err:
        batch = int(train["batch_size"])
        fit = (err.available - n_fresh - k_nat - n_ctrl - n_val + n_repeat_slots) // batch
        lower = (f"lower train.steps to at most {fit}" if fit * batch > n_repeat_slots else
                 "lower data.repetitions (or data.repeated_natural / repeated_canaries)")
        raise ValueError(f"{err.source} has {err.available} distinct documents but this config needs {needed} "
                         f"({n_general} general, {n_fresh} dedup fillers, {n_ctrl} control, {n_val} validation, "
                         f"{k_nat} repeated): {lower}, or data.validation / data.control") from None
    rng = random.Random(seed)
    rng.shuffle(texts)
    tokenizer = load_or_train_tokenizer(cfg.get("tokenizer", {}), texts[: min(len(texts), 20000)])
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    docs = [([eos] + e)[:max_length] for e in encoded]  # BOS-like start token, then the document

    at = 0

    def take(n: int) -> list[list[int]]:
        nonlocal at
        out = docs[at:at + n]
        at += n
        return out

    natural, control_natural, validation = take(k_nat), take(n_ctrl), take(n_val)
    general, fresh = take(n_general), take(n_fresh)

    # Canaries are i.i.d. draws from the general documents' unigram distribution: random
    # sequences, but of tokens that general training uses too. (Uniform draws over the whole
    # vocabulary would give rare tokens whose embeddings only canaries ever train, a place where
    # memorization sits outside every MLP and is never overwritten.)
    g = torch.Generator().manual_seed(seed + 1)
    counts = torch.zeros(len(tokenizer), dtype=torch.float64)
    for doc in general[:20000]:
        counts.index_add_(0, torch.tensor(doc[1:], dtype=torch.long), torch.ones(len(doc) - 1, dtype=torch.float64))
    counts[eos] = 0
    length = int(data.get("canary_length", max_length))

    def canaries(n: int) -> list[list[int]]:
        body = torch.multinomial(counts, n * (length - 1), replacement=True, generator=g).reshape(n, -1).tolist()
        return [[eos] + b for b in body]

    canary_docs, control_canaries = canaries(k_can), canaries(n_ctrl)

    repeated = natural + canary_docs
    entries = [("g", i) for i in range(n_general)] + [("r", i) for i in range(len(repeated)) for _ in range(reps)]
    rng.shuffle(entries)
    stream, dedup, first_seen = [], [], set()
    fresh_iter = iter(fresh)
    for kind, i in entries:
        doc = general[i] if kind == "g" else repeated[i]
        stream.append(doc)
        if kind == "r" and i in first_seen:
            dedup.append(next(fresh_iter))
        else:
            first_seen.add(i) if kind == "r" else None
            dedup.append(doc)
    return Setting(tokenizer, max_length, pad_id, natural, canary_docs, control_natural, control_canaries,
                   validation, stream, dedup, general[: max(n_ctrl, 64)], fresh)
