"""lorasb.py copied alone into an empty folder works with nothing of the project importable: a complete small example
(estimate, add adapters, train, save, load, export to PEFT) runs there on a tiny Hugging Face Llama."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

# A complete example of lorasb.py in another project; the tiny random Llama stands in for from_pretrained.
EXAMPLE = '''
import torch
import transformers

import lorasb


def base_model():
    """Stands in for AutoModelForCausalLM.from_pretrained(...): a tiny Llama, the same random weights at each call."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def loss_fn(model, batch):
    return model(**batch).loss  # the mean loss over the batch's labelled tokens


# A list, not a generator: the estimate and the training loop both go through it. The labels are the input ids on
# the answer and -100 (no loss) on the prompt (and on padding, where there is some).
ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
labels[:, :6] = -100  # the first 6 tokens are the prompt
batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": labels[i:i + 4]}
           for i in (0, 4)]

lr = 1e-3
lr_1 = lr  # the learning rate of the first optimizer step: lr itself, since this loop has no warmup

model = base_model()
updates = lorasb.estimate_first_update(model, batches, loss_fn, num_samples=8, lr=lr_1)
print(lorasb.add_adapters(model, "lorasb", rank=4, updates=updates))  # freezes all but R

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
for batch in batches:
    loss_fn(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad()

lorasb.save_adapter(model, "adapter.safetensors", method="lorasb", base_model="tiny-llama")  # R, B, A + metadata
fresh = base_model()
lorasb.load_adapter(fresh, "adapter.safetensors")  # the base model again, now with the trained adapters
lorasb.export_peft(model, "peft_adapter", base_model="tiny-llama")  # loads in PEFT; vLLM: --enable-lora
'''

ISOLATED = '''
import importlib.util
import os

for name in ("model", "data", "train_gsm8k", "machinery"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the project is on sys.path"
'''

CHECKS = '''
import importlib.util

assert os.path.dirname(os.path.abspath(lorasb.__file__)) == os.getcwd()
for name, adapter in lorasb.adapters(model).items():
    initial_r = lorasb.lorasb_factors(updates[name], 4)[1]
    assert (adapter.R - initial_r).abs().max() > 1e-5, f"{name}: R did not train"
model.eval()
fresh.eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits
    assert torch.equal(fresh(input_ids=ids).logits, logits), "the loaded adapter computes something else"
assert os.path.isfile("peft_adapter/adapter_config.json")
assert os.path.isfile("peft_adapter/adapter_model.safetensors")
if importlib.util.find_spec("peft"):
    import peft

    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base_model(), "peft_adapter")(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, logits, atol=1e-5, rtol=1e-5)
    print("PEFT: the same logits")
'''


def test_lorasb_py_alone_runs_a_complete_example_on_a_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    shutil.copy(REPO / "lorasb.py", tmp_path / "lorasb.py")
    (tmp_path / "example.py").write_text(ISOLATED + EXAMPLE + CHECKS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    # -E: no PYTHONPATH; sys.path[0] is the script's folder, which holds lorasb.py and nothing else of the project
    result = subprocess.run([sys.executable, "-E", "example.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "lorasb: rank 4 on 14 linear layers" in result.stdout
    written = {p.name for p in tmp_path.iterdir()} - {"__pycache__", "example.py", "lorasb.py"}
    assert written == {"adapter.safetensors", "peft_adapter"}
