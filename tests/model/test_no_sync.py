"""No host-device sync in a patched forward: on the meta device, where reading a tensor's value
on the host raises, every model that trains there unpatched also trains there patched (IDs per
sequence and per token) and evaluates with sinks dropped."""

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model


def runs_on_meta(model, **ids) -> bool:
    x = torch.empty(2, 8, dtype=torch.long, device="meta")
    try:
        model.train()
        model(input_ids=x, labels=x, **ids).loss.backward()
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
    except RuntimeError as e:
        if "meta" not in str(e):
            raise
        return False
    return True


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_forward_reads_nothing_on_the_host(model_type):
    if not runs_on_meta(tiny_model(model_type).to("meta")):
        pytest.skip(f"{model_type} itself reads tensor values on the host")
    for ids in (torch.empty(2, dtype=torch.long, device="meta"), torch.empty(2, 8, dtype=torch.long, device="meta")):
        patched = get_memsink_model(tiny_model(model_type), MemSinkConfig(sink_fraction=0.5)).to("meta")
        assert runs_on_meta(patched, sequence_ids=ids), model_type
