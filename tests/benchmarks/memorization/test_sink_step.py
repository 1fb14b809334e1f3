"""The sink steps of the optimizer experiment (benchmarks/memorization/sink_step.py): before AdamW's step
the sinks move by the rule's step (rowwise: lr * scale * g / (sqrt(v) + eps) with one running second
moment per neuron; sign; Adam with a per-neuron second moment; Adam on the touched rows only); the
sinks' gradients are zeroed, so AdamW's moments for them stay zero; the general neurons take AdamW's
step as without it."""

import copy

import torch
from tiny_models import batch, tiny_model

from benchmarks.memorization.sink_step import attach_sink_step
from hf_memsinks import MemSinkConfig, attach_sink_lr, get_memsink_model
from hf_memsinks.layers.projections import is_patched_projection

CFG = MemSinkConfig(mode="add", sink_fraction=0.5, sink_active_prob=0.3, sink_lr_scale=5.0, sink_init="copy")


def test_rowwise_step_moves_touched_sinks_by_their_normalised_gradient():
    model = get_memsink_model(tiny_model("gpt2"), CFG).train()
    plain = copy.deepcopy(model)
    opts = []
    for m, rowwise in ((model, True), (plain, False)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
        attach_sink_lr(m, opt)
        if rowwise:
            step = attach_sink_step(m, opt, "rowwise")
        x = batch(2, 8)
        m(input_ids=x, labels=x, sequence_ids=torch.tensor([3, 4])).loss.backward()
        opts.append(opt)
    proj = model.transformer.h[0].mlp.c_proj  # Conv1D: neurons along dim 0 (new sinks' input rows get no gradient yet)
    dim, (start, n) = 0, proj.memsink.sink_spans[0]
    before = proj.weight.detach().narrow(dim, start, n).clone()
    grad = proj.weight.grad.narrow(dim, start, n).clone()
    rms = grad.pow(2).mean(1, keepdim=True).sqrt()
    touched = rms > 0
    assert 0 < touched.sum() < n  # (the IDs' sinks only)
    for opt in opts:
        opt.step()
    moved = proj.weight.detach().narrow(dim, start, n) - before
    want = -1e-2 * 5.0 * grad / (rms + 1e-8)
    torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-7)
    assert torch.equal(moved[~touched[:, 0]], torch.zeros_like(moved[~touched[:, 0]]))
    state = opts[0].state[proj.weight]
    assert torch.equal(state["exp_avg"].narrow(dim, start, n), torch.zeros_like(grad))  # AdamW left the sinks
    (index,) = [i for i, (p, _, s, _) in enumerate(step.targets) if p is proj.weight and s == start]
    assert torch.equal(step.count[index].bool(), touched[:, 0])  # one step counted for each touched neuron
    for a, b in zip(model.modules(), plain.modules()):  # the general neurons: AdamW's step, as without it
        if is_patched_projection(a):
            torch.testing.assert_close(a.general_and_sink_parts()["weight"][0], b.general_and_sink_parts()["weight"][0])


def stepped(kind: str, steps: int, layer: int = 0):
    """The rule ``kind`` attached, one backward, then ``steps`` optimizer steps (gradients zeroed, not
    dropped, after each): the rule, the sink gradient of layer ``layer``'s output projection and how
    its sinks moved at each step."""
    model = get_memsink_model(tiny_model("gpt2"), CFG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    attach_sink_lr(model, opt)
    step = attach_sink_step(model, opt, kind)
    x = batch(2, 8)
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([3, 4])).loss.backward()
    proj = model.transformer.h[layer].mlp.c_proj
    start, n = proj.memsink.sink_spans[0]
    grad = proj.weight.grad.narrow(0, start, n).clone()
    moves = []
    for _ in range(steps):
        before = proj.weight.detach().narrow(0, start, n).clone()
        opt.step()
        opt.zero_grad(set_to_none=False)
        moves.append(proj.weight.detach().narrow(0, start, n) - before)
    return step, grad, moves


def test_sign_step_moves_touched_sink_weights_by_the_sign_of_their_gradient():
    step, grad, (moved,) = stepped("sign", 1, layer=1)
    assert (grad != 0).any() and (grad == 0).any()
    torch.testing.assert_close(moved, -1e-2 * 5.0 * grad.sign())
    assert all(f is None for f in step.first)  # (no state)


def test_momentum_step_is_adam_with_one_second_moment_per_neuron():
    # the second step without a gradient: the momentum still moves the sinks
    _, grad, moves = stepped("momentum", 2)
    rms = grad.pow(2).mean(1, keepdim=True).sqrt()
    lr = 1e-2 * 5.0
    torch.testing.assert_close(moves[0], -lr * grad / (rms + 1e-8))  # bias-corrected: m = g, v = mean(g^2)
    second = -lr * (0.9 / 1.9) * grad / ((0.95 / 1.95) ** 0.5 * rms + 1e-8)
    torch.testing.assert_close(moves[1], second)
    assert moves[1].abs().max() > 0


def test_lazy_step_is_adam_on_the_touched_rows_only():
    # the second step without a gradient: untouched rows wait (AdamW's momentum would move them)
    _, grad, moves = stepped("lazy", 2)
    torch.testing.assert_close(moves[0], -1e-2 * 5.0 * grad / (grad.abs() + 1e-8))  # Adam's first step
    assert moves[0].abs().max() > 0 and torch.equal(moves[1], torch.zeros_like(moves[1]))
