"""Every bad input a clear error, never a silently wrong result: one table of bad inputs and faults.

Each row calls the library the way a careful user might get it wrong and asserts the error type
and that the message names the problem, or (rows with ``exc=None``) that the result is right.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from checkpoints.test_checkpoints import trained
from tiny_models import batch, tiny_model

from benchmarks.memorization.cli import PROG as BENCH_PROG
from benchmarks.memorization.cli import main as bench_main
from hf_memsinks import AutoMemSinkModelForCausalLM, MemSinkConfig, PaperReference, get_memsink_model
from hf_memsinks.cli import main
from hf_memsinks.data import MemSinkDataCollator, MemSinkPackingCollator, add_sequence_ids
from hf_memsinks.integrations.trainer import MemSinkCallback

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
CFG = MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4, mode="split")


class CLIFailed(Exception):
    """A CLI call that exited non-zero; the message is its stderr."""


BENCH_COMMANDS = ("run", "finetune", "sweep", "scale", "attribute", "noisy-ids")


def cli(*args: str) -> None:
    """``hf-memsinks ARGS``, or the benchmark's command line for its commands."""
    bench = args[0] in BENCH_COMMANDS
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = (bench_main if bench else main)([str(a) for a in args])
    text = err.getvalue().strip()
    if rc != 0:
        assert rc == 2, (rc, text)
        # (progress bars of model loading may precede it on stderr)
        errors = [line for line in text.replace("\r", "\n").splitlines() if "error" in line.lower()]
        assert "Traceback" not in text and len(errors) == 1 and errors[0] == text.splitlines()[-1], text
        assert errors[0].startswith(f"{BENCH_PROG if bench else 'hf-memsinks'}: error: "), text
        raise CLIFailed(errors[0])


class Ctx:
    """Shared, read-only material (copy before mutating): a trained patched model, its checkpoint."""

    def __init__(self, root: Path):
        self.root = root
        self.model = trained("gpt2", CFG)
        self.ckpt = root / "ckpt"
        self.model.save_pretrained(self.ckpt)
        self.x = batch()
        self.n = 0

    def fresh(self) -> Path:
        self.n += 1
        path = self.root / f"case{self.n}"
        path.mkdir()
        return path

    def copy_ckpt(self) -> Path:
        dest = self.fresh() / "ckpt"
        shutil.copytree(self.ckpt, dest)
        return dest

    def logits(self, model, **kw):
        with torch.no_grad():
            return model(input_ids=self.x, **kw).logits


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("bad_inputs"))


@dataclass
class Case:
    name: str
    run: Callable[[Ctx], object]
    exc: type | None = None
    match: str = ""


def fwd(ids, train=False, x=None):
    def run(c: Ctx):
        m = copy.deepcopy(c.model).train(train)
        m(input_ids=c.x if x is None else x, sequence_ids=ids)
    return run


def collate(ids, packing=False):
    def run(c: Ctx):
        rows = [{"input_ids": [5, 6, 7], "sequence_ids": ids}, {"input_ids": [8, 9, 10], "sequence_ids": 4}]
        (MemSinkPackingCollator(max_length=8) if packing else MemSinkDataCollator(pad_token_id=0))(rows)
    return run


def removed_with(forget):
    return lambda c: copy.deepcopy(c.model).remove_sinks(forget_ids=forget)


# ---- rows whose result must be right ----------------------------------------------------------------------


def forget_numpy_ids_forgets_exactly_those(c: Ctx):
    with c.model.sink_mode("exclude", [5]):
        expected = c.logits(c.model)
    got = c.logits(copy.deepcopy(c.model).remove_sinks(forget_ids=np.array([5], dtype=np.int32)))
    assert (got - expected).abs().max() < 1e-5


def collator_keeps_minus_one_and_large_ids(c: Ctx):
    rows = [{"input_ids": [5, 6], "sequence_ids": [-1, 2**62]}, {"input_ids": [7], "sequence_ids": [3]}]
    out = MemSinkDataCollator(pad_token_id=0)(rows)
    assert out["sequence_ids"].tolist() == [[-1, 2**62], [3, -1]]


def add_sequence_ids_by_ids_validates_and_copies(c: Ctx):
    from datasets import Dataset

    ds = add_sequence_ids(Dataset.from_dict({"doc": [3, 4, -1], "text": ["a", "b", "c"]}), by="ids", column="doc")
    assert ds["sequence_ids"] == [3, 4, -1]


