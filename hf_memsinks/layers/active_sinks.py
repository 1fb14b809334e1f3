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
came from, and a sink no row activates gets an exact zero, as when masked. Sinks stored apart
(:mod:`.sink_parts`) are gathered from their own parameters; where the rowwise rule steps them,
their gradient is the rows backward computed (:mod:`.touched_rows`). Wherever the narrower
hidden state could meet code that expects the full width, the projections take the dense path
instead: see :func:`active_sinks_for`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import sink_parts, touched_rows
from .lora_parts import plain_lora
from .mask_multiply import MaskSinks, maskable_in_place
from .neurons import neuron_rows
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


def _gather(rows: torch.Tensor, first: int, count: int, index: torch.Tensor) -> torch.Tensor:
    """Rows ``first + index`` of ``rows``: shape ``index.shape + rows.shape[1:]``."""
    out = rows.narrow(0, first, count).index_select(0, index.reshape(-1))
    return out.view(*index.shape, *rows.shape[1:])


def _grad_rows(like: torch.Tensor | None, needed: bool, dim: int, zero: bool = False):
    """A gradient for ``like`` (None when not ``needed``) and its one-neuron-per-row view."""
    if not needed:
        return None, None
    grad = torch.zeros_like(like) if zero else torch.empty_like(like)
    return grad, neuron_rows(grad, dim)


def _row_target(ctx, needed: bool) -> touched_rows.RowTarget | None:
    """Where this backward puts the apart sinks' gradient rows (:mod:`.touched_rows`): the call's
    target where the gradient is needed and this backward accumulates it, else None (dense)."""
    return ctx.touched if needed and ctx.touched is not None and ctx.touched.accumulating() else None


def _gathered_columns(rows: torch.Tensor, sink_weight: torch.Tensor | None, dim: int, general: int,
                      index: torch.Tensor) -> torch.Tensor:
    """An output projection's sink columns at ``index``, ``(B, k, out)``: the weight's own past
    ``general`` (``rows``: one neuron per row) or, stored apart, ``sink_weight``'s."""
    if sink_weight is None:
        return _gather(rows, general, rows.shape[0] - general, index)
    sink_rows = neuron_rows(sink_weight, dim)
    return _gather(sink_rows, 0, sink_rows.shape[0], index)


