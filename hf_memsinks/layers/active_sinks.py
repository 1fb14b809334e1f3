"""``MemSinkConfig.compute_active_sinks_only``: a training forward computes, per batch row, only the
sinks that row's IDs activate, instead of every sink then masked to zero.

With few sinks active per ID (5% in the fine-tuning recipe) almost all of the sinks' matmuls
produce values the mask then zeroes. Here each row ``b`` takes the ``k`` sinks active anywhere in
it (:class:`~.state.ActiveSinks`: per-token masks give the union over the row's tokens, shorter
rows are padded with sinks inactive in them), and

* an input projection outputs, per chunk, its general neurons then the row's ``k`` gathered sinks
  (``x @ W_general^T`` and a batched ``x_b @ W_sink[index_b]^T``), so the model's own elementwise
  ``act(gate) * up`` runs unchanged on the narrower hidden state;
* the output projection masks the gathered part by the mask at those sinks (per token, and zero
  at padding), then adds ``h_general @ W_general^T`` and a batched matmul with the gathered columns.

Masked sinks add exact zeros in the dense computation, so the outputs are the same up to float
summation order, and so are the gradients: a gathered weight's backward adds into the rows it
came from, and a sink no row activates gets an exact zero, as when masked. The sink deltas
(:mod:`.sink_deltas`) are gathered beside the weights' sink rows. Wherever the narrower hidden
state could meet code that expects the full width, the projections take the dense path instead:
see :func:`active_sinks_for`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import sink_deltas
from .lora_parts import plain_lora
from .mask_multiply import MaskSinks, maskable_in_place
from .state import ActiveSinks, ForwardSinks


def active_sinks_for(module: nn.Module, call: ForwardSinks, x: torch.Tensor) -> ActiveSinks | None:
    """The call's active sinks where ``module`` (either projection of one MLP) computes only those,
    else None: only training calls masked by IDs, with the config's switch on, and not when a norm
    between the projections needs the full width (``behind_norm``), an adapter other than plain
    LoRA wraps a projection of the MLP (it computes and reads every neuron; plain LoRA gathers
    too: :mod:`.active_sinks_lora`), under torch.compile (the width changes with the batch), or
    with an input whose rows are not the IDs' rows. The output projection follows its input's
    width: gathered only if its input projections gathered."""
    m = module.memsink
    if not (m.state.config.compute_active_sinks_only and call.kind == "mask" and module.training):
        return None
    if m.behind_norm or torch.compiler.is_compiling() or not all(plain_lora(w) for w in m.mlp_adapters):
        return None
    active = m.state.active_sinks(call, m.layer, m.sinks)
    rows = active.index.shape[0]
    fits = x.shape[0] == rows if x.dim() == 3 else x.dim() == 2 and rows > 0 and x.shape[0] % rows == 0
    if m.role == "out" and x.shape[-1] != m.general + active.index.shape[1]:
        fits = False  # its input projections computed every sink (which all-sink gathers lay out alike)
    return active if fits else None


def _rows(tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """``tensor`` with one neuron per row (a 2-D weight stored with its neurons along dim 1, transposed)."""
    return tensor.t() if tensor is not None and dim == 1 else tensor


def _gather(rows: torch.Tensor, delta: torch.Tensor | None, first: int, count: int, chunk: int,
            index: torch.Tensor) -> torch.Tensor:
    """Rows ``first + index`` of ``rows`` plus rows ``chunk * count + index`` of the sink delta:
    shape ``index.shape + rows.shape[1:]``."""
    flat = index.reshape(-1)
    out = rows.narrow(0, first, count).index_select(0, flat)
    if delta is not None:
        out = out + delta.narrow(0, chunk * count, count).index_select(0, flat)
    return out.view(*index.shape, *rows.shape[1:])


def _grad_rows(like: torch.Tensor | None, needed: bool, dim: int, zero: bool = False):
    """A gradient for ``like`` (None when not ``needed``) and its one-neuron-per-row view."""
    if not needed:
        return None, None
    grad = torch.zeros_like(like) if zero else torch.empty_like(like)
    return grad, _rows(grad, dim)


class GatheredInput(torch.autograd.Function):
    """An input projection over the general neurons and, per row, its gathered sinks. Its own
    backward, so that the weight's gradient is one full-size tensor written in place (the general
    rows by the matmul itself, the sink rows zeroed then added into), as the dense matmul's is:
    slicing the weight in autograd gives one zero-filled full-size gradient per slice to add up,
    most of the step this path saves, spent again on memory traffic."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_delta, bias_delta, dim: int, spans: list, index):
        rows, delta = _rows(weight, dim), _rows(weight_delta, dim)
        outs, gathered = [], []
        for chunk, ((ga, gn), (sa, sn)) in enumerate(spans):
            outs.append(F.linear(x, rows.narrow(0, ga, gn), None if bias is None else bias.narrow(0, ga, gn)))
            gathered.append(_gather(rows, delta, sa, sn, chunk, index))  # (B, k, in)
            out = torch.bmm(x, gathered[-1].transpose(1, 2))
            if bias is not None:
                out = out + _gather(bias, bias_delta, sa, sn, chunk, index).unsqueeze(1)
            outs.append(out)
        ctx.save_for_backward(x, weight, bias, weight_delta, bias_delta, index, *gathered)
        ctx.dim, ctx.spans = dim, spans
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, weight_delta, bias_delta, index, *gathered = ctx.saved_tensors
        need = ctx.needs_input_grad
        rows, flat, k = _rows(weight, ctx.dim), index.reshape(-1), index.shape[1]
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        grad_w, grad_w_rows = _grad_rows(weight, need[1], ctx.dim)
        grad_b, _ = _grad_rows(bias, need[2], 0)
        grad_wd, grad_wd_rows = _grad_rows(weight_delta, need[3], ctx.dim, zero=True)
        grad_bd, _ = _grad_rows(bias_delta, need[4], 0, zero=True)
        offset = 0
        for chunk, (((ga, gn), (sa, sn)), sinks) in enumerate(zip(ctx.spans, gathered)):
            g_general, g_sinks = grad.narrow(-1, offset, gn), grad.narrow(-1, offset + gn, k)
            offset += gn + k
            if need[0]:
                part = torch.baddbmm(g_general @ rows.narrow(0, ga, gn), g_sinks, sinks)
                grad_x = part if grad_x is None else grad_x.add_(part)
            if need[1] or need[3]:
                g_rows = torch.bmm(g_sinks.transpose(1, 2), x).reshape(-1, x.shape[-1])  # (B * k, in)
            if need[1]:
                torch.mm(g_general.reshape(-1, gn).t(), x2, out=grad_w_rows.narrow(0, ga, gn))
                grad_w_rows.narrow(0, sa, sn).zero_().index_add_(0, flat, g_rows)
            if need[3]:
                grad_wd_rows.narrow(0, chunk * sn, sn).index_add_(0, flat, g_rows)
            if need[2] or need[4]:
                g_bias = g_sinks.sum(1).reshape(-1)
            if need[2]:
                grad_b.narrow(0, ga, gn).copy_(g_general.sum((0, 1)))
                grad_b.narrow(0, sa, sn).zero_().index_add_(0, flat, g_bias)
            if need[4]:
                grad_bd.narrow(0, chunk * sn, sn).index_add_(0, flat, g_bias)
        return grad_x, grad_w, grad_b, grad_wd, grad_bd, None, None, None