def pickle_roundtrip_is_exact(c: Ctx):
    buf = io.BytesIO()
    torch.save(c.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(c.model)
    assert torch.equal(c.logits(loaded), c.logits(c.model))
    ids = torch.tensor([1, 2, 3])
    with loaded.sink_mode("activate"), c.model.sink_mode("activate"):
        assert torch.equal(c.logits(loaded, sequence_ids=ids), c.logits(c.model, sequence_ids=ids))
    assert torch.equal(c.logits(pickle.loads(pickle.dumps(c.model)).remove_sinks()), c.logits(c.model))


def deepcopy_is_independent(c: Ctx):
    clone = copy.deepcopy(c.model)
    clone.remove_sinks()
    assert hasattr(c.model, "memsink_config") and not hasattr(clone, "memsink_config")


def lost_config_restored_with_matching_settings(c: Ctx):
    ck = c.copy_ckpt()
    (ck / "memsink_config.json").unlink()
    # The checkpoint's config.json says n_inner=48 (general); the 16 sinks per MLP are added back.
    restored = AutoMemSinkModelForCausalLM.from_pretrained(
        ck, memsink_config=MemSinkConfig(mode="add", num_sink_neurons=16, sink_active_prob=0.4)).eval()
    with restored.sink_mode("expected"), c.model.sink_mode("expected"):
        assert torch.equal(c.logits(restored), c.logits(c.model))


def save_over_other_layout_keeps_other_files(c: Ctx):
    ck = c.copy_ckpt()
    (ck / "notes.txt").write_text("mine")
    other = get_memsink_model(tiny_model("gpt2", seed=3), MemSinkConfig(sink_fraction=0.5)).eval()
    other.save_pretrained(ck)
    assert (ck / "notes.txt").read_text() == "mine"
    assert json.loads((ck / "memsink_config.json").read_text())["sink_fraction"] == 0.5
    assert torch.equal(c.logits(AutoMemSinkModelForCausalLM.from_pretrained(ck).eval()), c.logits(other))
    assert not [p for p in ck.parent.iterdir() if ".memsink-tmp-" in p.name]  # nothing left behind


def export_overwrite_replaces_only_its_files(c: Ctx):
    out = c.fresh() / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("old card")
    cli("export", c.ckpt, out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and "sink neurons were removed" in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (c.logits(plain) - c.logits(c.model)).abs().max() < 1e-5


# ---- helpers for failing rows -------------------------------------------------------------------------------


def with_ckpt(edit, **load_kw):
    def run(c: Ctx):
        ck = c.copy_ckpt()
        edit(c, ck)
        AutoMemSinkModelForCausalLM.from_pretrained(ck, **load_kw)
    return run


def corrupt_weights(c: Ctx, ck: Path):
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)


def other_layout_config(c: Ctx, ck: Path):
    other = c.fresh() / "other"
    get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5)).save_pretrained(other)
    shutil.copy(other / "memsink_config.json", ck / "memsink_config.json")


def load_sd(src_cfg, dst_cfg, strip=False, model_type="gpt2"):
    def run(c: Ctx):
        src = get_memsink_model(tiny_model(model_type), src_cfg)
        dst = get_memsink_model(tiny_model(model_type), dst_cfg)
        sd = src.state_dict()
        dst.load_state_dict(dict(sd) if strip else sd, strict=True)
    return run


def write_config(text):
    def run(c: Ctx):
        path = c.fresh() / "bad.yaml"
        path.write_text(text)
        cli("run", path, "--out", c.fresh())
    return run


def audit_of(make):
    def run(c: Ctx):
        cli("audit", make(c))
    return run


def export_to(make_out, *extra):
    def run(c: Ctx):
        cli("export", c.ckpt, make_out(c), *extra)
    return run


def dir_with_corrupt_weights(c: Ctx) -> Path:
    d = c.fresh()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"junk")
    return d


def nonempty(c: Ctx) -> Path:
    d = c.fresh()
    (d / "keep.txt").write_text("x")
    return d


