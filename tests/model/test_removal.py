"""After remove_sinks() nothing of hf_memsinks is left on the model: no class, no attribute, no
hook or wrapper, in any module, whatever was done to the patched model first."""

import copy
import pickle

import pytest
import torch
from coverage_models import build_tiny
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model
from hf_memsinks.integrations.peft import train_sinks

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)


def ours(value) -> bool:
    """Is ``value`` (or its class) defined by hf_memsinks?"""
    module = getattr(value, "__module__", None) or getattr(type(value), "__module__", "")
    return str(module).startswith("hf_memsinks") or any(
        str(getattr(c, "__module__", "")).startswith("hf_memsinks") for c in type(value).__mro__)


def traces(value, where: str, depth: int = 0) -> list[str]:
    """Every hf_memsinks object or ``memsink`` name reachable from ``value``'s containers."""
    found = [where] if ours(value) else []
    if depth > 3:
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found += [f"{where}[{key!r}]"] if "memsink" in str(key).lower() else []
            found += traces(item, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            found += traces(item, f"{where}[{i}]", depth + 1)
    elif callable(value) and getattr(value, "__closure__", None):
        for i, cell in enumerate(value.__closure__):
            found += traces(cell.cell_contents, f"{where}.<closure {i}>", depth + 1)
    return found


def leftovers(model: torch.nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        where = name or "<model>"
        found += [f"{where}: class {c.__module__}.{c.__qualname__}" for c in type(module).__mro__ if ours(c)]
        found += [f"{where}.{key}" for key in module.__dict__ if "memsink" in key.lower()]
        found += traces(module.__dict__, f"{where}.__dict__")
        for pname, param in module.named_parameters(recurse=False):
            found += [f"{where}.{pname}.{key}" for key in vars(param) if "memsink" in key.lower()]
            found += [f"{where}.{pname}: gradient hook" for _ in (param._backward_hooks or {})]
    found += [f"config.{k}" for k in model.config.to_dict() if "sink" in k.lower()]
    return found


def test_the_walk_finds_a_patched_model():
    assert leftovers(get_memsink_model(tiny_model("llama"), CFG))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "mixtral", "bitnet"])
@pytest.mark.parametrize("forget", [False, True])
@pytest.mark.parametrize("checkpointing", [None, "before", "after"])
def test_removed_model_carries_nothing_of_hf_memsinks(model_type, forget, checkpointing):
    if model_type == "bitnet" and forget:
        pytest.skip("a norm over the hidden neurons: remove_sinks(forget_ids=) is refused")
    model = build_tiny(model_type) if model_type == "bitnet" else tiny_model(model_type)
    if checkpointing == "before":  # its checkpoint functions get wrapped at patch time
        model.gradient_checkpointing_enable()
    model = get_memsink_model(model, CFG).train()
    if checkpointing == "after":
        model.gradient_checkpointing_enable()
    x = batch()
    model(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 7])).loss.backward()
    with model.sink_mode("activate", [5, 6, 7]):
        model.eval()(x)
    model = copy.deepcopy(model) if checkpointing else pickle.loads(pickle.dumps(model))
    plain = model.remove_sinks(forget_ids=[5] if forget else None)
    assert leftovers(plain) == []
    assert not hasattr(plain, "remove_sinks") and not hasattr(plain, "memsink_config")


def test_lora_trained_sinks_merged_then_removed_leave_nothing():
    model = get_memsink_model(tiny_model("llama"), CFG)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    train_sinks(peft_model)
    x = batch()
    peft_model.train()(input_ids=x, labels=x, sequence_ids=torch.tensor([5, 6, 7])).loss.backward()
    plain = peft_model.merge_and_unload().remove_sinks()
    assert leftovers(plain) == []


def test_a_forward_wrapper_taken_before_removal_runs_the_plain_model():
    """Trainers set an instance forward around the patched one (accelerate's fp32 wrapper, TRL's
    fused head); after remove_sinks it runs the plain model, as the default eval mode did."""
    model = get_memsink_model(tiny_model("llama"), CFG).eval()
    patched = model.forward
    model.forward = lambda *args, **kwargs: patched(*args, **kwargs)
    x = batch()
    with torch.no_grad():
        before = model(input_ids=x).logits
        plain = model.remove_sinks()
        torch.testing.assert_close(plain(input_ids=x).logits, before)
    with pytest.raises(TypeError, match="sinks were removed"):
        plain(input_ids=x, sequence_ids=torch.tensor([5, 6, 7]))
