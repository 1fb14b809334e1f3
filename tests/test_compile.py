"""torch.compile (inductor, CPU) of a patched model: same loss and gradients as eager in
training with per-sequence IDs, and the same logits with sinks dropped."""

import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model


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
