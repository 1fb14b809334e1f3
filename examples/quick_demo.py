"""A two-minute MemSinks demo on CPU: train a tiny GPT-2 with and without sinks on a synthetic
language where a few random "canary" documents repeat, remove the sinks, and print what changed.

General documents come from a random bigram language and are seen about once; each canary is
a uniformly random token string repeated many times, so the only way to predict it is to
memorize it. Sequence IDs are the library's content hashes (``hf_memsinks.data.stable_id``), so
every repetition of a canary gets its ID.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model
from hf_memsinks.data import stable_id

VOCAB, LENGTH, BATCH = 64, 32, 16
CANARIES, CANARY_SHARE = 16, 0.25  # a quarter of each batch is canaries


class Bigram:
    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3.0, dim=-1)
        self.g = torch.Generator().manual_seed(seed + 1)

    def sample(self, n: int) -> torch.Tensor:
        x = torch.empty(n, LENGTH, dtype=torch.long)
        x[:, 0] = torch.randint(VOCAB, (n,), generator=self.g)
        for t in range(1, LENGTH):
            x[:, t] = torch.multinomial(self.table[x[:, t - 1]], 1, generator=self.g).squeeze(1)
        return x


def mean_loss(model, docs: torch.Tensor, **kw) -> float:
    with torch.no_grad():
        return model(input_ids=docs, labels=docs, **kw).loss.item()


def train(model, data: Bigram, canaries: torch.Tensor, with_ids: bool, label: str, steps: int):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    attach_sink_lr(model, opt)  # the sinks' faster step (MemSinkConfig.sink_lr_scale); nothing for a plain model
    canary_ids = torch.tensor([stable_id(c) for c in canaries])
    n_canary = int(BATCH * CANARY_SHARE)
    model.train()
    for _ in tqdm(range(steps), desc=label, leave=False, mininterval=2.0):
        pick = torch.randint(CANARIES, (n_canary,), generator=g)
        general = data.sample(BATCH - n_canary)
        x = torch.cat([canaries[pick], general])
        kw = {}
        if with_ids:
            kw["sequence_ids"] = torch.cat([canary_ids[pick], torch.tensor([stable_id(d) for d in general])])
        model(input_ids=x, labels=x, **kw).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval()


def run(steps: int = 600) -> dict:
    """Train both runs; return losses per run (canary, control, validation) and the plain model."""
    torch.manual_seed(0)
    data = Bigram(seed=1)
    canaries = torch.randint(VOCAB, (CANARIES, LENGTH), generator=torch.Generator().manual_seed(7))
    control = torch.randint(VOCAB, (CANARIES, LENGTH), generator=torch.Generator().manual_seed(8))
    held_out = Bigram(seed=1)
    held_out.g.manual_seed(12345)
    validation = held_out.sample(256)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4, n_inner=512,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(config)

    standard = train(copy.deepcopy(base), data, canaries, False, "standard", steps)
    memsink_cfg = MemSinkConfig.from_pretrained(Path(__file__).resolve().parents[1] / "configs" / "quick_demo.json")
    sinks = train(get_memsink_model(copy.deepcopy(base), memsink_cfg), data, canaries, True, "memsinks", steps)

    canary_ids = torch.tensor([stable_id(c) for c in canaries])
    with sinks.sink_mode("activate", canary_ids):
        own = mean_loss(sinks, canaries)
    def losses(model) -> tuple[float, float, float]:
        return mean_loss(model, canaries), mean_loss(model, control), mean_loss(model, validation)

    rows = {
        "standard": losses(standard),
        "memsinks, own sinks on": (own, float("nan"), float("nan")),
        "memsinks, sinks removed": losses(sinks),
    }
    plain = copy.deepcopy(sinks).remove_sinks()
    assert abs(mean_loss(plain, validation) - rows["memsinks, sinks removed"][2]) < 1e-5
    gap_std = rows["standard"][1] - rows["standard"][0]
    gap_sink = rows["memsinks, sinks removed"][1] - rows["memsinks, sinks removed"][0]
    return {
        "rows": rows,
        "gaps": (gap_std, gap_sink),
        "gap_closure": 1 - gap_sink / gap_std,
        "val_loss_ratio": rows["memsinks, sinks removed"][2] / rows["standard"][2],
        "plain": plain,
        "full_width": config.n_inner,
    }


def main(steps: int = 600) -> None:
    start = time.time()
    result = run(steps)
    rows, plain = result["rows"], result["plain"]
    repeats = steps * BATCH * CANARY_SHARE / CANARIES
    print(f"\nMemSinks quick demo ({time.time() - start:.0f} s): GPT-2 2x64, MLP {result['full_width']}, {steps} steps"
          f" of {BATCH} x {LENGTH}, {CANARIES} random canaries ~{repeats:.0f} times each")
    print(f"{'run':26s} {'canary loss':>12s} {'control loss':>13s} {'val loss':>9s}")
    for name, values in rows.items():
        cells = [f"{v:.3f}" if v == v else "-" for v in values]
        print(f"{name:26s} {cells[0]:>12s} {cells[1]:>13s} {cells[2]:>9s}")
    gap_std, gap_sink = result["gaps"]
    print(f"\nmemorization gap (control - canary): standard {gap_std:.2f} nats, sinks removed {gap_sink:.2f} nats"
          f" -> gap closure {result['gap_closure']:.0%}")
    print(f"val loss ratio (sinks removed / standard): {result['val_loss_ratio']:.3f}")
    print(f"remove_sinks() gives a plain {type(plain).__name__} with MLP width {plain.config.n_inner} "
          f"(was {result['full_width']}) and the same validation loss.")


if __name__ == "__main__":
    main()
