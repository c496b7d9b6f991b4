r"""Fine-tune a pretrained LLM on GSM8K with LoRA-SB (or LoRA, LoRA-XS, full fine-tuning) and evaluate it on GSM8K (and
MATH).

One GPU (Qwen/Qwen2.5-0.5B, LoRA-SB rank 96 on the seven projections, GSM8K train, then GSM8K test accuracy):
    python train_gsm8k.py
A baseline is one flag away:
    python train_gsm8k.py --method lora      # or loraxs, full
Several GPUs (the first-update estimate is summed over processes, data is sharded, process 0 writes):
    torchrun --nproc_per_node=8 train_gsm8k.py
Quick check on CPU with a local model folder and the GSM8K files:
    python train_gsm8k.py --model path/to/model --data_dir path/to/gsm8k --device cpu --max_steps 5 --eval_limit 8
The paper's arithmetic setting (Mistral-7B, MetaMathQA first 50K, rank 96, 1 epoch), evaluated on GSM8K and MATH:
    python train_gsm8k.py --model mistralai/Mistral-7B-v0.1 --train_data metamathqa --num_train 50000 \
        --rank 96 --epochs 1 --weight_decay 0.01 --eval_data gsm8k,math
The authors' exact run adds their lr_1, SVD, init batches and evaluated model (README.md, "The authors' exact run"):
        --num_init_samples 50 --init_batch_size 3 --lr_1 2.99994e-7 --init_svd authors --eval_merge bf16

A run, in the order main() and run() call its phases:
    Setup.from_args         check every argument, start torch.distributed, pick the device and dtypes, seed
    run_folder.lock         hold --out_dir: a second run on it is refused
    load                    the model folder and config, the tokenizer, the test problems, the training pairs
    plan_training           steps, warmup, lr_1 (the first step's LR, or --lr_1) and the number of init samples
    initialize_adapters     the method: LoRA-SB estimates the first full fine-tuning update, then B, R, A = its SVD
    Checkpointer            with --resume, the newest intact checkpoint of the same run (else the run starts afresh)
    train                   AdamW on what trains, gradient accumulation; after each step the checkpointer logs,
                            checkpoints every --save_every steps and stops the run on a signal or a divergence
    save_outputs            the adapter and its PEFT export (or the fine-tuned model folder)
    report                  evaluate each --eval_data set (EVAL_TASKS: GSM8K, MATH, the commonsense tasks): the
                            held-out loss, greedy answers scored by the authors' rules; write summary.json
What a real run needs beyond that (checkpoints and resume, the out_dir, torchrun, downloads) is in machinery/.
"""

import argparse
import itertools
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import lorasb
import model as model_lib
from machinery import (arguments, command, commonsense, datasets, distributed, hub, math_task, nf4, reporting,
                       run_folder)
from machinery.checkpointer import Checkpointer, RunCommand, StopOnSignal
from machinery.command import refuse
from machinery.run_identity import canonical_model, run_identity
from machinery.tokenizer import Tokenizer

# The evaluation sets --eval_data chooses from (data.EvalTask: how each is loaded, prompted, scored and written).
EVAL_TASKS = {"gsm8k": data.GSM8K, "math": math_task.MATH, **commonsense.TASKS}
# Everything a run writes in --out_dir: --overwrite deletes these (and nothing else), the summary lists them.
OUTPUTS = ("config.json", "metrics.jsonl", run_folder.CHECKPOINTS, "adapter.safetensors", "peft_adapter", "model",
           *(task.predictions for task in EVAL_TASKS.values()), "summary.json")
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")  # copied beside the weights of a fully fine-tuned model


# ----- Arguments: parsed once (defaults that depend on other arguments are resolved there), then never rewritten. -----

def parse_args(argv=None) -> argparse.Namespace:
    """The run's arguments: every option and its check are in machinery/arguments.py."""
    return arguments.parse_args(argv, __doc__, tuple(EVAL_TASKS))


# ----- Setup: one process, or one of torchrun's (ddp_rank of ddp_world_size); device, dtypes, seed. -------------------