CASES = [
    # -- sequence IDs: forward --
    Case("forward float ids", fwd(torch.tensor([1.0, 2.0, 3.0]), train=True), TypeError, "sequence_ids.*float32"),
    Case("forward 5.7 in a list", fwd([1, 5.7, 3], train=True), TypeError, "sequence_ids.*5.7"),
    Case("forward bool ids", fwd(torch.tensor([True, False, True]), train=True), TypeError, "sequence_ids.*bool"),
    Case("forward -100 pad id", fwd(torch.tensor([1, -100, 3]), train=True), ValueError, "sequence_ids.*-100"),
    Case("forward other negative id", fwd([[5] * 12, [-2] * 12, [7] * 12]), ValueError, "negative ID -2"),
    Case("forward python int beyond int64", fwd([1, 2, 2**63], train=True), ValueError, "2\\*\\*63|int64"),
    Case("forward uint64 that would wrap", fwd(np.array([1, 2, 2**63], dtype=np.uint64), train=True), ValueError,
         "int64"),
    Case("forward string ids", fwd("abc", train=True), TypeError, "sequence_ids.*string"),
    Case("forward wrong batch size", fwd(torch.tensor([1, 2]), train=True), ValueError, "2 IDs for a batch of 3"),
    Case("forward 3-d ids", fwd(torch.ones(3, 12, 2, dtype=torch.long), train=True), ValueError, "shape"),
    Case("forward per-token length", fwd(torch.ones(3, 5, dtype=torch.long), train=True), ValueError, "length 5"),
    Case("training forward without ids", fwd(None, train=True), ValueError, "needs sequence_ids"),
    # -- sequence IDs: modes, removal, callback --
    Case("set_sink_mode float ids", lambda c: copy.deepcopy(c.model).set_sink_mode("activate", [1.5]), TypeError,
         "set_sink_mode"),
    Case("set_sink_mode negative ids", lambda c: copy.deepcopy(c.model).set_sink_mode("exclude", [-5]), ValueError,
         "set_sink_mode.*-5"),
    Case("ids for a mode without ids", lambda c: copy.deepcopy(c.model).set_sink_mode("drop", [1]), ValueError,
         "takes no sequence IDs"),
    Case("unknown sink mode", lambda c: copy.deepcopy(c.model).set_sink_mode("dropp"), ValueError, "unknown sink mode"),
    Case("activate ids in two places", lambda c: (lambda m: (m.set_sink_mode("activate", [1, 2, 3]),
                                                             m(input_ids=c.x, sequence_ids=[4, 5, 6])))(
        copy.deepcopy(c.model)), ValueError, "one place"),
    Case("forget_ids float array", removed_with(np.array([2.0])), TypeError, "forget_ids.*float64"),
    Case("forget_ids bools", removed_with([True]), TypeError, "forget_ids.*bool"),
    Case("forget_ids empty", removed_with([]), ValueError, "forget_ids is empty"),
    Case("forget_ids negative", removed_with([-7]), ValueError, "forget_ids.*-7"),
    Case("forget_ids numpy int32 is right", forget_numpy_ids_forgets_exactly_those),
    Case("callback forget_ids float", lambda c: MemSinkCallback(forget_ids=[1.5]), TypeError, "MemSinkCallback"),
    # -- sequence IDs: collators and datasets --
    Case("collator 5.7", collate(5.7), TypeError, "example 0.*5.7"),
    Case("collator float tensor per token", collate(torch.tensor([1.0, 2.0, 3.0])), TypeError, "example 0.*float"),
    Case("collator -100", collate(-100), ValueError, "example 0.*-100"),
    Case("collator string id", collate("doc-1"), TypeError, "example 0.*string"),
    Case("collator bool id", collate(True), TypeError, "example 0.*bool"),
    Case("packing collator 5.7", collate(5.7, packing=True), TypeError, "example 0.*5.7"),
    Case("collator -1 and big ids kept", collator_keeps_minus_one_and_large_ids),
    Case("unchecked negative ids activate no sink", lambda c: [
        assert_(not __import__("hf_memsinks").sink_mask(torch.tensor([-100, -2, -1]), 64, 0.9, scheme=s).any())
        for s in ("hash", "reference")]),
    Case("add_sequence_ids float column", lambda c: add_sequence_ids(
        __import__("datasets").Dataset.from_dict({"doc": [1.0, 2.5]}), by="ids", column="doc"), TypeError,
        "row 0 of column 'doc'"),
    Case("add_sequence_ids by ids", add_sequence_ids_by_ids_validates_and_copies),
    # -- checkpoints and loading --
    Case("missing checkpoint path", lambda c: AutoMemSinkModelForCausalLM.from_pretrained(c.root / "no" / "such"),
         FileNotFoundError, "no such checkpoint directory"),
    Case("weights file instead of dir", lambda c: AutoMemSinkModelForCausalLM.from_pretrained(
        c.ckpt / "model.safetensors"), ValueError, "is a file"),
    Case("corrupt memsink_config.json", with_ckpt(lambda c, ck: (ck / "memsink_config.json").write_text("{oops")),
         ValueError, "memsink_config.json is not valid JSON"),
    Case("misspelled field in memsink_config.json", with_ckpt(lambda c, ck: (ck / "memsink_config.json").write_text(
        json.dumps({**json.loads((c.ckpt / "memsink_config.json").read_text()), "sink_fracton": 0.3}))),
        ValueError, "memsink_config.json.*'sink_fracton' \\(did you mean 'sink_fraction'"),
    Case("lost memsink_config.json", with_ckpt(lambda c, ck: (ck / "memsink_config.json").unlink()), ValueError,
         "sink tensors .* but no memsink_config.json"),
    Case("lost config, wrong MemSinkConfig passed", with_ckpt(lambda c, ck: (ck / "memsink_config.json").unlink(),
                                                               memsink_config=CFG), ValueError,
         "memsink_config passed does not match the sink tensors"),
    Case("lost config, matching MemSinkConfig passed", lost_config_restored_with_matching_settings),
    Case("memsink_config.json of another layout", with_ckpt(other_layout_config), ValueError,
         "memsink_config.json does not match the weights"),
    Case("corrupt safetensors", with_ckpt(corrupt_weights), ValueError,
         "model.safetensors is not a readable safetensors"),
    Case("truncated safetensors", with_ckpt(lambda c, ck: (ck / "model.safetensors").write_bytes(
        (c.ckpt / "model.safetensors").read_bytes()[:5000])), ValueError, "model.safetensors is not a readable"),
    Case("plain dir without memsink_config", lambda c: (lambda d: (tiny_model("gpt2").save_pretrained(d),
                                                                   AutoMemSinkModelForCausalLM.from_pretrained(d)))(
        c.fresh()), ValueError, "plain model: pass memsink_config"),
    Case("dir without config.json", lambda c: AutoMemSinkModelForCausalLM.from_pretrained(c.fresh()),
         FileNotFoundError, "no config.json"),
    Case("load_state_dict across sink fractions", load_sd(CFG, MemSinkConfig(sink_fraction=0.5)), RuntimeError,
         "sink layout mismatch.*general 48 vs 32, sinks 16 vs 32"),
    Case("load_state_dict across salts", load_sd(CFG, MemSinkConfig(sink_fraction=0.25, sink_active_prob=0.4, salt=7)),
         RuntimeError, "sink layout mismatch.*salt 0 vs 7"),
    Case("load_state_dict across mask schemes", load_sd(CFG, MemSinkConfig(
        sink_fraction=0.25, sink_active_prob=0.4, reference=PaperReference(mask_scheme="reference"))),
         RuntimeError, "mask_scheme 'hash' vs 'reference'"),
    Case("load_state_dict without metadata", load_sd(CFG, MemSinkConfig(sink_fraction=0.5), strip=True), RuntimeError,
         "size mismatch.*another sink layout"),
    Case("padded load_state_dict without metadata",
         load_sd(MemSinkConfig(sink_fraction=0.5), MemSinkConfig(sink_fraction=0.25), strip=True, model_type="bloom"),
         RuntimeError, "nonzero values where this model .* keeps its sinks|another sink layout"),
    Case("width_attr misspelled", lambda c: get_memsink_model(tiny_model("gpt2"), MemSinkConfig(target_modules={
        "in_proj": "c_fc", "out_proj": "c_proj", "width_attr": "n_iner"})), ValueError, "did you mean 'n_inner'"),
    Case("target_modules key misspelled", lambda c: MemSinkConfig(target_modules={
        "in_proj": "c_fc", "out_proj": "c_proj", "widht_attr": "n_inner"}), ValueError, "did you mean 'width_attr'"),
    Case("torch.save / pickle round trip", pickle_roundtrip_is_exact),
    Case("deepcopy", deepcopy_is_independent),
    Case("save over a checkpoint of another layout", save_over_other_layout_keeps_other_files),
    # -- CLI --
    Case("audit missing dir", audit_of(lambda c: c.root / "nope"), CLIFailed, "no such directory"),
    Case("audit empty dir", audit_of(lambda c: c.fresh()), CLIFailed, "not a model directory"),
    Case("audit a file", audit_of(lambda c: c.ckpt / "config.json"), CLIFailed, "not a directory"),
    Case("audit corrupt safetensors", audit_of(dir_with_corrupt_weights), CLIFailed, "not a readable safetensors"),
    Case("audit dir without weights", audit_of(lambda c: (lambda d: ((d / "config.json").write_text("{}"), d)[1])(
        c.fresh())), CLIFailed, "no weights"),
    Case("export into its own input", export_to(lambda c: c.ckpt), CLIFailed, "is the input checkpoint itself"),
    Case("export into a non-empty dir", export_to(nonempty), CLIFailed, "not empty.*--overwrite"),
    Case("export into a memsink checkpoint", export_to(lambda c: c.copy_ckpt(), "--overwrite"), CLIFailed,
         "holds a memsink checkpoint"),
    Case("export --overwrite keeps other files", export_overwrite_replaces_only_its_files),
    Case("export a missing checkpoint", lambda c: cli("export", c.root / "no" / "such", c.root / "o1"), CLIFailed,
         "no such checkpoint directory"),
    Case("export a corrupt checkpoint", lambda c: cli("export", with_ckpt_path(c, corrupt_weights), c.root / "o2"),
         CLIFailed, "model.safetensors is not a readable safetensors file"),
    Case("export negative forget id", lambda c: cli("export", c.ckpt, c.root / "o3", "--forget-ids", "-5"), CLIFailed,
         "--forget-ids.*-5"),
    Case("run train.steps=abc", lambda c: cli("run", SMOKE, "train.steps=abc", "--out", c.fresh()), CLIFailed,
         "'train.steps' must be int, got 'abc'"),
    Case("run misspelled override key", lambda c: cli("run", SMOKE, "train.stpes=5", "--out", c.fresh()), CLIFailed,
         "unknown key 'train.stpes' \\(did you mean 'train.steps'"),
    Case("run misspelled memsinks key", lambda c: cli("run", SMOKE, "memsinks.sink_fracton=0.5"), CLIFailed,
         "did you mean 'memsinks.sink_fraction'"),
    Case("run misspelled section", lambda c: cli("run", SMOKE, "trian.steps=3"), CLIFailed, "did you mean 'train'"),
    Case("run misspelled forget memsinks key", lambda c: cli("run", SMOKE, "forget.memsinks.sink_active_prb=0.1"),
         CLIFailed, "did you mean 'forget.memsinks.sink_active_prob'"),
    Case("run misspelled goldfish key", lambda c: cli("run", SMOKE, "goldfish.kk=4"), CLIFailed,
         "did you mean 'goldfish.k'"),
    Case("run config file with a misspelled key",
         write_config("data: {max_lenght: 32}\ntrain: {steps: 1, batch_size: 1}\n"), CLIFailed,
         "did you mean 'data.max_length'"),
    Case("run config that is not YAML", write_config("train: [unclosed\n"), CLIFailed, "not valid YAML"),
    Case("run on a device by index", lambda c: cli("run", SMOKE, "device=cuda:1"), CLIFailed,
         "device must be one of .* CUDA_VISIBLE_DEVICES"),
    Case("run with an unknown precision", lambda c: cli("run", SMOKE, "train.precision=fp8"), CLIFailed,
         "train.precision must be one of"),
    Case("run missing config file", lambda c: cli("run", c.root / "none.yaml"), CLIFailed, "No such file"),
]


