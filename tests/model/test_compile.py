"""torch.compile (inductor, CPU) of a patched model: same loss and gradients as eager in
training with per-sequence IDs, and the same logits with sinks dropped."""

import inspect

import torch
from tiny_models import batch, tiny_model

import hf_memsinks.model.forward as model_module
from hf_memsinks import MemSinkConfig, get_memsink_model, sink_mask


def test_compiled_patched_model_matches_eager():
    cfg = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
    eager = get_memsink_model(tiny_model("llama"), cfg)
    other = get_memsink_model(tiny_model("llama"), cfg)
    compiled = torch.compile(other)
    x, ids = batch(4, 16), torch.tensor([3, 5, 7, 9])
    eager.train()
    compiled.train()
    loss_e = eager(input_ids=x, labels=x, sequence_ids=ids).loss
    loss_c = compiled(input_ids=x, labels=x, sequence_ids=ids).loss
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, eager(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_compiled_mask_is_the_eager_mask():
    # Inductor's C++ treats int64 wraparound as undefined: compiling the hash itself gave wrong
    # masks and heap corruption at 307 sinks. sink_mask must stay eager inside a compiled graph.
    ids = torch.arange(1, 9)
    compiled = torch.compile(lambda i: sink_mask(i, 307, 0.3))
    for _ in range(2):
        assert torch.equal(compiled(ids), sink_mask(ids, 307, 0.3))


def test_compiled_training_steps_match_eager_with_one_graph_break_for_masks():
    cfg = MemSinkConfig(sink_fraction=0.3, sink_active_prob=0.3)
    eager = get_memsink_model(tiny_model("gpt2", n_inner=1024), cfg)
    other = get_memsink_model(tiny_model("gpt2", n_inner=1024), cfg)
    compiled = torch.compile(other)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, other)]
    eager.train()
    compiled.train()
    x = batch(4, 16)
    for ids in (torch.tensor([3, 5, 7, 9]), torch.tensor([11, 5, -1, 2])):
        for model, opt in zip((eager, compiled), opts):
            model(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)

    explained = torch._dynamo.explain(get_memsink_model(tiny_model("gpt2", n_inner=1024), cfg).train())(
        input_ids=x, labels=x, sequence_ids=torch.tensor([3, 5, 7, 9]))
    stacks = [" ".join(str(f) for f in reason.user_stack) for reason in explained.break_reasons]
    ours = [s for s in stacks if "hf_memsinks" in s]
    # One break, at the start of the call (mask build), before the model: none inside the layers.
    assert len(ours) == 1 and "model/forward.py" in ours[0], stacks
    line = int(ours[0].split("line ")[1].split()[0])
    assert "_start_call(" in inspect.getsource(model_module).splitlines()[line - 1], ours
