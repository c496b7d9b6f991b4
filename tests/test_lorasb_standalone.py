"""lorasb.py copied alone into an empty folder works with nothing of the project importable: the README's usage block
(estimate, add adapters, train, save, export to PEFT, load) runs there on a tiny Hugging Face Llama."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

# What the README's block expects the user to bring: load_base_model() and a list of batches with -100 labels on the
# prompt. A tiny random Llama (the same weights at each call) stands in for from_pretrained.
PREAMBLE = '''
import importlib.util
import os

for name in ("model", "data", "train_gsm8k", "machinery"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the project is on sys.path"

import torch
import transformers


def load_base_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
labels[:, :6] = -100  # the first 6 tokens are the prompt
batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2]), "labels": labels[i:i + 2]}
           for i in range(0, 8, 2)] * 8  # 64 examples: 32 for the estimate, all of them for training
'''

CHECKS = '''
assert os.path.dirname(os.path.abspath(lorasb.__file__)) == os.getcwd()
for name, adapter in lorasb.adapters(model).items():
    initial_r = lorasb.lorasb_factors(updates[name], 16)[1]
    assert (adapter.R - initial_r).abs().max() > 1e-6, f"{name}: R did not train"
model.eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits
    with lorasb.merged(restored):
        torch.testing.assert_close(restored(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(restored(input_ids=ids).logits, logits), "the loaded adapter computes something else"
assert os.path.isfile("peft_adapter/adapter_config.json")
assert os.path.isfile("peft_adapter/adapter_model.safetensors")
if importlib.util.find_spec("peft"):
    import peft

    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(load_base_model(), "peft_adapter")(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, logits, atol=1e-5, rtol=1e-5)
    print("PEFT: the same logits")
'''


def readme_usage_block() -> str:
    section = (REPO / "README.md").read_text().split("## Use lorasb.py in your own project", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_with_lorasb_py_alone(folder, script: str) -> str:
    """Run `script` as example.py in `folder` beside a copy of lorasb.py and nothing else of the project; its stdout."""
    shutil.copy(REPO / "lorasb.py", folder / "lorasb.py")
    (folder / "example.py").write_text(script)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    # -E: no PYTHONPATH; sys.path[0] is the script's folder, which holds lorasb.py and nothing else of the project
    result = subprocess.run([sys.executable, "-E", "example.py"], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_readme_block_runs_with_lorasb_py_alone_on_a_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    assert "lorasb: rank 16 on 14 linear layers" in run_with_lorasb_py_alone(tmp_path, PREAMBLE + readme_usage_block()
                                                                             + CHECKS)
    written = {p.name for p in tmp_path.iterdir()} - {"__pycache__", "example.py", "lorasb.py"}
    assert written == {"adapter.safetensors", "peft_adapter"}


FOUR_BIT = PREAMBLE + '''
import bitsandbytes as bnb
import lorasb


def load_4bit_base_model():
    """A tiny Llama (64 wide: bitsandbytes' CPU kernels want in_features >= its block of 64) with its target linears
    as bitsandbytes NF4 Linear4bit (QLoRA's frozen base), on the CPU."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    for name, linear in lorasb.find_targets(model).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))
    return model


def loss_fn(model, batch):
    return model(**batch).loss


model = load_4bit_base_model()
groups = lorasb.estimate_by_group(model, batches, loss_fn, num_samples=8, lr=1e-3, group_bytes=4 * 64 * 128)
print(lorasb.add_adapters(model, "lorasb", rank=8, updates=groups))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
initial = {name: m.R.detach().clone() for name, m in lorasb.adapters(model).items()}
loss_fn(model, batches[0]).backward()
optimizer.step()
assert all(not torch.equal(m.R, initial[name]) for name, m in lorasb.adapters(model).items()), "R did not train"
lorasb.save_adapter(model, "adapter.safetensors", method="lorasb")
lorasb.export_peft(model, "peft_adapter")
restored = load_4bit_base_model()
lorasb.load_adapter(restored, "adapter.safetensors")
model.eval(), restored.eval()
with torch.no_grad():
    assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)
    if importlib.util.find_spec("peft"):
        import peft

        peft_logits = peft.PeftModel.from_pretrained(load_4bit_base_model(), "peft_adapter")(input_ids=ids).logits
        torch.testing.assert_close(peft_logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        print("PEFT over the 4-bit base: the same logits")
'''


def test_lorasb_py_alone_on_a_hugging_face_model_with_bitsandbytes_4_bit_linears(tmp_path):
    """QLoRA's setup: estimate in groups (one pass per group), add, train a step, save, load, export to PEFT."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    stdout = run_with_lorasb_py_alone(tmp_path, FOUR_BIT)
    assert "lorasb: rank 8 on 14 linear layers" in stdout
    assert "PEFT over the 4-bit base: the same logits" in stdout or not importlib.util.find_spec("peft")


def test_the_readme_says_how_to_choose_the_layers_of_other_models():
    """A model whose layers are not named q_proj ... down_proj (BERT, GPT-2) needs targets=: the section says so, and
    names GPT-2's Conv1D."""
    section = (REPO / "README.md").read_text().split("## Use lorasb.py in your own project", 1)[1].split("\n## ", 1)[0]
    assert "targets=" in section and "Conv1D" in section and "BERT" in section
