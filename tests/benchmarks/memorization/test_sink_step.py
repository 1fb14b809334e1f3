"""The sink steps of the optimizer experiment (benchmarks/memorization/sink_step.py): before AdamW's step
the sinks move by the rule's step (rowwise: lr * scale * g / (sqrt(v) + eps) with one running second
moment per neuron; factored: one per neuron and one per column; sign; Adam with a per-neuron second
moment; Adam on the touched rows only); the sinks' gradients are zeroed, so AdamW's moments for them
stay zero; the general neurons take AdamW's step as without it."""

import copy

import pytest
import torch
from tiny_models import batch, tiny_model

from benchmarks.memorization.sink_step import attach_sink_step, dequantize, factored_update, quantize
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


def attached(kind: str, layer: int = 0):
    """The rule ``kind`` attached and one backward: the optimizer, the rule, layer ``layer``'s output
    projection, its sinks' span and their gradient."""
    model = get_memsink_model(tiny_model("gpt2"), CFG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    attach_sink_lr(model, opt)
    step = attach_sink_step(model, opt, kind)
    x = batch(2, 8)
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([3, 4])).loss.backward()
    proj = model.transformer.h[layer].mlp.c_proj
    start, n = proj.memsink.sink_spans[0]
    return opt, step, proj, start, n, proj.weight.grad.narrow(0, start, n).clone()


def stepped(kind: str, steps: int, layer: int = 0):
    """:func:`attached`, then ``steps`` optimizer steps (gradients zeroed, not dropped, after each): the
    rule, the sink gradient and how the sinks moved at each step."""
    opt, step, proj, start, n, grad = attached(kind, layer)
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


@pytest.mark.parametrize("kind, power", [("factored", 1.0), ("factored_half", 0.5)])
def test_factored_step_divides_by_a_neurons_and_an_inputs_mean_square(kind, power):
    # the second step without a gradient: nothing touched, nothing moves
    _, grad, moves = stepped(kind, 2)
    rows = grad.pow(2).mean(1, keepdim=True)
    touched = rows[:, 0] > 0
    inputs = grad[touched].pow(2).mean(0, keepdim=True)
    assert inputs.std() > 0.1 * inputs.mean()  # (inputs of unequal scale: the factor matters)
    want = -1e-2 * 5.0 * grad / ((rows * (inputs / inputs.mean()) ** power).sqrt() + 1e-8)
    torch.testing.assert_close(moves[0], want)
    assert torch.equal(moves[1], torch.zeros_like(moves[1]))


def test_clipped_steps_scale_each_neurons_update_to_a_root_mean_square_of_at_most_one():
    _, grad, (moved,) = stepped("factored_clip", 1)
    rows = grad.pow(2).mean(1, keepdim=True)
    inputs = grad[rows[:, 0] > 0].pow(2).mean(0, keepdim=True)
    update = grad / ((rows * inputs / inputs.mean()).sqrt() + 1e-8)
    rms = update.pow(2).mean(1, keepdim=True).sqrt()
    assert (rms > 1.01).any() and (rms[rows > 0] < 0.99).any()  # (rows over and under the bound)
    torch.testing.assert_close(moved, -1e-2 * 5.0 * update / rms.clamp_min(1.0))
    _, grad, (moved,) = stepped("rowwise_clip", 1)  # (a first step of rowwise is at one already)
    torch.testing.assert_close(moved, -1e-2 * 5.0 * grad / (grad.pow(2).mean(1, keepdim=True).sqrt() + 1e-8))


@pytest.mark.parametrize("kind, bound", [("rowwise_clip", 1.0), ("rowwise_clip15", 1.5), ("rowwise_clip2", 2.0)])
def test_clipped_rowwise_steps_cut_each_neurons_update_at_its_bound(kind, bound):
    """A neuron's running mean set below and above its gradient's square: rows whose update's root mean
    square passes the bound are scaled down to it, the others move by rowwise's step."""
    opt, step, proj, start, n, grad = attached(kind)
    (index,) = [i for i, (p, _, s, _) in enumerate(step.targets) if p is proj.weight and s == start]
    rows = grad.pow(2).mean(1)
    ratio = torch.linspace(0.02, 3.0, n)  # each neuron's earlier mean against its gradient's square now
    step.second[index].copy_(rows * ratio)
    step.count[index].fill_(1000.0)  # (bias correction 1)
    before = proj.weight.detach().narrow(0, start, n).clone()
    opt.step()
    moved = proj.weight.detach().narrow(0, start, n) - before
    update = grad / ((0.95 * rows * ratio + 0.05 * rows).sqrt() + 1e-8).unsqueeze(1)
    rms = update.pow(2).mean(1, keepdim=True).sqrt()
    touched = rows > 0
    assert (rms[touched] > bound * 1.01).any() and (rms[touched] < bound * 0.99).any()
    torch.testing.assert_close(moved, -1e-2 * 5.0 * update / (rms / bound).clamp_min(1.0), rtol=1e-4, atol=1e-7)


