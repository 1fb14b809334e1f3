"""Coverage over every causal-LM type of the installed Transformers.

Each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built from a tiny random config (no
downloads) and, if it builds, put through :func:`check`: patched with the default
``MemSinkConfig()``, trained one step with sequence IDs (the inactive sinks of that ID get no
gradient), evaluated equal to its ``remove_sinks()`` model, saved and reloaded by plain
Transformers with no missing or unexpected keys.

    python tests/coverage_models.py                 # every type: docs/coverage.json + docs/supported_models.md
    python tests/coverage_models.py llama mixtral   # some types, printed only
    python tests/coverage_models.py --render-only   # re-render docs/supported_models.md from docs/coverage.json

``make coverage`` runs the first form; ``tests/test_coverage.py`` runs a fast subset and checks
that the generated block of ``docs/supported_models.md`` (between the coverage markers) is what
``docs/coverage.json`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parents[1]
COVERAGE_JSON = ROOT / "docs" / "coverage.json"
SUPPORTED_MODELS = ROOT / "docs" / "supported_models.md"  # the generated block sits between BEGIN and END
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"

VOCAB = 97
HIDDEN = 32
WIDTH = 64
MAX_PARAMS = 20_000_000  # counted on the meta device before anything is allocated

# Overrides applied to a config and to each of its sub-configs (text_config, ...) where the field
# exists. Generic names only: no per-type knowledge here beyond _EXTRA.
_COMMON = dict(
    hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
    n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=WIDTH, n_positions=64, ffn_dim=WIDTH,
    ffn_hidden_size=WIDTH, d_model=HIDDEN, n_heads=4, n_layers=2, word_embed_proj_dim=HIDDEN,
    num_layers=2, num_decoder_layers=2, decoder_layers=2, encoder_layers=2, decoder_ffn_dim=WIDTH,
    encoder_ffn_dim=WIDTH, decoder_attention_heads=4, encoder_attention_heads=4, d_ff=WIDTH,
    moe_intermediate_size=WIDTH, shared_expert_intermediate_size=WIDTH, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_num_experts=4,
    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, embedding_size=HIDDEN,
    n_ctx=64, n_positions_max=64, d_inner=WIDTH, d_head=8, dim=HIDDEN, hidden_dim=WIDTH,
    expert_intermediate_size=WIDTH, shared_intermediate_size=WIDTH,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_EXTRA = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"]),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "falcon": dict(num_kv_heads=4, new_decoder_architecture=False, multi_query=False),
}
_DROPOUTS = ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
             "attention_probs_dropout_prob", "hidden_dropout_prob", "resid_dropout", "embed_dropout",
             "summary_first_dropout", "activation_dropout", "ffn_dropout", "classifier_dropout")


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config: PretrainedConfig, overrides: dict, depth: int = 0) -> None:
    for key, value in overrides.items():
        if key in config.to_dict() or hasattr(type(config), key):
            with contextlib.suppress(Exception):
                if not isinstance(getattr(config, key, None), PretrainedConfig):
                    setattr(config, key, value)
    for key in _DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    for key in ("layer_types", "mlp_layer_types", "block_types"):  # per-layer lists follow the layer count
        value = getattr(config, key, None)
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(value, list) and isinstance(layers, int) and len(value) > layers:
            with contextlib.suppress(Exception):
                setattr(config, key, value[:layers])
    if depth < 2:
        for key in list(config.to_dict()):
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                _shrink(sub, overrides, depth + 1)


def tiny_config(model_type: str) -> PretrainedConfig:
    config = AutoConfig.for_model(model_type)
    _shrink(config, {**_COMMON, **_EXTRA.get(model_type, {})})
    return config


@contextlib.contextmanager
def _quiet():
    """Transformers' warnings about random configs are noise here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def build_tiny(model_type: str, seed: int = 0):
    """A tiny random float32 model of ``model_type`` in eval mode, or an exception saying why not."""
    config = tiny_config(model_type)
    with _quiet():
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        count = sum(p.numel() for p in meta.parameters())
        if count > MAX_PARAMS:
            raise MemoryError(f"the smallest config found still has {count / 1e6:.0f}M parameters")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _no_cache(model) -> dict:
    """Training needs no KV cache (and some hybrid models' caches fail on a tiny config)."""
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _logits(model, x):
    out = model(input_ids=x, **_no_cache(model))
    return out.logits if hasattr(out, "logits") else out[0]


