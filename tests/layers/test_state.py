"""Masks belong to the forward call that made them: a backbone run on its own uses its own IDs or
raises, a layer run outside any call never reuses one, threads forwarding one model at once each
see their own masks, and deep copies and pickles of a patched model work."""

import copy
import io
import threading

import pytest
import torch
from tiny_models import batch, tiny_model

from hf_memsinks import MemSinkConfig, get_memsink_model

CFG = MemSinkConfig(sink_fraction=0.5, sink_active_prob=0.3)


def patched(model_type="llama", **kw):
    return get_memsink_model(tiny_model(model_type), MemSinkConfig(**{**CFG.to_dict(), **kw}))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_backbone_after_a_model_forward_uses_its_own_ids_or_raises(model_type):
    model = patched(model_type).train()
    fresh = copy.deepcopy(model)
    x3, ids3 = batch(3, 10, seed=2), torch.tensor([5, 6, 7])
    with torch.no_grad():
        alone = fresh.base_model(input_ids=x3, sequence_ids=ids3).last_hidden_state
        general_only = fresh.base_model(input_ids=x3, sequence_ids=torch.full((3,), -1)).last_hidden_state
        assert not torch.allclose(alone, general_only)  # the IDs' sinks change the output
        model(input_ids=batch(4, 12), sequence_ids=torch.tensor([1, 2, 3, 4]))  # another call, batch of 4
        after = model.base_model(input_ids=x3, sequence_ids=ids3).last_hidden_state
        torch.testing.assert_close(after, alone, rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs sequence_ids"):
            model.base_model(input_ids=x3)
        with pytest.raises(ValueError, match="3 IDs for a batch of 4"):
            model.base_model(input_ids=batch(4, 12), sequence_ids=ids3)


def test_backbone_inside_the_model_forward_joins_its_call():
    model = patched().train()
    x, ids = batch(3, 10), torch.tensor([5, 6, 7])
    with torch.no_grad():
        hidden = model.base_model(input_ids=x, sequence_ids=ids).last_hidden_state
        logits = model(input_ids=x, sequence_ids=ids).logits
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=0)


def test_layer_outside_any_call_raises_in_training_and_drops_sinks_in_eval():
    model = patched()
    mlp = model.model.layers[0].mlp
    h = torch.randn(2, 5, 32)
    mlp.train()
    with pytest.raises(ValueError, match="needs sequence_ids"):
        mlp(h)
    model.eval()
    with torch.no_grad():
        dropped = mlp(h)
        model(input_ids=batch(2, 5), sequence_ids=torch.tensor([1, 2]))  # a call that ends
        torch.testing.assert_close(mlp(h), dropped, rtol=0, atol=0)
    lenient = patched(require_sequence_ids=False)
    lenient.model.layers[0].mlp.train()
    with torch.no_grad():
        lenient.model.layers[0].mlp(h)  # general neurons only, no error


def test_error_in_a_forward_leaves_no_call_behind():
    model = patched().train()
    with pytest.raises(Exception):
        model(input_ids=batch(2, 5), sequence_ids=torch.tensor([1, 2]), position_ids="not a tensor")
    assert model.memsink.state.current() is None
    with pytest.raises(ValueError, match="needs sequence_ids"):
        model.model.layers[0].mlp(torch.randn(1, 2, 32))


@pytest.mark.parametrize("training", [True, False])
def test_threads_forwarding_one_model_each_get_their_own_masks(training):
    model = patched()
    model.train(training)
    if not training:
        model.set_sink_mode("expected")
    jobs = [(batch(b, 9, seed=b), torch.arange(1, b + 1) * (10 + b)) for b in (2, 3, 4, 5)]
    with torch.no_grad():
        alone = [model(input_ids=x, sequence_ids=ids).logits for x, ids in jobs]
    if training:  # the check can fail: other IDs give other logits
        with torch.no_grad():
            other = model(input_ids=jobs[0][0], sequence_ids=jobs[0][1] + 1).logits
        assert not torch.allclose(other, alone[0])
    errors: list = []
    start = threading.Barrier(len(jobs))

    def worker(k):
        x, ids = jobs[k]
        start.wait()
        try:
            for _ in range(40):
                with torch.no_grad():
                    out = model(input_ids=x, sequence_ids=ids).logits
                if not torch.equal(out, alone[k]):
                    errors.append(k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("how", ["pickle", "deepcopy with checkpointing"])
def test_patched_model_copies_and_pickles_with_its_own_state(how):
    model = patched().train()
    if how == "pickle":  # (checkpointing's input-grad hook is a local function: plain models do not pickle either)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    else:
        model.activation_checkpointing_enable()
        other = copy.deepcopy(model)
    assert type(other.base_model).__name__ == "LlamaModel" and other.base_model.memsink.state is other.memsink.state
    assert other.memsink.state is not model.memsink.state
    x, ids = batch(2, 6), torch.tensor([3, 4])
    for m in (model, other):
        m(input_ids=x, labels=x, sequence_ids=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