@dataclass
class Setup:
    """Where and how this process runs, derived once from the arguments and the torchrun environment."""
    ddp: bool
    ddp_rank: int
    ddp_world_size: int
    device: torch.device
    compute_dtype: torch.dtype  # the dtype of the forward pass: bf16 on GPU, fp32 on CPU
    weights_dtype: torch.dtype  # frozen weights are stored in compute_dtype; weights that train stay fp32

    @classmethod
    def from_args(cls, args) -> "Setup":
        """Refuse bad arguments (all listed at once), then start torch.distributed under torchrun, pick the device and
        the dtypes, and seed torch's RNG (the data order has seeds of its own)."""
        ddp = "RANK" in os.environ
        ddp_rank, ddp_world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        problems = arguments.check_args(args, ddp_world_size)
        if problems:
            refuse(problems)
        device = distributed.start(torch.device(args.device)) if ddp else torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        compute_dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        # Frozen weights can be stored in bf16; weights that train are kept in fp32 (bf16 would round small updates
        # away) and run under bf16 autocast, like mixed-precision training elsewhere.
        weights_dtype = torch.float32 if args.method == "full" and not args.eval_only else compute_dtype
        torch.manual_seed(args.seed)
        return cls(ddp, ddp_rank, ddp_world_size, device, compute_dtype, weights_dtype)

    @classmethod
    def one_process(cls, device: torch.device, dtype: torch.dtype) -> "Setup":
        """One process computing and keeping its weights in `dtype`, without from_args' checks, process group and
        seed: for a tool that calls the trainer's phases on its own model (experiments/bench.py)."""
        return cls(False, 0, 1, device, dtype, dtype)

    @property
    def master_process(self) -> bool:
        return self.ddp_rank == 0

    def autocast(self):
        """bf16 autocast when computing in bf16 (mixed precision for the fp32 weights that train), else nothing."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def log(self, *message) -> None:
        if self.master_process:
            print(*message, flush=True)

    def warn(self, message: str) -> None:
        """A warning in the run's own voice: one log line (warnings.warn would add its source line)."""
        self.log(f"warning: {message}")

    def my_share(self, n: int) -> list[int]:
        """The indices of n items that this process handles: every ddp_world_size-th one from ddp_rank."""
        return list(range(self.ddp_rank, n, self.ddp_world_size))


# ----- Load: the model folder, the tokenizer and the data (downloaded into the cache unless given as local files). --

def training_data_files(args) -> list[Path]:
    if args.train_data == "gsm8k":
        return [datasets.gsm8k_dir(args.data_dir) / "train.jsonl"]
    if args.train_data == "commonsense":
        return datasets.commonsense_train_files(args.commonsense_dir)
    return [datasets.metamathqa_file(args.metamathqa_path)]


def training_pairs(args) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the authors' format: their Alpaca prompt, the response, then EOS."""
    if args.train_data == "gsm8k":
        rows = data.load_gsm8k("train", datasets.gsm8k_dir(args.data_dir))[:args.num_train]
        return [data.gsm8k_pair(r) for r in rows]
    if args.train_data == "commonsense":
        indent = commonsense.AUTHORS_INDENT if args.commonsense_prompt == "authors" else ""
        files = datasets.commonsense_train_files(args.commonsense_dir)
        rows = [r for path in files for r in commonsense.load_commonsense(path)]
        return [(commonsense.commonsense_prompt(r, indent), r["output"]) for r in rows[:args.num_train]]
    rows = data.load_metamathqa(args.num_train or 50_000, datasets.metamathqa_file(args.metamathqa_path))
    return [(data.METAMATH_PROMPT.format(instruction=r["query"]), r["response"]) for r in rows]


def held_out_sets(eval_data: tuple[str, ...]) -> tuple[str, ...]:
    """The test sets whose answers the held-out loss is on: GSM8K's solutions (also when only MATH is evaluated), or,
    when every evaluated set but GSM8K has answers in the training format (the commonsense tasks), theirs."""
    if "gsm8k" in eval_data or not all(EVAL_TASKS[name].held_out_pair for name in eval_data):
        return ("gsm8k",)
    return eval_data


@dataclass
class Loaded:
    """What the run reads before the weights: the model folder and config, the tokenizer, and the data."""
    folder: Path
    config: model_lib.ModelConfig
    tokenizer: Tokenizer
    test_sets: dict[str, list[dict]]  # the first --eval_limit records of each test set evaluated or held out
    pairs: list[tuple[str, str]] | None  # the (prompt, response) training pairs; None with --eval_only

    @property
    def eos_ids(self) -> set[int]:
        """Generation stops at any of these: the tokenizer's EOS and the config's (often a longer list)."""
        return {self.tokenizer.eos_id, *self.config.eos_token_ids} - {None}