def _site_weights(model) -> list[tuple[torch.Tensor, int, int, int, int]]:
    """(weight, neuron dim, general, sinks, rows per neuron chunk) of every patched MLP weight."""
    from hf_memsinks.layers.experts import experts_layout
    from hf_memsinks.layers.neurons import neuron_dim

    out = []
    for site in model.memsink.sites:
        g, s = site.general, site.sinks
        if site.kind == "experts":
            for name, (dim, chunks, rows) in experts_layout(site.out_proj).items():
                if not name.endswith("_bias"):
                    out.append((getattr(site.out_proj, name), dim, g, s, rows, chunks, site.layer))
        else:
            for m in site.in_proj:
                out.append((m.weight, neuron_dim(m, "in"), g, s, 1, site.chunks, site.layer))
            out.append((site.out_proj.weight, neuron_dim(site.out_proj, "out"), g, s, 1, 1, site.layer))
            if site.norm is not None:  # a norm over the hidden neurons (BitNet): its per-neuron weights too
                out.append((site.norm.weight, 0, g, s, 1, 1, site.layer))
    return out


def tokens(model) -> torch.Tensor:
    text_vocab = getattr(model.config.get_text_config(), "vocab_size", 10**9)
    vocab = min(model.get_input_embeddings().num_embeddings, text_vocab)
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(1))


def baseline(model) -> None:
    """What the check asks of a patched model, asked of the plain one: a training step with
    labels, and a save that plain Transformers reloads. A type failing this is not usable here."""
    x = tokens(model)
    with _quiet():
        model.train()
        loss = model(input_ids=x, labels=x, **_no_cache(model)).loss
        loss.backward()
        model.zero_grad()
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            _, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"plain save and reload: {bad}")


def check(model_type: str, seq_id: int = 7, model=None) -> dict:
    """Patch with the default config, train one step with one ID, compare with remove_sinks(),
    save and reload with plain Transformers. Returns facts; raises AssertionError on a failure."""
    from hf_memsinks import MemSinkConfig, get_memsink_model
    from hf_memsinks.ids.masks import sink_mask

    model = build_tiny(model_type) if model is None else model
    base_class = type(model)
    config = MemSinkConfig()
    x = tokens(model)
    with _quiet():
        patched = get_memsink_model(model, config)
    sites = patched.memsink.sites
    facts = {
        "mlps": len(sites),
        "found": sorted({re.sub(r"\.\d+(?=\.|$)", ".N", s.name) + ("" if s.kind == "mlp" else " (experts)")
                         for s in sites}),
        "experts": any(s.kind == "experts" for s in sites),
        "width_fields": sorted({s.width_attr or "(none: zero-padded)" for s in sites}),
    }
    with _quiet():
        patched.train()
        patched.zero_grad()
        out = patched(input_ids=x, labels=x, sequence_ids=torch.tensor([seq_id, seq_id]), **_no_cache(patched))
        out.loss.backward()
    assert torch.isfinite(out.loss), "non-finite loss"
    # Every inactive sink of this ID has exactly zero gradient; count the share of MLP weights without one.
    zero, total, inactive_share = 0, 0, 0.0
    for weight, dim, g, s, rows, chunks, layer in _site_weights(patched):
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        active = sink_mask(torch.tensor([seq_id]), s, config.sink_active_prob, salt=config.salt,
                           layer=layer if config.per_layer_masks else None, scheme=config.mask_scheme)[0]
        per_neuron = grad.abs().transpose(0, dim).reshape(chunks, g + s, rows, -1)  # chunk, neuron, rows, rest
        sinks_grad = per_neuron[:, g:].sum(dim=(0, 2, 3))
        assert (sinks_grad[~active] == 0).all(), "an inactive sink got a gradient"
        zero += (grad == 0).sum().item()
        total += grad.numel()
        inactive_share += (~active).sum().item() / (g + s) * grad.numel()
    patched.zero_grad()
    patched.eval()
    with torch.no_grad(), _quiet():
        expected = _logits(patched, x)
        plain = patched.remove_sinks()
        got = _logits(plain, x)
    assert type(plain) is base_class, f"remove_sinks returned {type(plain).__name__}"
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, f"remove_sinks() changes logits by {diff:.2e}"
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        plain.save_pretrained(tmp)
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        assert not bad, f"plain reload: {bad}"
        with torch.no_grad():
            again = _logits(reloaded.eval(), x)
    diff = (again - expected).abs().max().item()
    assert diff < 1e-5, f"reloaded model's logits differ by {diff:.2e}"
    return {
        **facts,
        "no_grad_share": round(zero / total, 3),
        "expected_no_grad_share": round(inactive_share / total, 3),
    }


