"""Post-hoc unlearning baselines on the standard model, as open unlearning frameworks run them
(evaluated by TOFU and MUSE): forget F by updating the weights, without retraining.

- ``gradient_ascent``: maximize F's next-token loss;
- ``grad_diff``: the same plus ordinary descent on retained training data (K and seen-once
  general documents, cycled), to hold the rest of the model in place;
- ``npo`` (Negative Preference Optimization, Zhang et al. 2024): minimize
  ``-(2/beta) log sigmoid(-beta log(p_theta(F) / p_ref(F)))`` over F's documents, the reference
  being the model before unlearning: ascent that slows down once F's likelihood has fallen.

Each runs full-batch AdamW on F and stops at a stated utility cost: it checks K's mean loss and the
validation loss every ``check_every`` steps and returns the last checked weights at which K's loss
has risen by at most ``k_budget`` nats and the validation loss by at most ``val_budget`` (relative),
or the weights after ``max_steps``.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from hf_memsinks.evaluation.memorization import pad_documents

from .metrics import doc_losses

METHODS = ("gradient_ascent", "grad_diff", "npo")


def _token_logp(model, docs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document: summed and mean log-likelihood of its next tokens (with gradients)."""
    device = next(model.parameters()).device
    tokens, mask = pad_documents(docs, pad_id)
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(input_ids=tokens, attention_mask=mask.long()).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    valid = mask[:, 1:]
    total = -(nll * valid).sum(1)
    return total, total / valid.sum(1).clamp(min=1)


def objective(method: str, model, forget, retain_batch, ref_logp, beta: float, pad_id: int) -> torch.Tensor:
    """The loss one step of ``method`` minimizes."""
    total, mean = _token_logp(model, forget, pad_id)
    if method == "gradient_ascent":
        return mean.mean()
    if method == "grad_diff":
        return mean.mean() - _token_logp(model, retain_batch, pad_id)[1].mean()
    if method == "npo":
        return -(2.0 / beta) * F.logsigmoid(-beta * (total - ref_logp)).mean()
    raise ValueError(f"unknown unlearning method {method!r}; choose from {METHODS}")


def unlearn(standard, method: str, forget, keep, retain, val_docs, setting, cfg) -> tuple[object, dict]:
    """A copy of ``standard`` with F unlearned by ``method``, and how it stopped: ``steps``, the
    ``stopped`` reason, and the K-loss and val-loss rises at the weights returned."""
    u = cfg.forget.unlearning
    model = copy.deepcopy(standard)
    pad = setting.pad_id

    def costs() -> tuple[float, float]:
        return (doc_losses(model, keep, cfg, pad).mean().item(), doc_losses(model, val_docs, cfg, pad).mean().item())

    k0, v0 = costs()
    with torch.no_grad():
        ref = _token_logp(model, forget, pad)[0].detach()
    opt = torch.optim.AdamW(model.parameters(), lr=u.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = itertools.cycle([retain[i:i + u.retain_batch] for i in range(0, len(retain), u.retain_batch)])
    best, info = copy.deepcopy(model.state_dict()), {"steps": 0, "stopped": "max_steps", "K_loss_rise": 0.0,
                                                     "val_loss_rise": 0.0}
    for step in range(1, u.max_steps + 1):
        model.train()
        loss = objective(method, model, forget, next(batches), ref, u.beta, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % u.check_every and step < u.max_steps:
            continue
        k, v = costs()
        if k - k0 > u.k_budget or (v - v0) / v0 > u.val_budget:
            info["stopped"] = "K budget" if k - k0 > u.k_budget else "val budget"
            break
        best = copy.deepcopy(model.state_dict())
        info.update(steps=step, K_loss_rise=k - k0, val_loss_rise=(v - v0) / v0)
    model.load_state_dict(best)
    return model.eval(), info