def load(args, setup: Setup) -> Loaded:
    """Resolve the model folder (local, HF cache or download) and the data, read config.json, check that the weights
    fit it, load the tokenizer, and check what depends on the model's shapes and context length (every problem at
    once). Under torchrun process 0 downloads first; the others then find the files in the cache."""
    if setup.ddp and not setup.master_process:
        dist.barrier()
    fetched = command.MissingInputs()  # every input that is missing (offline, or no such file), reported at once
    folder = fetched(lambda: hub.resolve_model(args.model))
    test_files = {name: fetched(partial(EVAL_TASKS[name].test_file, args))
                  for name in dict.fromkeys([*args.eval_data, *held_out_sets(args.eval_data)])}
    test_sets = {name: EVAL_TASKS[name].load(path)[:args.eval_limit] for name, path in test_files.items() if path}
    pairs = None if args.eval_only else fetched(partial(training_pairs, args))
    if setup.ddp and setup.master_process:
        dist.barrier()
    fetched.refuse_if_any()
    config = model_lib.load_config(folder)
    model_lib.check_checkpoint(folder, config)  # the weights fit config.json, before check_model builds its skeleton
    tokenizer = Tokenizer.from_dir(folder)
    problems = arguments.check_model(args, config)
    problems += [f"{test_files[name]} holds no test question: evaluation needs one"
                 for name, records in test_sets.items() if not records]
    prompt_lengths = {name: [len(tokenizer.encode(EVAL_TASKS[name].prompt(r))) for r in test_sets[name]]
                      for name in args.eval_data if test_sets[name]}
    problems += arguments.check_sizes(args, folder, config, prompt_lengths, EVAL_TASKS, setup)
    if pairs == []:  # else training_examples would blame --max_length for leaving no response token
        problems.append(f"no training example in {', '.join(map(str, training_data_files(args)))}: training needs one")
    if problems:
        refuse(problems)
    return Loaded(folder, config, tokenizer, test_sets, pairs)


def load_base_model(folder: Path, setup: Setup, quantize: str = "none"):
    """The pretrained model on the setup's device, its frozen weights in setup.weights_dtype; with --quantize nf4 its
    linear layers but lm_head in NF4, quantized tensor by tensor as they are read (no full-precision copy of them is
    ever made: machinery/nf4.py)."""
    if quantize == "nf4":
        return nf4.load_nf4_model(folder, device=setup.device, dtype=setup.weights_dtype, checked=True)
    return model_lib.load_model(folder, device=setup.device, dtype=setup.weights_dtype, checked=True)


def training_examples(loaded: Loaded, args, setup: Setup) -> list[dict]:
    """The training pairs tokenized (data.tokenize_dataset), less those that --max_length leaves without a response
    token: they would train nothing, and a micro-batch of only such examples has a loss of 0/0 = NaN."""
    with warnings.catch_warnings(record=True) as caught:  # data.py's warnings, said once in plain words
        warnings.simplefilter("always")
        examples, num_truncated = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
    for warning in caught:
        setup.warn(reporting.plainly(str(warning.message)))
    kept = [e for e in examples if any(label != -100 for label in e["labels"][1:])]  # position 0 predicts nothing
    num_empty = len(examples) - len(kept)
    setup.log(f"training examples: {len(kept)} ({num_truncated} truncated to {args.max_length} tokens, {num_empty} "
              f"left out: no response token left)")
    if not kept:
        refuse([f"--max_length {args.max_length} leaves no response token in any of the {len(examples)} training "
                f"examples (the prompt alone fills it): raise --max_length"])
    if num_empty:
        setup.warn(f"{num_empty} of {len(examples)} training examples are left out: --max_length {args.max_length} "
                   f"cuts off their whole response (raise --max_length to train on them)")
    return kept


# ----- The schedule: the number of steps, the LR of each, and what the LoRA-SB initialization derives from it. --------