def run(model_type: str) -> dict:
    """One row of the coverage table: status built / pass / fail and why."""
    row = {"model_type": model_type}
    try:
        model = build_tiny(model_type)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return {**row, "status": "not built", "reason": f"{type(e).__name__}: {_first_line(e)}"}
    row["class"] = type(model).__name__
    try:
        baseline(model)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "not built", "reason": f"unpatched model: {type(e).__name__}: {_first_line(e)}"}
    start = time.time()
    try:
        row.update(check(model_type, model=model))
        row["status"] = "pass"
    except Exception as e:  # noqa: BLE001
        row["status"] = "fail"
        row["reason"] = f"{type(e).__name__}: {_message(e)}"
        if not isinstance(e, (NotImplementedError, AssertionError)):
            row["traceback"] = traceback.format_exc(limit=-3)
    row["seconds"] = round(time.time() - start, 2)
    return row


def _message(e: BaseException) -> str:
    """The error without the generic how-to-name-modules advice, on one line."""
    text = str(e).split("Name the MLP of one decoder layer by hand")[0]
    return " ".join(text.split())[:600]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


# ---- the generated block of docs/supported_models.md ----------------------------------------------


def summary(table: dict) -> dict:
    rows = table["rows"]
    built = [r for r in rows if r["status"] != "not built"]
    passed = [r for r in built if r["status"] == "pass"]
    return {"total": len(rows), "built": len(built), "passed": len(passed)}


def coverage_section(table: dict) -> str:
    """The generated block of docs/supported_models.md (markers included), from the coverage table."""
    rows = table["rows"]
    n = summary(table)
    names = lambda status: ", ".join(r["model_type"] for r in rows if r["status"] == status)  # noqa: E731
    moe = ", ".join(r["model_type"] for r in rows if r["status"] == "pass" and r.get("experts"))
    lines = [
        BEGIN,
        "<!-- generated by `make coverage` (tests/coverage_models.py) from docs/coverage.json; do not edit -->",
        f"**{n['passed']} of the {n['built']} causal-LM types** of Transformers {table['transformers']} whose tiny "
        f"random model builds pass the coverage check with the default `MemSinkConfig()` ({n['total']} types in "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`): patched, trained one step with sequence IDs (the inactive sinks of "
        "that ID get no gradient), `remove_sinks()` equal to the patched model in eval mode (1e-5), saved and "
        "reloaded by plain Transformers with no missing or unexpected keys.",
        "",
        f"- **Pass** ({n['passed']}): {names('pass')}.",
        f"- **Mixture of experts among them** (sinks in every routed expert and in shared/dense MLPs): {moe}.",
        "",
        f"Fail with an error naming the type ({n['built'] - n['passed']}):",
        "",
        "| model type | why |",
        "|---|---|",
    ]
    lines += [f"| {r['model_type']} | {_cell(r['reason'])} |" for r in rows if r["status"] == "fail"]
    lines += ["", f"Tiny model not built here ({n['total'] - n['built']}), with the reason:", "",
              "| model type | why |", "|---|---|"]
    lines += [f"| {r['model_type']} | {_cell(r['reason'])} |" for r in rows if r["status"] == "not built"]
    lines.append(END)
    return "\n".join(lines)


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def write_coverage_section(table: dict, page: Path = SUPPORTED_MODELS) -> None:
    """Replace the generated block of ``page`` (between the markers); the hand-written rest stays."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{page} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + coverage_section(table) + tail)


def current_coverage_section(page: Path = SUPPORTED_MODELS) -> str:
    """The generated block as it stands in ``page`` (markers included)."""
    text = page.read_text()
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    parser.add_argument("--out", default=None, help="JSON table to write (default: docs/coverage.json for a full run)")
    parser.add_argument("--render-only", dest="render_only", action="store_true",
                        help="run no model: only re-render the generated block of docs/supported_models.md from "
                             "docs/coverage.json")
    args = parser.parse_args()
    if args.render_only:
        write_coverage_section(json.loads(COVERAGE_JSON.read_text()))
        print(f"rewrote the generated block of {SUPPORTED_MODELS}")
        sys.exit(0)
    rows = []
    for t in args.types or causal_lm_types():
        row = run(t)
        rows.append(row)
        print(f"{t:28s} {row['status']:9s} {row.get('seconds', ''):>6} {row.get('reason', '')[:150]}", flush=True)
        if "traceback" in row:
            print(row["traceback"])
    out = args.out or (None if args.types else COVERAGE_JSON)
    if out:
        import transformers

        table = {"transformers": transformers.__version__, "rows": rows}
        Path(out).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {out}: {summary(table)}")
        if Path(out) == COVERAGE_JSON:
            write_coverage_section(table)
            print(f"rewrote the generated block of {SUPPORTED_MODELS}")
