"""benchmarks/finetune_cost.py's mechanics: parameter counts of each variant (exact), the 7B
arithmetic against Llama-2-7B's published size, and one end-to-end run at a tiny shape (its
timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import finetune_cost  # noqa: E402
import torch  # noqa: E402

from hf_memsinks import MemSinkConfig  # noqa: E402


def test_arithmetic_matches_published_sizes_and_sink_counts():
    p = finetune_cost.shape_params(finetune_cost.ARITHMETIC_SHAPES["llama-2-7b"])
    assert p["total"] == 6_738_415_616  # Llama-2-7B
    assert finetune_cost.shape_params(finetune_cost.ARITHMETIC_SHAPES["llama-3.2-1b"])["total"] == 1_235_814_400
    rows = finetune_cost.arithmetic(finetune_cost.ARITHMETIC_SHAPES["llama-2-7b"], 11008)
    assert rows["sinks"]["parameters"] - rows["full"]["parameters"] == 32 * 3 * 4096 * 11008
    sink_params = 32 * 3 * 4096 * 11008  # under rowwise: no AdamW moments for them, and gradients of the
    saved = rows["sinks+lora_r16"]["state_gib"] - rows["sinks+lora_r16+rowwise"]["state_gib"]  # touched rows
    assert abs(saved * 2**30 - (8 + 4 * 0.95**4) * sink_params) < 1
    saved = rows["sinks"]["state_gib"] - rows["sinks+rowwise"]["state_gib"]  # (a full fine-tune: and the
    assert abs(saved * 2**30 - (8 + 2 * 0.95**4) * sink_params) < 1  # bf16 gradients of the untouched rows)
    first = finetune_cost.arithmetic(finetune_cost.ARITHMETIC_SHAPES["llama-2-7b"], 2 * 11008, layers=1)
    assert first["sinks"]["parameters"] - first["full"]["parameters"] == 3 * 4096 * 2 * 11008


def test_variants_count_what_they_train():
    shape = finetune_cost.SHAPES["tiny"]
    counts = {}
    for variant in finetune_cost.VARIANTS:
        model, _ = finetune_cost.prepare(variant, shape, torch.float32, {})
        counts[variant] = (sum(p.numel() for p in model.parameters()),
                           sum(p.numel() for p in model.parameters() if p.requires_grad))
    full, lora = counts["full"][0], counts["lora_r16"][1]
    general, sinks = MemSinkConfig.for_finetuning().num_sinks_for(shape["mlp"])
    assert general == sinks == shape["mlp"]
    sink_params = shape["layers"] * 3 * shape["hidden"] * sinks
    assert counts["for_finetuning"] == (full + sink_params, full + sink_params)
    # under LoRA the sinks train stored apart: the sinks' size, not the MLP's (the adapters
    # on the widened MLP projections grow by r per sink neuron)
    wider_lora = lora + shape["layers"] * 3 * finetune_cost.LORA_R * sinks
    assert counts["for_finetuning+lora_r16"][1] == wider_lora + sink_params
    assert counts["for_finetuning+rowwise+lora_r16"] == counts["for_finetuning+lora_r16"]  # (what steps them differs)
    # first_layer: the first layer only, twice its width
    first = 3 * shape["hidden"] * 2 * shape["mlp"]
    assert counts["first_layer"] == (full + first, full + first)
    wider_lora = lora + 3 * finetune_cost.LORA_R * 2 * shape["mlp"]
    assert counts["first_layer+lora_r16"][1] == wider_lora + first


def test_script_runs_end_to_end(tmp_path):
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune_cost.py"), "--shapes", "tiny", "--steps", "1",
                    "--rounds", "1", "--batch", "2", "--seq", "16", "--variants", "full,lora_r16,for_finetuning",
                    "--recipe", 'narrow={"num_sink_neurons": 8}', "--paired-rounds", "2", "--out", str(out)],
                   check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["full", "lora_r16", "for_finetuning", "narrow", "narrow+lora_r16"]
    (hook,) = result["sink_step"]  # the sink-LR hook's copy: every sink of the tiny Llama's 2 layers, fp32
    assert hook["copy_gib"] * 2**30 == 2 * 3 * 64 * 176 * 4 and set(hook["step_s"]) == {"in_place", "copy"}
    narrow = next(r for r in result["rows"] if r["variant"] == "narrow")
    assert narrow["parameters"] == result["rows"][0]["parameters"] + 2 * 3 * 64 * 8
    assert {"step_vs_full", "memory_vs_lora_r16"} <= set(narrow)
    assert {"llama-2-7b/for_finetuning", "llama-2-7b/first_layer"} <= set(result["arithmetic"])
    (paired,) = result["paired"]  # each variant's rounds against its reference's same rounds
    assert {v: q["reference"] for v, q in paired["vs_reference"].items()} == {
        "for_finetuning": "full", "narrow": "full", "narrow+lora_r16": "lora_r16"}
    assert all(len(t) == 2 for t in paired["step_s_all"].values())
    q = paired["vs_reference"]["narrow"]
    assert q["per_round"] == [a / b for a, b in zip(paired["step_s_all"]["narrow"], paired["step_s_all"]["full"])]


def test_the_no_sink_grads_bound_frees_only_the_sinks_gradients():
    """The bound's sinks take no gradient (so they never move) while LoRA's matrices train."""
    model, has_sinks = finetune_cost.prepare("for_finetuning+rowwise+lora_r16+no_sink_grads",
                                             finetune_cost.SHAPES["tiny"], torch.float32, {})
    opt = finetune_cost._optimizer(model, has_sinks)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokens, ids = torch.randint(0, 512, (2, 16)), torch.tensor([3, 4])
    finetune_cost._timed_step(model, opt, tokens, ids, "cpu")
    after = dict(model.named_parameters())
    deltas = [n for n in before if ".sink_part_" in n]
    assert deltas and all(torch.equal(after[n], before[n]) and after[n].grad is None for n in deltas)
    assert any(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)


def test_the_allocator_settings_reach_the_measuring_process():
    common = ["--steps", "1", "--batch", "2", "--seq", "16"]
    for env in (finetune_cost.KEEP_FREED, finetune_cost.RETURN_FREED):
        assert finetune_cost._in_subprocess(["--part", "tiny:full", *common], env)["allocator"] == env
    assert finetune_cost._in_subprocess(["--part", "tiny:full", *common])["allocator"] == {}


def test_the_later_sightings_variant_times_steps_with_the_sinks_on():
    """Under sinks_from_sighting=2 each step carries the warm-up step's IDs: the warm-up (untimed) leaves
    the sinks alone, every timed step is a second sighting that moves them."""
    model, has_sinks = finetune_cost.prepare("for_finetuning+rowwise+later", finetune_cost.SHAPES["tiny"],
                                             torch.float32, {})
    opt = finetune_cost._optimizer(model, has_sinks)
    ids = finetune_cost._step_ids(model, has_sinks, torch.tensor([[3, 4], [5, 6]]))
    assert ids.tolist() == [[3, 4], [3, 4]]
    sinks = {n: p for n, p in model.named_parameters() if ".sink_part_" in n}
    start = {n: p.detach().clone() for n, p in sinks.items()}
    moved = []
    for step in range(2):
        finetune_cost._timed_step(model, opt, torch.randint(0, 512, (2, 16)), ids[step], "cpu")
        moved.append(any(not torch.equal(p, start[n]) for n, p in sinks.items()))
    assert moved == [False, True]
    assert model.memsink.routing.sightings.counts.tolist() == [2, 2]