class GatheredOutput(torch.autograd.Function):
    """The output projection of the general neurons and, per row, its gathered sinks (its own
    backward for the reason :class:`GatheredInput` gives)."""

    @staticmethod
    def forward(ctx, h, weight, bias, weight_delta, dim: int, general: int, index):
        rows = _rows(weight, dim)  # (neurons, out)
        sinks = _gather(rows, _rows(weight_delta, dim), general, rows.shape[0] - general, 0, index)  # (B, k, out)
        out = torch.baddbmm(F.linear(h[..., :general], rows[:general].t(), bias), h[..., general:], sinks)
        ctx.save_for_backward(h, weight, bias, weight_delta, index, sinks)
        ctx.dim, ctx.general = dim, general
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, weight_delta, index, sinks = ctx.saved_tensors
        need, g = ctx.needs_input_grad, ctx.general
        rows, flat, k = _rows(weight, ctx.dim), index.reshape(-1), index.shape[1]
        grad2, h2 = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_h = None
        if need[0]:
            grad_h = grad.new_empty(h.shape)
            torch.mm(grad2, rows[:g].t(), out=grad_h.view(-1, g + k).narrow(1, 0, g))
            grad_h.narrow(-1, g, k).copy_(torch.bmm(grad, sinks.transpose(1, 2)))
        grad_w, grad_w_rows = _grad_rows(weight, need[1], ctx.dim)
        grad_wd, grad_wd_rows = _grad_rows(weight_delta, need[3], ctx.dim, zero=True)
        if need[1] or need[3]:
            g_rows = torch.bmm(h.narrow(-1, g, k).transpose(1, 2), grad).reshape(-1, grad.shape[-1])  # (B * k, out)
        if need[1]:
            torch.mm(h2.narrow(1, 0, g).t(), grad2, out=grad_w_rows.narrow(0, 0, g))
            grad_w_rows.narrow(0, g, rows.shape[0] - g).zero_().index_add_(0, flat, g_rows)
        if need[3]:
            grad_wd_rows.index_add_(0, flat, g_rows)
        grad_b = grad2.sum(0) if need[2] else None
        return grad_h, grad_w, grad_b, grad_wd, None, None, None


