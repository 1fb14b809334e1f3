"""Hub kernels: from Transformers 5.25 ``from_pretrained`` kernelizes by default (``use_kernels``),
and the kernels package then swaps the forward of every module whose class names a hub layer for a
kernel's, again on each ``train()`` / ``eval()``. A kernel computes the plain layer, so on a patched
module it would drop the sinks silently: patched modules keep their own forward. A reload must also
work where the kernels package is missing."""

import pytest
import torch
import transformers
from coverage_models import build_tiny
from packaging.version import Version
from tiny_models import batch, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, get_memsink_model

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)
IDS = [5, 6, 7]


def plain_kernel(base: type):
    """A repository of a CPU "kernel" for ``base``'s hub layer: ``base``'s own forward, what a real
    kernel computes (the layer without sinks)."""

    class Kernel(nn.Module):
        def forward(self, hidden_states):
            return base.forward(self, hidden_states)

    class Repository:
        def load(self):
            return Kernel

    return Repository()


def logits(model, mode: str = "activate"):
    with torch.no_grad(), model.sink_mode(mode, IDS if mode == "activate" else None):
        return model(input_ids=batch()).logits


def test_a_hub_kernel_for_a_patched_module_leaves_its_sinks_working(tmp_path):
    """BitNet's norm over the hidden neurons (``ffn_sub_norm``) applies the sinks and is an
    ``"RMSNorm"`` hub layer; with a kernel mapped for it, every other RMSNorm runs the kernel."""
    kernels = pytest.importorskip("kernels")
    if not transformers.utils.is_kernels_available():
        pytest.skip(f"kernels {kernels.__version__} is not a version this Transformers takes")
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    get_memsink_model(build_tiny("bitnet"), CFG).save_pretrained(tmp_path)
    reference = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path, use_kernels=False)
    expected = logits(reference)
    assert (expected - logits(reference, "drop")).abs().max() > 1e-3  # the sinks change the output

    with kernels.use_kernel_mapping({"RMSNorm": {"cpu": plain_kernel(BitNetRMSNorm)}}):
        model = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path, use_kernels=True)  # kernelized, then patched
        replaced = {name for name, module in model.named_modules() if "forward" in vars(module)}
        assert "model.layers.0.input_layernorm" in replaced  # the mapping reached the model
        assert "model.layers.0.mlp.ffn_sub_norm" not in replaced
        torch.testing.assert_close(logits(model), expected)
        model.train()
        model.eval()  # kernelized again, for training and for inference
        assert "forward" in vars(model.model.layers[1].input_layernorm)
        torch.testing.assert_close(logits(model), expected)


def test_a_reload_works_without_the_kernels_package(tmp_path, monkeypatch):
    model = get_memsink_model(tiny_model("llama"), CFG)
    model.save_pretrained(tmp_path / "sinks")
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    expected = logits(model.eval())
    for where in (transformers.utils, transformers.modeling_utils):  # what Transformers asks
        monkeypatch.setattr(where, "is_kernels_available", lambda *args, **kwargs: False, raising=False)
    if Version(transformers.__version__) >= Version("5.25"):  # kernelizes by default, and fails without
        with pytest.raises(ValueError, match="Kernels are not available"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(logits(AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "sinks")), expected)
    recipe = MemSinkConfig.for_finetuning()
    patched = AutoMemSinkModelForCausalLM.from_pretrained(tmp_path / "plain", memsink_config=recipe)
    assert patched.memsink_config.mode == "add"
