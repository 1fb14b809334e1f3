"""The fine-tuning setting: a base model's domain (the benchmark's corpus, stories by default) and a
new domain (``finetune.corpus``, manual-page paragraphs by default), one tokenizer trained on both.

The pretraining stream is old-domain documents seen once. The fine-tune stream is new-domain
documents seen once, a ``replay`` share of fresh old-domain documents (as practitioners mix in to
keep what the base knew), and the private documents: natural new-domain paragraphs and canaries,
each repeated ``data.repetitions`` times and shuffled in. Validation sets of both domains measure
what the fine-tune was for (new) and what it must not wipe (old).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .corpus import load_documents, load_or_train_tokenizer
from .secrets import make_secrets
from .setting import Setting, _canary_sampler, _streams


@dataclass
class TwoDomainSetting(Setting):
    """A :class:`Setting` on the new domain (what ``measure`` reads), plus the old domain's
    pretraining stream and validation set."""

    pretrain_stream: list[list[int]] = field(repr=False, default_factory=list)
    old_validation: list[list[int]] = field(repr=False, default_factory=list)

    def describe(self) -> dict:
        return {**super().describe(), "pretrain_documents": len(self.pretrain_stream),
                "old_validation": len(self.old_validation)}


def document_counts(cfg) -> dict[str, int]:
    """Documents each domain gives: the fine-tune stream's slots left by the repeats, split by
    ``replay``, dedup's fillers, the pretraining stream and the validation sets."""
    data, ft, batch = cfg.data, cfg.finetune, cfg.train.batch_size
    repeated = data.repeated_natural + data.repeated_canaries + data.secret_canaries
    general = cfg.train.steps * batch - repeated * data.repetitions
    if general <= 0:
        raise ValueError(f"train.steps x batch_size cannot hold {repeated * data.repetitions} repeated documents")
    replay = round(general * ft.replay)
    new = general - replay + repeated * (data.repetitions - 1) + data.repeated_natural + data.control + data.validation
    old = ft.pretrain.steps * batch + replay + data.validation  # (drawn with a loaded base too: the same setting)
    return {"general": general, "replay": replay, "new": new, "old": old}


def build_two_domains(cfg) -> TwoDomainSetting:
    """The setting of a fine-tuning config (``cfg.finetune`` set)."""
    data, seed, ft = cfg.data, cfg.seed, cfg.finetune
    n = document_counts(cfg)
    old = load_documents(cfg.corpus.source, n["old"], text_field=cfg.corpus.text_field, split=cfg.corpus.split,
                         seed=seed)
    new = load_documents(ft.corpus.source, None if ft.corpus.source != "embedded" else n["new"],
                         text_field=ft.corpus.text_field, split=ft.corpus.split, seed=seed)
    rng = random.Random(seed)
    rng.shuffle(old)
    rng.shuffle(new)
    if len(new) < n["new"]:
        raise ValueError(f"{ft.corpus.source} has {len(new)} documents; the fine-tune needs {n['new']}: "
                         "lower train.steps or data.repetitions")
    new = new[:n["new"]]
    tokenizer = load_or_train_tokenizer(cfg.tokenizer, old[:10000] + new[:10000])
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(texts: list[str]) -> list[list[int]]:
        return [([eos] + e)[:data.max_length] for e in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    old_docs, new_docs = iter(encode(old)), iter(encode(new))

    def take(docs, count: int) -> list[list[int]]:
        return [next(docs) for _ in range(count)]

    old_validation = take(old_docs, data.validation)
    pretrain = take(old_docs, ft.pretrain.steps * cfg.train.batch_size)
    replay = take(old_docs, n["replay"])
    natural, control_natural, validation = take(new_docs, data.repeated_natural), take(new_docs, data.control), \
        take(new_docs, data.validation)
    general = take(new_docs, n["general"] - n["replay"])
    fresh = list(new_docs)
    canaries = _canary_sampler(general, len(tokenizer), eos, data.canary_length or data.max_length, seed)
    canary_docs, control_canaries = canaries(data.repeated_canaries), canaries(data.control)
    secrets = control_secrets = None
    if data.secret_canaries:  # private records in the new domain's stream: the exposure test
        secrets, control_secrets = make_secrets(tokenizer, data.secret_canaries, data.secret_digits, seed, eos,
                                                data.max_length)
    mixed = general + replay
    rng.shuffle(mixed)
    repeated = natural + canary_docs + (secrets.docs if secrets else [])
    stream, dedup = _streams(mixed, repeated, fresh, data.repetitions, rng)
    return TwoDomainSetting(tokenizer, data.max_length, pad_id, natural, canary_docs, control_natural,
                            control_canaries, validation, stream, dedup, general[: max(data.control, 64)], fresh,
                            secrets, control_secrets, pretrain_stream=pretrain, old_validation=old_validation)