def assert_(condition: bool) -> None:
    assert condition


def with_ckpt_path(c: Ctx, edit) -> Path:
    ck = c.copy_ckpt()
    edit(c, ck)
    return ck


def test_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.exc is not None for c in CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ctx: Ctx):
    if case.exc is None:
        case.run(ctx)
        return
    with pytest.raises(case.exc, match=case.match):
        case.run(ctx)


def test_checkpoint_untouched_by_failed_exports(ctx: Ctx):
    """The refused exports above wrote nothing: the checkpoint still holds the same bytes."""
    before = {p.name: p.read_bytes() for p in ctx.ckpt.iterdir()}
    with pytest.raises(CLIFailed):
        cli("export", ctx.ckpt, ctx.ckpt)
    with pytest.raises(CLIFailed):
        cli("export", ctx.ckpt, str(ctx.ckpt) + "/")
    assert {p.name: p.read_bytes() for p in ctx.ckpt.iterdir()} == before
    restored = AutoMemSinkModelForCausalLM.from_pretrained(ctx.ckpt).eval()
    assert torch.equal(ctx.logits(restored), ctx.logits(ctx.model))


def test_cli_user_error_in_a_real_process_is_one_line():
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memorization", "run", SMOKE, "train.steps=abc"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    expected = "error: override 'train.steps=abc': 'train.steps' must be int, got 'abc'"
    assert proc.stderr.strip() == f"{BENCH_PROG}: {expected}"


def _logits_in_child(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits, type(model).__mro__[1].__name__


def test_patched_model_crosses_a_spawned_process(ctx: Ctx):
    """multiprocessing (spawn) pickles the patched model to the child and back."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got, base = pool.apply(_logits_in_child, (ctx.model, ctx.x))
    assert base == "MemSinkModelMixin" and torch.equal(got, ctx.logits(ctx.model))
