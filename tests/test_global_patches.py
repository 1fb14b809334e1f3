"""The only global changes ``import hf_memsinks`` makes are the ones hf_memsinks/global_patches.py
installs; they can be turned off before import and undone after it, exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_memsinks"


def _in_child(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


GLOBALS = """
import huggingface_hub
import peft, peft.peft_model, peft.utils.save_and_load
from huggingface_hub import HfApi, hf_api
from transformers import trainer
names = ("create_commit", "preupload_lfs_files", "upload_folder", "batch_bucket_files")
peft_modules = (peft, peft.utils, peft.peft_model, peft.utils.save_and_load)
def snapshot():
    return ([getattr(HfApi, n) for n in names] + [getattr(hf_api, n) for n in names]
            + [getattr(huggingface_hub, n, None) for n in names] + [list(trainer.DEFAULT_CALLBACKS)]
            + [m.get_peft_model_state_dict for m in peft_modules]
            + [m.set_peft_model_state_dict for m in peft_modules])
before = snapshot()
"""


def test_nothing_global_changes_with_the_patches_off():
    """Every module of the package imported, with HF_MEMSINKS_GLOBAL_PATCHES=0: huggingface_hub,
    Transformers' default callbacks and PEFT are exactly as they were (no other module patches
    anything)."""
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in sorted(PACKAGE.rglob("*.py"))]
    names = [n for n in names if not n.endswith("__main__") and n != "hf_memsinks.integrations.sft"]
    code = GLOBALS + "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + (
        "import hf_memsinks.global_patches as g\n"
        "print(snapshot() == before, g.installed())\n")
    assert _in_child(code, HF_MEMSINKS_GLOBAL_PATCHES="0") == "True False"


def test_install_and_uninstall_are_exact_inverses():
    code = GLOBALS + (
        "import hf_memsinks\nfrom hf_memsinks import global_patches as g\n"
        "on = snapshot()\n"
        "print(on != before, g.installed())\n"
        "g.uninstall()\nprint(snapshot() == before, g.installed())\n"
        "g.install(); again = snapshot(); g.install()\n"
        "print(snapshot() == again, [getattr(HfApi, n).__wrapped__ for n in names] == before[:4])\n"
        "from hf_memsinks.publishing.pushes import PushGuard\n"
        "print(trainer.DEFAULT_CALLBACKS.count(PushGuard))\n")
    assert _in_child(code).split("\n") == ["True True", "True False", "True True", "1"]


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_switch(value):
    assert _in_child("import hf_memsinks.global_patches as g\nprint(g.installed())",
                     HF_MEMSINKS_GLOBAL_PATCHES=value) == "False"


TRAIN_SINKS = """
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model
from hf_memsinks import MemSinkConfig, get_memsink_model, train_sinks
def lora():
    model = get_memsink_model(tiny_model("gpt2"), MemSinkConfig(sink_fraction=0.5))
    train_sinks(get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)))
"""


def test_peft_patched_by_install_or_train_sinks_while_the_patches_are_on():
    """PEFT's adapter state holds the sinks after ``import hf_memsinks`` (peft imported by then) or
    else from the first ``train_sinks``; not after ``uninstall()`` nor with the switch off."""
    code = ("import sys\nsys.path.insert(0, 'tests')\nimport hf_memsinks\nfrom hf_memsinks import global_patches as g\n"
            "from hf_memsinks.integrations.adapter_files import adapters_hold_sinks, release_adapters\n"
            + TRAIN_SINKS + "print(adapters_hold_sinks() == ('peft' in sys.modules))\n"
            "release_adapters()\nprint(adapters_hold_sinks())\nlora()\nprint(adapters_hold_sinks())\n"
            "g.uninstall()\nprint(adapters_hold_sinks())\nlora()\nprint(adapters_hold_sinks())\n")
    assert _in_child(code).split("\n") == ["True", "False", "True", "False", "False"]
    off = ("import sys, warnings\nsys.path.insert(0, 'tests')\n" + TRAIN_SINKS +
           "from hf_memsinks.integrations.adapter_files import adapters_hold_sinks\n"
           "with warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n    lora()\n"
           "print(adapters_hold_sinks(), any('without the sinks' in str(w.message) for w in seen))\n")
    assert _in_child(off, HF_MEMSINKS_GLOBAL_PATCHES="0") == "False True"