def test_factored_in_and_out_factor_the_sinks_of_their_projections_only():
    model = get_memsink_model(tiny_model("llama"), CFG)
    opt = torch.optim.AdamW(model.parameters())
    roles = {id(p): m.memsink.role for m in model.modules() if is_patched_projection(m)
             for p in m.parameters(recurse=False)}
    assert {"in", "out"} <= set(roles.values())
    for kind, role in (("factored_in", "in"), ("factored_out", "out")):
        step = attach_sink_step(model, opt, kind)
        assert [power for power in step.powers] == [float(roles[id(p)] == role) for p, _, _, _ in step.targets]


def test_factored_step_of_a_rank_one_gradient_is_adams_first_step():
    g = torch.outer(torch.tensor([0.5, -2.0, 0.0]), torch.tensor([1e-3, 3.0, -0.2, 7.0]))
    update = factored_update(g, 0, torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.95, 1e-12)
    torch.testing.assert_close(update, g.sign())
    along_columns = factored_update(g.t(), 1, torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.95, 1e-12)
    torch.testing.assert_close(along_columns, g.sign().t())


def test_lazy_step_is_adam_on_the_touched_rows_only():
    # the second step without a gradient: untouched rows wait (AdamW's momentum would move them)
    _, grad, moves = stepped("lazy", 2)
    torch.testing.assert_close(moves[0], -1e-2 * 5.0 * grad / (grad.abs() + 1e-8))  # Adam's first step
    assert moves[0].abs().max() > 0 and torch.equal(moves[1], torch.zeros_like(moves[1]))


def trained(kind: str | None, steps: int = 3, reload: bool = False, decay: float = 0.1):
    """The sink weights of layer 0's input projection after ``steps`` AdamW steps (decay 0.1) with
    the rule ``kind`` (None: AdamW's own step of the sinks), and before them. ``reload``: a rising
    learning-rate schedule, and the optimizer's state dict loaded back once the rule is attached, as
    accelerate's ``prepare`` does (which gives the optimizer new param-group dicts)."""
    model = get_memsink_model(tiny_model("gpt2"), CFG).train()
    proj = model.transformer.h[0].mlp.c_fc  # Conv1D: neurons along dim 1
    start, n = proj.memsink.sink_spans[0]
    before = proj.weight.detach().narrow(1, start, n).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=decay)
    attach_sink_lr(model, opt)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.2 * (s + 1)) if reload else None
    if kind is not None:
        attach_sink_step(model, opt, kind)
    if reload:
        opt.load_state_dict(opt.state_dict())
    for _ in range(steps):
        x = batch(2, 8)
        model(input_ids=x, labels=x, sequence_ids=torch.tensor([3, 4])).loss.backward()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    return before, proj.weight.detach().narrow(1, start, n).clone()


@pytest.mark.parametrize("reload", [False, True])
def test_adam_fp32_step_is_adamws_own_step_of_the_sinks(reload):
    # the control of the 8-bit runs: the same rule outside AdamW, decay order included, and at the
    # schedule's learning rate after the optimizer's groups were made anew (a rule that kept the
    # groups it saw when attached stepped at the first step's rate ever after)
    _, adamw = trained(None, reload=reload)
    before, control = trained("adam_fp32", reload=reload)
    assert (adamw - before).abs().max() > 1e-2
    torch.testing.assert_close(control, adamw, rtol=0, atol=1e-5)


def test_8bit_moments_follow_adamw_within_their_rounding():
    _, adamw = trained(None)
    before, eight = trained("adam_8bit")
    moved = (adamw - before).abs().max()
    assert 0 < (eight - adamw).abs().max() < 0.1 * moved


def test_quantize_keeps_each_block_within_its_levels():
    x = torch.randn(3, 300) * torch.logspace(-3, 0, 300)
    for signed, values in ((True, x), (False, x * x)):
        codes, scale = quantize(values, signed)
        assert codes.dtype == torch.uint8 and scale.numel() == 4  # 900 values: 4 blocks of 256
        back = dequantize(codes, scale, signed, values)
        top = values.abs().reshape(-1)[:256].max()
        big = values.abs().reshape(-1)[:256] > 0.5 * top  # near the block's largest: about 1% apart
        assert ((back - values).abs().reshape(-1)[:256][big] <= 0.02 * top).all()
        assert (back.sign() * values.sign() >= 0).all()


def test_lowrank_sinks_change_by_rank_r_and_keep_their_start():
    before, after = trained("lowrank4")
    change = after - before
    assert change.abs().max() > 0
    assert torch.linalg.matrix_rank(change.t()).item() == 4  # (rows: neurons; 16 inputs of the tiny model)


@pytest.mark.parametrize("kind", ["rowwise_bf16", "adam_8bit_bf16"])
def test_bf16_rules_leave_the_sinks_in_bf16(kind):
    # (rounded after the rule's step: AdamW's weight decay, when there is one, follows in fp32)
    before, after = trained(kind, decay=0.0)
    assert not torch.equal(before, before.bfloat16().float())  # (fp32 before the first step)
    assert torch.equal(after, after.bfloat16().float()) and not torch.equal(after, before)