@dataclass
class Plan:
    """What the arguments and the data imply for training (recorded in config.json)."""
    grad_accum: int  # micro-batches per optimizer step on each process
    total_steps: int
    warmup_steps: int
    lr_1: float  # the step size of LoRA-SB's first-update estimate: the LR of the first optimizer step, or --lr_1
    num_init_samples: int | None  # examples of the LoRA-SB estimate (None for the other methods)
    log_every: int = 10  # --log_every, by default a twentieth of the steps (1 to 10): even a short run shows a curve


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """LR of optimizer step `step` (1-based): linear warmup peak * step / warmup_steps, then cosine or linear decay
    towards 0.

    Step 1 gets peak / warmup_steps, not 0 (HF's warmup starts at 0), so lr_1, the LR that LoRA-SB's first-step
    estimate assumes, is the LR the first step really uses."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps + 1)  # the last step's LR is small, not 0
    return peak * (1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def default_init_samples(num_examples: int) -> int:
    """The paper's 0.1% of the training set (50 of MetaMathQA's 50K), at least 32 (GSM8K's 0.1% would be 7)."""
    return max(32, round(0.001 * num_examples))


def plan_training(args, num_examples: int, ddp_world_size: int) -> Plan:
    """The schedule of a run on `num_examples` examples: gradient accumulation, total and warmup steps, and what the
    LoRA-SB estimate takes from it.

    lr_1 = --lr / warmup_steps, the learning rate of the schedule's first optimizer step (learning_rate(1, ...); about
    --lr without warmup): the estimate models that first step of full fine-tuning, so its step size is the one the
    optimizer would take. (The
    authors' code divided by the warmup length of their small estimation loader instead, about 10x too small an lr_1.)
    --lr_1 replaces it, to reproduce theirs or to study the size of the initialization."""
    grad_accum = args.batch_size // (args.micro_batch_size * ddp_world_size)
    micro_batches = math.ceil(num_examples / args.micro_batch_size) // ddp_world_size  # per process, as data.Batches
    total_steps = min(args.epochs * (micro_batches // grad_accum), args.max_steps or math.inf)
    if total_steps < 1:
        refuse([f"{num_examples} examples make no full optimizer step of {args.batch_size}: lower --batch_size"])
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    lr_1 = args.lr_1 if args.lr_1 is not None else learning_rate(1, args.lr, warmup_steps, total_steps, args.schedule)
    num_init = None
    if args.method == "lorasb":
        num_init = args.num_init_samples or default_init_samples(num_examples)
        most = max_init_samples(num_examples, args.init_batch_size, ddp_world_size)
        if num_init > most:
            refuse([arguments.too_many_init_samples(args, num_init, most, num_examples, ddp_world_size)])
    log_every = args.log_every or min(10, max(1, total_steps // 20))
    return Plan(grad_accum, total_steps, warmup_steps, lr_1, num_init, log_every)


def max_init_samples(num_examples: int, batch_size: int, world_size: int) -> int:
    """The most examples the LoRA-SB estimate can take: process r reads its share (samples r, r + world_size, ...)
    from its own batches of one epoch, as data.Batches deals them: batches of batch_size (the last one short) dealt
    round-robin, the leftover batches dropped. The last process holds the short batch when none is dropped."""
    num_batches = math.ceil(num_examples / batch_size)
    capacity = num_batches // world_size * batch_size  # every process but maybe the last
    short = num_batches * batch_size - num_examples if num_batches % world_size == 0 else 0
    return min(world_size * capacity, world_size * (capacity - short) + world_size - 1)


# ----- Initializing the adapters: the one place where the method enters the run. --------------------------------------

def causal_lm_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction over the labelled (response) tokens of a batch, in fp32: their mean,
    or with reduction="sum" their sum."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def estimate_update_from_examples(model, examples: list[dict], pad_id: int, args, plan: Plan,
                                  setup: Setup) -> Iterator[dict[str, torch.Tensor]]:
    """dW = -lr_1 * sign(G) for every target weight, G summed over plan.num_init_samples training examples in an order
    of their own (seed + 1), in batches of --init_batch_size (the batching sets the weights of G's terms), split over
    the processes; yielded one group of target layers at a time, each group's fp32 sums within --init_group_gib
    (lorasb.estimate_by_group: one pass over the same batches per group, the same dW as one pass over all)."""
    local_samples = len(setup.my_share(plan.num_init_samples))
    init_batches = data.Batches(examples, args.init_batch_size, args.seed + 1, rank=setup.ddp_rank,
                                world_size=setup.ddp_world_size, pad_id=pad_id)
    # every pass reads the same batches: a list of them (iterating data.Batches moves it on)
    batches = list(itertools.islice(init_batches, math.ceil(local_samples / args.init_batch_size)))
    group_bytes = round(args.init_group_gib * 2**30)
    groups = lorasb.target_groups(lorasb.find_targets(model, args.targets), group_bytes)
    largest = max(sum(4 * math.prod(lorasb.layer_shape(m)) for m in group.values()) for group in groups)
    setup.log(f"estimating the first update from {plan.num_init_samples} examples (lr_1 = {plan.lr_1:.3g}, "
              f"rule {args.init_rule}): {len(groups)} pass(es) over them, {largest / 2**30:.2f} GiB of fp32 gradient "
              f"sums at most (--init_group_gib {args.init_group_gib:g})")
    if warning := arguments.lr_1_warning(args, plan.lr_1, plan.warmup_steps, plan.total_steps):
        setup.warn(warning)
    # A batch counts once its backward pass is done (when the next one comes, or the estimate returns), so the bar
    # reaches 100% when the estimate has, not one batch's forward and backward before.
    bar = tqdm(desc="estimating", total=local_samples * len(groups), unit="example",
               disable=not setup.master_process)
    previous = 0

    def loss_fn(m, batch):
        nonlocal previous
        bar.update(previous)
        previous = len(batch["input_ids"])
        with setup.autocast():
            return causal_lm_loss(m, to_device(batch, setup.device))

    estimate = lorasb.estimate_by_group(model, batches, loss_fn, local_samples, plan.lr_1, args.targets,
                                        rule=args.init_rule, group_bytes=group_bytes,
                                        accumulate_on="cpu" if args.init_accumulate_on == "cpu" else None)
    for i, group in enumerate(estimate):
        bar.update(previous)  # the pass is done: its last batch counts
        previous = 0
        if i == len(groups) - 1:
            bar.close()
        yield group


def initialize_adapters(model, examples: list[dict], pad_id: int, args, plan: Plan,
                        setup: Setup) -> lorasb.AdapterReport | None:
    """Turn the pretrained model into what --method trains, freezing everything else:

        lorasb  estimate dW (above), then B, R, A = U_r, S_r, V_r^T of its SVD: the model starts at W0 + [dW]_r
                (each group of layers turned into B, R, A before the next group is estimated)
        loraxs  B, A from the SVD of W0, R ~ N(0, 1e-5^2): the model starts at ~W0
        lora    B = 0, A Kaiming, scale alpha / r: the model starts at W0
        full    nothing to add: every weight trains
    """
    bar = partial(tqdm, desc="adding adapters", unit="layer", disable=not setup.master_process)
    if args.method == "lorasb":
        updates = estimate_update_from_examples(model, examples, pad_id, args, plan, setup)
        return lorasb.add_adapters(model, "lorasb", args.rank, args.targets, updates=updates,
                                   svd=args.init_svd, progress=bar)
    if args.method in ("loraxs", "lora"):
        return lorasb.add_adapters(model, args.method, args.rank, args.targets, lora_alpha=args.lora_alpha,
                                   seed=args.seed, svd=args.init_svd, progress=bar)
    return None


def parameter_counts(model, targets: tuple[str, ...]) -> dict[str, int]:
    """The sizes trainable parameter counts are compared with: the whole model (full fine-tuning) and LoRA r=32 on the
    targets. Count them before the adapters are added. An NF4 layer's weight (4-bit codes, a buffer) counts as its
    out x in weights."""
    lora32 = sum(32 * (m.out_features + m.in_features) for m in lorasb.find_targets(model, targets).values())
    quantized = sum(m.out_features * m.in_features for m in nf4.nf4_layers(model).values())
    return {"full": sum(p.numel() for p in model.parameters()) + quantized, "lora32": lora32}


def describe_trainable(model, reference_counts: dict[str, int], setup: Setup) -> int:
    """Print the trainable parameter count beside LoRA r=32's and full fine-tuning's; return it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora32, full = reference_counts["lora32"], reference_counts["full"]
    versus_lora = f"1/{lora32 / trainable:.1f} of" if trainable <= lora32 else f"{trainable / lora32:.1f}x"
    setup.log(f"trainable parameters: {trainable:,} = {versus_lora} LoRA r=32 ({lora32:,}) = "
              f"{100 * trainable / full:.4f}% of full fine-tuning ({full:,})")
    return trainable


# ----- Training: AdamW on whatever requires grad, gradient accumulation over micro-batches, the LR schedule above. ----

def make_optimizer(model, args, device: torch.device) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel (CUDA and CPU) updates every tensor in one pass instead of a loop of small ops
    return torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def train_step(run_model, optimizer, batches: data.Batches, step: int, args, plan: Plan, setup: Setup) -> dict:
    """Optimizer step `step` (1-based): set its LR, accumulate the gradients of plan.grad_accum micro-batches (DDP
    all-reduces them on the last one only), clip, AdamW. Returns the step's mean loss, LR, gradient norm and the
    number of tokens it saw on this process, as tensors or numbers that cost no device sync."""
    lr = learning_rate(step, args.lr, plan.warmup_steps, plan.total_steps, args.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = torch.zeros((), device=setup.device), 0
    for micro in range(plan.grad_accum):
        batch = batches.next_batch()
        tokens += int(batch["attention_mask"].sum())
        sync = micro == plan.grad_accum - 1
        with (run_model.no_sync() if setup.ddp and not sync else nullcontext()), setup.autocast():
            loss = causal_lm_loss(run_model, to_device(batch, setup.device)) / plan.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


def train(model, optimizer, batches: data.Batches, args, plan: Plan, setup: Setup, start_step: int = 0,
          after_step: Callable[[int, dict], None] | None = None) -> float:
    """Optimizer steps start_step + 1 .. plan.total_steps (train_step), each followed by after_step(step, result),
    where a caller records what it needs: the trainer's checkpointer logs, checkpoints and stops the run on a signal
    or a divergence (machinery/checkpointer.py); an experiment keeps the losses. Returns the seconds it took."""
    run_model = torch.compile(model) if args.compile else model
    if setup.ddp:
        run_model = distributed.wrap(run_model, setup.device)
    setup.log(f"training: {plan.total_steps} steps of {args.batch_size} examples ({plan.grad_accum} x "
              f"{args.micro_batch_size} x {setup.ddp_world_size}), lr {args.lr:g} (warmup {plan.warmup_steps}, "
              f"{args.schedule}), weight decay {args.weight_decay:g}")
    t0 = time.time()
    run_model.train()
    for step in range(start_step + 1, plan.total_steps + 1):
        result = train_step(run_model, optimizer, batches, step, args, plan, setup)
        if after_step:
            after_step(step, result)
    return time.time() - t0


def write_config(out: Path, args, plan: Plan, loaded: Loaded, num_trainable: int, setup: Setup) -> None:
    """config.json: every setting as resolved, the plan, the model's config."""
    run_folder.write_json(out / "config.json", {**vars(args), **vars(plan), "world_size": setup.ddp_world_size,
                                                "trainable_parameters": num_trainable,
                                                "model_config": vars(loaded.config), "torch": torch.__version__})


# ----- Save: the adapter and its PEFT export, or the fine-tuned model folder. -----------------------------------------

def save_trainable(model, path: Path, method: str, base_model: str) -> None:
    """The adapter (safetensors + metadata), or for full fine-tuning every weight under its Hugging Face name."""
    if method == "full":
        lorasb.save_safetensors(path, model.state_dict())
    else:
        lorasb.save_adapter(model, path, method, base_model)


def save_outputs(model, out: Path, args, folder: Path) -> None:
    """The adapter and its PEFT export, or for full fine-tuning a model folder that --model (and transformers) loads."""
    if args.method == "full":
        (out / "model").mkdir(exist_ok=True)
        save_trainable(model, out / "model" / "model.safetensors", args.method, args.model)
        for name in MODEL_FOLDER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / "model" / name)
    else:
        save_trainable(model, out / "adapter.safetensors", args.method, args.model)
        lorasb.export_peft(model, out / "peft_adapter", base_model=args.model)


# ----- Evaluation: the model as evaluated, the held-out loss, then each test set's greedy answers, scored. -----------

def load_adapter_to_evaluate(model, args, setup: Setup) -> dict:
    """With --eval_only: load --adapter if given; returns what the summary says was evaluated."""
    described = {"method": "base", "rank": None}
    if args.adapter:
        info = lorasb.load_adapter(model, args.adapter)
        described.update(method=info["method"], rank=info["rank"])
        setup.log(f"loaded {info['method']} adapter (rank {info['rank']}) from {args.adapter}")
        trained_on = info.get("base_model")
        if trained_on and canonical_model(trained_on) != canonical_model(args.model):
            setup.warn(f"{args.adapter} was trained on {trained_on}, not on --model {args.model}: unless they are the "
                       f"same model, the evaluation is of a mismatched adapter")
    return described


def prepare_evaluation(model, args, setup: Setup) -> None:
    """Put the model in the form it is evaluated in.

    --eval_merge exact (default): with fp32 weights the adapters are merged (W0 + B R A in fp32: the same function as
    unmerged, at the base model's cost); with bf16 weights they run unmerged, because W0 + B R A rounded to bf16
    (about 3 significant digits of W0) loses much of the small trained delta: three thin matmuls a layer instead.
    --eval_merge bf16 is the model the authors evaluated (PEFT's merge_and_unload, then vLLM, in bf16): the adapters
    merged, then every weight in bf16, so the trained delta is rounded together with W0. (Their merge also computed
    B R A in bf16; here it is computed in fp32 and the sum is rounded once.)
    On a 4-bit base (--quantize nf4) the adapters run unmerged: the model as trained, Q(W0) + B R A. Merging would
    requantize W0 + B R A to 4 bits, rounding most of the update away (lorasb refuses; so does --eval_merge bf16)."""
    model.eval()
    if nf4.nf4_layers(model):
        return
    if args.eval_merge == "bf16" or setup.weights_dtype == torch.float32:
        lorasb.merge_adapters(model)
    if args.eval_merge == "bf16":
        for p in model.parameters():  # not model.to(), which would round the fp32 RoPE frequencies too
            p.data = p.data.to(torch.bfloat16)


def held_out_loss(model, tokenizer: Tokenizer, pairs: list[tuple[str, str]], args, setup: Setup) -> float:
    """Mean next-token loss per response token of (prompt, response) pairs in the training format (teacher forcing),
    over all processes: a smoother measure than accuracy for comparing methods on the same budget."""
    with warnings.catch_warnings():  # the same rule as the training examples', said there
        warnings.simplefilter("ignore")
        examples, _ = data.tokenize_dataset(tokenizer, [pairs[i] for i in setup.my_share(len(pairs))],
                                            args.max_length)
    sums = torch.zeros(2, dtype=torch.float64, device=setup.device)  # (loss * tokens, tokens)
    for start in tqdm(range(0, len(examples), args.micro_batch_size), desc="held-out loss", unit="batch",
                      disable=not setup.master_process):
        batch = to_device(data.collate(examples[start:start + args.micro_batch_size], tokenizer.pad_id), setup.device)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        sums += torch.stack([causal_lm_loss(model, batch, reduction="sum").double(), tokens.double()])
    if setup.ddp:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def generate_answers(model, tokenizer: Tokenizer, questions: list[dict], eos_ids: set[int], args,
                     setup: Setup, eval_set: str = "gsm8k") -> list[dict]:
    """Greedy completions of this process's share of the questions of `eval_set` (EVAL_TASKS: its prompt and its
    budget of new tokens), cut at the authors' stop strings. Each row holds the question, its gold answer, the task's
    row_fields (MATH's subject and level) when the record has them, and the completion."""
    task, mine = EVAL_TASKS[eval_set], setup.my_share(len(questions))
    prompts = [tokenizer.encode(task.prompt(questions[i])) for i in mine]
    # Stop strings are matched on the generated text only (the prompt contains "Instruction:" and "Response:");
    # the last few tokens suffice to see a new one, so each check decodes a short tail.
    stop = lambda new: any(s in tokenizer.decode(new[-8:]) for s in data.STOP_STRINGS)  # noqa: E731
    # generate sorts the prompts by length into batches (less padding) and shows a progress bar, token by token
    outputs = model_lib.generate(model, prompts, getattr(args, task.max_new_tokens), eos_ids, tokenizer.pad_id,
                                 stop=stop, batch_size=args.eval_batch_size, progress=setup.master_process)
    return [{"index": i, "question": questions[i][task.question], "gold": task.gold(questions[i]),
             **{key: questions[i][key] for key in task.row_fields if key in questions[i]},
             "completion": data.cut_at_stop(tokenizer.decode(new, skip_special_tokens=True))[0]}
            for i, new in zip(mine, outputs)]


def evaluate(model, loaded: Loaded, args, setup: Setup) -> tuple[dict, dict[str, list[dict]]]:
    """The held-out loss (on held_out_sets' answers), and the scored answers of every problem of each --eval_data set
    (gathered from all processes, in order). Returns the metrics, {set: its metrics} with held_out_loss,
    held_out_loss_on and, with commonsense tasks, their mean accuracy commonsense_accuracy; and the scored rows of
    each set."""
    prepare_evaluation(model, args, setup)
    sets = held_out_sets(args.eval_data)
    pairs = [EVAL_TASKS[name].held_out_pair(r) for name in sets for r in loaded.test_sets[name]]
    metrics = {"held_out_loss_on": f"{len(pairs)} " + EVAL_TASKS[sets[0]].held_out_what.format(sets=", ".join(sets))}
    predictions = {}
    with torch.no_grad(), setup.autocast():
        metrics["held_out_loss"] = held_out_loss(model, loaded.tokenizer, pairs, args, setup)
        for name in args.eval_data:
            rows = generate_answers(model, loaded.tokenizer, loaded.test_sets[name], loaded.eos_ids, args, setup, name)
            if setup.ddp:
                rows = distributed.gather_rows(rows, setup.ddp_world_size)
            metrics[name], predictions[name] = EVAL_TASKS[name].score(rows)
    tasks = [name for name in args.eval_data if name in commonsense.TASKS]
    if tasks:
        metrics["commonsense_accuracy"] = sum(metrics[name]["accuracy"] for name in tasks) / len(tasks)
    return metrics, predictions


def report(model, loaded: Loaded, args, setup: Setup, out: Path, described: dict) -> dict:
    """Evaluate, then write each test set's scored answers (EVAL_TASKS: predictions.jsonl for GSM8K, ...) and
    summary.json and print the summary (process 0); returns the summary. `described` names what was evaluated
    (method, rank, trainable parameters, timings)."""
    metrics, predictions = evaluate(model, loaded, args, setup)
    summary = {**metrics, **described, "model": args.model, "quantize": args.quantize, "eval_merge": args.eval_merge,
               "peak_memory_bytes": reporting.peak_memory_bytes(setup.device)}
    if setup.master_process:
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in predictions.items():
            run_folder.write_jsonl(out / EVAL_TASKS[name].predictions, rows)
        run_folder.write_json(out / "summary.json", summary)
        tasks = [EVAL_TASKS[name] for name in args.eval_data]
        reporting.print_summary(summary, tasks, out, reporting.outputs_written(args, tasks))
    return summary


# ----- The run. -------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    setup = Setup.from_args(args)
    # one run per --out_dir, before it is touched; a signal stops the run saying what was kept and how to go on
    signals = StopOnSignal(RunCommand(__file__, argv, setup.ddp_world_size, args), setup.master_process)
    with run_folder.lock(args.out_dir, writer=setup.master_process), signals:
        summary = run(args, setup, signals)
    if setup.ddp:
        distributed.finish()
    return summary


def run(args, setup: Setup, signals: StopOnSignal) -> dict:
    """The phases of a run (or of an --eval_only evaluation), in an --out_dir that no other run writes."""
    setup.log(reporting.device_line(setup))
    loaded = load(args, setup)
    if args.eval_only:
        out = run_folder.prepare(args.out_dir, args.overwrite, OUTPUTS, writer=setup.master_process)
        model = load_base_model(loaded.folder, setup, args.quantize)
        described = load_adapter_to_evaluate(model, args, setup)
    else:
        # the data, the schedule and the checkpoint to resume from are checked before anything is deleted or loaded
        examples = training_examples(loaded, args, setup)
        plan = plan_training(args, len(examples), setup.ddp_world_size)
        checkpointer = Checkpointer(args, setup, run_identity(args, setup.ddp_world_size, setup.compute_dtype,
                                                              training_data_files(args), loaded.folder))
        out = run_folder.prepare(args.out_dir, args.overwrite, OUTPUTS, writer=setup.master_process)
        model = load_base_model(loaded.folder, setup, args.quantize)
        reference_counts = parameter_counts(model, args.targets)
        t0 = time.time()
        if not checkpointer.restore(model):
            setup.log(initialize_adapters(model, examples, loaded.tokenizer.pad_id, args, plan, setup)
                      or "full fine-tuning")
            checkpointer.start(out, model)
        init_seconds = time.time() - t0
        num_trainable = describe_trainable(model, reference_counts, setup)

        batches = data.Batches(examples, args.micro_batch_size, args.seed, rank=setup.ddp_rank,
                               world_size=setup.ddp_world_size, pad_id=loaded.tokenizer.pad_id)
        optimizer = make_optimizer(model, args, setup.device)
        start_step = checkpointer.restore_position(optimizer, batches)
        if setup.master_process:
            with command.stop_if_a_write_fails(out, resumable=start_step > 0, what="config.json or metrics.jsonl"):
                write_config(out, args, plan, loaded, num_trainable, setup)
                run_folder.cut_metrics(out / "metrics.jsonl", start_step)
        # a signal: the step in progress ends with a checkpoint, then the run stops
        with checkpointer.training(out, model, optimizer, batches, plan.total_steps, plan.log_every,
                                   signals) as after_step:
            train(model, optimizer, batches, args, plan, setup, start_step, after_step)
        if setup.master_process:
            with command.stop_if_a_write_fails(out, resumable=True):
                save_outputs(model, out, args, loaded.folder)
        described = {"method": args.method, "rank": args.rank, "trainable_parameters": num_trainable,
                     "init_seconds": init_seconds, **checkpointer.timings()}

    with command.stop_if_a_write_fails(out, resumable=not args.eval_only):
        return report(model, loaded, args, setup, out, described)


if __name__ == "__main__":
    command.run(main)