class GatheredInput(torch.autograd.Function):
    """An input projection over the general neurons and, per row, its gathered sinks. Its own
    backward, so that the weight's gradient is one full-size tensor written in place (the general
    rows by the matmul itself, the sink rows zeroed then added into), as the dense matmul's is:
    slicing the weight in autograd gives one zero-filled full-size gradient per slice to add up,
    most of the step this path saves, spent again on memory traffic.

    The sink rows are the weight's own (``sink_weight`` None) or, where the sinks are stored apart
    (:mod:`.sink_parts`), ``sink_weight``'s (and ``sink_bias``'s); ``spans`` gives each chunk's
    general span in ``weight`` and sink span in whichever holds the sinks."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink_weight, sink_bias, dim: int, spans: list, index, touched):
        rows = neuron_rows(weight, dim)
        sink_rows = rows if sink_weight is None else neuron_rows(sink_weight, dim)
        sink_bias_rows = bias if sink_weight is None else sink_bias
        outs = []
        for (ga, gn), (sa, sn) in spans:
            outs.append(F.linear(x, rows.narrow(0, ga, gn), None if bias is None else bias.narrow(0, ga, gn)))
            out = torch.bmm(x, _gather(sink_rows, sa, sn, index).transpose(1, 2))  # (the gathered rows: (B, k, in))
            if sink_bias_rows is not None:
                out = out + _gather(sink_bias_rows, sa, sn, index).unsqueeze(1)
            outs.append(out)
        # (the gathered rows are gathered again in backward, not kept: a copy of k rows per batch row
        # and chunk in every layer until backward, for one index_select)
        ctx.save_for_backward(x, weight, bias, sink_weight, sink_bias, index)
        ctx.dim, ctx.spans, ctx.touched = dim, spans, touched
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, sink_weight, sink_bias, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        rows, flat, k = neuron_rows(weight, ctx.dim), index.reshape(-1), index.shape[1]
        sink_rows = rows if sink_weight is None else neuron_rows(sink_weight, ctx.dim)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        grad_w, grad_w_rows = _grad_rows(weight, need[1], ctx.dim)
        grad_b, _ = _grad_rows(bias, need[2], 0)
        touched = _row_target(ctx, need[3])
        grad_sw, grad_sw_rows = _grad_rows(sink_weight, need[3] and touched is None, ctx.dim)
        grad_sb, _ = _grad_rows(sink_bias, need[4], 0)
        apart = sink_weight is not None
        # where each chunk's sink rows' gradient goes: the weight's own, or the apart sinks'
        sink_grad_rows, sink_grad_bias = (grad_sw_rows, grad_sb) if apart else (grad_w_rows, grad_b)
        needs_sink_w, needs_sink_b = (need[3], need[4]) if apart else (need[1], need[2])
        offset = 0
        for (ga, gn), (sa, sn) in ctx.spans:
            g_general, g_sinks = grad.narrow(-1, offset, gn), grad.narrow(-1, offset + gn, k)
            offset += gn + k
            if need[0]:
                part = torch.baddbmm(g_general @ rows.narrow(0, ga, gn), g_sinks, _gather(sink_rows, sa, sn, index))
                grad_x = part if grad_x is None else grad_x.add_(part)
            if need[1]:
                torch.mm(g_general.reshape(-1, gn).t(), x2, out=grad_w_rows.narrow(0, ga, gn))
            if needs_sink_w:
                g_rows = torch.bmm(g_sinks.transpose(1, 2), x).reshape(-1, x.shape[-1])  # (B * k, in)
                if touched is not None:
                    touched.add(flat + sa, g_rows)
                else:
                    sink_grad_rows.narrow(0, sa, sn).zero_().index_add_(0, flat, g_rows)
            if need[2]:
                grad_b.narrow(0, ga, gn).copy_(g_general.sum((0, 1)))
            if needs_sink_b:
                sink_grad_bias.narrow(0, sa, sn).zero_().index_add_(0, flat, g_sinks.sum(1).reshape(-1))
        return grad_x, grad_w, grad_b, grad_sw, grad_sb, None, None, None, None


class GatheredOutput(torch.autograd.Function):
    """The output projection of the general neurons and, per row, its gathered sinks (its own
    backward for the reason :class:`GatheredInput` gives); the sink columns are the weight's own
    past ``general`` or, stored apart, ``sink_weight``'s."""

    @staticmethod
    def forward(ctx, h, weight, bias, sink_weight, dim: int, general: int, index, touched):
        rows = neuron_rows(weight, dim)  # (neurons, out)
        out = torch.baddbmm(F.linear(h[..., :general], rows[:general].t(), bias), h[..., general:],
                            _gathered_columns(rows, sink_weight, dim, general, index))
        ctx.save_for_backward(h, weight, bias, sink_weight, index)  # (gathered again in backward)
        ctx.dim, ctx.general, ctx.touched = dim, general, touched
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, sink_weight, index = ctx.saved_tensors
        need, g = ctx.needs_input_grad, ctx.general
        rows, flat, k = neuron_rows(weight, ctx.dim), index.reshape(-1), index.shape[1]
        grad2, h2 = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_h = None
        if need[0]:
            grad_h = grad.new_empty(h.shape)
            torch.mm(grad2, rows[:g].t(), out=grad_h.view(-1, g + k).narrow(1, 0, g))
            sinks = _gathered_columns(rows, sink_weight, ctx.dim, g, index)
            grad_h.narrow(-1, g, k).copy_(torch.bmm(grad, sinks.transpose(1, 2)))
        grad_w, grad_w_rows = _grad_rows(weight, need[1], ctx.dim)
        touched = _row_target(ctx, need[3])
        grad_sw, grad_sw_rows = _grad_rows(sink_weight, need[3] and touched is None, ctx.dim)
        apart = sink_weight is not None
        needs_sinks = need[3] if apart else need[1]
        if need[1]:
            torch.mm(h2.narrow(1, 0, g).t(), grad2, out=grad_w_rows.narrow(0, 0, g))
        if needs_sinks:
            g_rows = torch.bmm(h.narrow(-1, g, k).transpose(1, 2), grad).reshape(-1, grad.shape[-1])  # (B * k, out)
            if touched is not None:
                touched.add(flat, g_rows)
            else:
                target = grad_sw_rows if apart else grad_w_rows.narrow(0, g, rows.shape[0] - g)
                target.zero_().index_add_(0, flat, g_rows)
        grad_b = grad2.sum(0) if need[2] else None
        return grad_h, grad_w, grad_b, grad_sw, None, None, None, None


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
                index: torch.Tensor, sink_weight: torch.Tensor | None = None,
                sink_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(B, T, in)`` times ``weight``'s general rows then, per row, its gathered sink rows
    (``sink_weight``'s where the sinks are apart), per chunk of ``spans`` (``[(general span, sink
    span)]``), as autocast would compute a linear layer."""
    touched = touched_rows.for_call(sink_weight)  # (before autocast's copy hides the parameter)
    tensors = _autocast(x, weight, bias, sink_weight, sink_bias)
    with torch.autocast(x.device.type, enabled=False):
        return GatheredInput.apply(*tensors, dim, spans, index, touched)


def gather_columns(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, general: int,
                   index: torch.Tensor, sink_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` ``(B, T, general + k)`` times ``weight``'s general columns then, per row, its gathered
    sink columns (``sink_weight``'s where the sinks are apart), as autocast would compute a linear layer."""
    touched = touched_rows.for_call(sink_weight)
    tensors = _autocast(h, weight, bias, sink_weight)
    with torch.autocast(h.device.type, enabled=False):
        return GatheredOutput.apply(*tensors, dim, general, index, touched)


def by_row(x: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """``x`` as ``(B, T, ·)`` (OPT flattens its MLP's input to ``(B * T, ·)``)."""
    return x if x.dim() == 3 else x.reshape(active.index.shape[0], -1, x.shape[-1])


def gathered_input(module: nn.Module, x: torch.Tensor, active: ActiveSinks) -> torch.Tensor:
    """An input projection's output: per chunk, the general neurons then the row's gathered sinks."""
    m, apart = module.memsink, sink_parts.parts(module)
    spans = list(zip(m.general_spans, m.sink_spans))
    if apart:  # (the weight holds the general rows, the sinks' own parameter the sink rows)
        spans = [((k * m.general, m.general), (k * m.sinks, m.sinks)) for k in range(m.neuron_chunks)]
    out = gather_rows(by_row(x, active), module.weight, module.bias, module.neuron_dims()["weight"],
                      spans, active.index, apart.get("weight"), apart.get("bias"))
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
                         active.index, sink_parts.parts(module).get("weight"))
    return out if h.dim() == 3 else out.reshape(*h.shape[:-1], out.shape[-1])