def _autocast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors as autocast would hand them to a linear layer (cast to its dtype, differentiably,
    so each gradient comes back in its tensor's own dtype), for the Functions above, which run with
    autocast off: their backward is written for one dtype."""
    x = tensors[0]
    if not torch.is_autocast_enabled(x.device.type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return [t if t is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype) for t in tensors]


def gather_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, spans: list,
                index: torch.Tensor, weight_delta: torch.Tensor | None = None,
                bias_delta: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(B, T, in)`` times ``weight``'s general rows then, per row, its gathered sink rows,
    per chunk of ``spans`` (``[(general span, sink span)]``), as autocast would compute a linear layer."""
    tensors = _autocast(x, weight, bias, weight_delta, bias_delta)
    with torch.autocast(x.device.type, enabled=False):
        return GatheredInput.apply(*tensors, dim, spans, index)


def gather_columns(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, general: int,
                   index: torch.Tensor, weight_delta: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` ``(B, T, general + k)`` times ``weight``'s general columns then, per row, its gathered
    sink columns, as autocast would compute a linear layer."""
    tensors = _autocast(h, weight, bias, weight_delta)
    with torch.autocast(h.device.type, enabled=False):
        return GatheredOutput.apply(*tensors, dim, general, index)


def by_row(x: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """``x`` as ``(B, T, ·)`` (OPT flattens its MLP's input to ``(B * T, ·)``)."""
    return x if x.dim() == 3 else x.reshape(active.index.shape[0], -1, x.shape[-1])


def gathered_input(module: nn.Module, x: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """An input projection's output: per chunk, the general neurons then the row's gathered sinks."""
    m, parts = module.memsink, sink_deltas.deltas(module)
    out = gather_rows(by_row(x, active), module.weight, module.bias, module.neuron_dims()["weight"],
                      list(zip(m.general_spans, m.sink_spans)), active.index, parts.get("weight"), parts.get("bias"))
    return out if x.dim() == 3 else out.reshape(*x.shape[:-1], out.shape[-1])


def masked_gathered(module: nn.Module, h: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """An output projection's gathered input ``(B, T, general + k)``, its sinks masked by the call's
    mask at them (per token, and zero at padding)."""
    hb = by_row(h, active)
    return MaskSinks.apply(hb, active.keep, None, module.memsink.general, maskable_in_place(hb), None)


def gathered_output(module: nn.Module, h: torch.Tensor, active: ActiveSinks,
                    masked: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection of ``h`` = general neurons then the row's gathered sinks, these masked
    (:func:`masked_gathered`, or ``masked`` where the caller has it already)."""
    hb = masked_gathered(module, h, active) if masked is None else masked
    out = gather_columns(hb, module.weight, module.bias, module.neuron_dims()["weight"], module.memsink.general,
                         active.index, sink_deltas.deltas(module).get("weight"))
    return out if h.dim() == 3 else out.reshape(*h.shape[:-1], out.shape[-1])
