"""Checks that need a CUDA device (run by hand on a GPU machine; CI has none).

1. TRL's SFTTrainer path on CUDA in bf16, where TRL's fused LM head takes its Triton "compact"
   branch (only labelled positions scored): text, packing and LoRA move exactly the batch IDs' sinks.
2. Four threads forwarding one model on the GPU at once: each equals its forward run alone.
3. torch.compile (inductor, Triton) training: two AdamW steps equal eager; masks equal eager.

    python benchmarks/gpu_checks.py --out gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import batch, tiny_model  # noqa: E402

from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask  # noqa: E402


def sft_checks(results: dict) -> None:
    from integrations import test_sft as t

    for case in ("text", "packing", "lora"):
        make, config = t.CASES[case]
        config = dict(config)
        model = t.patched_llama().cuda()
        before = t.snapshot(model)
        extra = dict(config.pop("args", {}))
        args = t.SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
                           learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                           bf16=True, **{"max_length": 64, **extra})
        trainer = t.MemSinkSFTTrainer(model=model, args=args, train_dataset=make(t.IDS),
                                      processing_class=t.tokenizer(), **config)
        trainer.train()
        want = t.expected(t.IDS).cuda()
        ok = all(torch.equal(sinks, want) for sinks, _ in t.moved(before).values())
        results[f"sft_{case}_exact_sinks"] = ok
        results[f"sft_{case}_device"] = str(next(model.parameters()).device)


def thread_check(results: dict) -> None:
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    model = get_memsink_model(tiny_model("llama"), cfg).cuda().train()
    jobs = [(batch(b, 64, seed=b).cuda(), (torch.arange(1, b + 1) * (10 + b)).cuda()) for b in (2, 3, 4, 5)]
    with torch.no_grad():
        alone = [model(input_ids=x, sequence_ids=ids).logits for x, ids in jobs]
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(k):
        x, ids = jobs[k]
        barrier.wait()
        for _ in range(200):
            with torch.no_grad():
                if not torch.equal(model(input_ids=x, sequence_ids=ids).logits, alone[k]):
                    errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results["threads_equal_alone"] = not errors
    results["threads_mismatches"] = len(errors)


def compile_check(results: dict) -> None:
    cfg = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3)
    eager = get_memsink_model(tiny_model("gpt2", n_inner=1024), cfg).cuda().train()
    other = get_memsink_model(tiny_model("gpt2", n_inner=1024), cfg).cuda().train()
    compiled = torch.compile(other)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, other)]
    x = batch(4, 16).cuda()
    for ids in (torch.tensor([3, 5, 7, 9]), torch.tensor([11, 5, -1, 2])):
        for model, opt in zip((eager, compiled), opts):
            model(input_ids=x, labels=x, sequence_ids=ids.cuda()).loss.backward()
            opt.step()
            opt.zero_grad()
    diff = max(float((p - q).abs().max()) for p, q in zip(eager.parameters(), other.parameters()))
    results["compile_max_weight_diff"] = diff
    results["compile_weights_match"] = diff < 1e-4
    ids = torch.arange(1, 9).cuda()
    mask = torch.compile(lambda i: sink_mask(i, 307, 0.3))(ids)
    results["compile_mask_equal"] = bool(torch.equal(mask, sink_mask(ids, 307, 0.3)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_checks.json")
    out = parser.parse_args().out
    assert torch.cuda.is_available(), "needs a CUDA device"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    for check in (thread_check, compile_check, sft_checks):
        t0 = time.time()
        try:
            check(results)
        except Exception as e:  # report and go on: one run gives every answer
            results[f"{check.__name__}_error"] = repr(e)[:2000]
        results[f"{check.__name__}_seconds"] = round(time.time() - t0, 1)
        print(json.dumps(results, indent=1), flush=True)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
