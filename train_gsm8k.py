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
    train                   AdamW on what trains, gradient accumulation, checkpoints every --save_every steps
    save_outputs            the adapter and its PEFT export (or the fine-tuned model folder)
    report                  evaluate (held-out loss, greedy answers to GSM8K and MATH scored by the authors' rules),
                            write summary.json
What a real run needs beyond that (checkpoints and resume, the out_dir, torchrun, downloads) is in machinery/.
"""

import argparse
import dataclasses
import math
import os
import resource
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import lorasb
import model as model_lib
from machinery import checkpoints, command, datasets, distributed, hub, run_folder
from machinery.distributed import refuse
from machinery.math_grader import score_math
from machinery.tokenizer import Tokenizer

METHODS = (*lorasb.METHODS, "full")  # the adapters of lorasb.py, and full fine-tuning
EVAL_SETS = {"gsm8k": "predictions.jsonl", "math": "predictions_math.jsonl",  # test set -> file of its scored answers
             **{task: f"predictions_{task}.jsonl" for task in data.COMMONSENSE_TASKS}}
# Everything a run writes in --out_dir: --overwrite deletes these (and nothing else), the summary lists them.
OUTPUTS = ("config.json", "metrics.jsonl", run_folder.CHECKPOINTS, "adapter.safetensors", "peft_adapter", "model",
           *EVAL_SETS.values(), "summary.json")
DEFAULT_RANK = {"lorasb": 96, "loraxs": 96, "lora": 32}  # the paper's Table 1 ranks
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")  # copied beside the weights of a fully fine-tuned model


# ---------------------------------------------------------------------------------------------------------------------
# Arguments: parsed once (defaults that depend on other arguments are resolved here), then never rewritten.
# ---------------------------------------------------------------------------------------------------------------------

def argument_type(convert, ok, what: str):
    """An argparse type: the text converted, refused unless ok(value) ("must be `what`")."""
    def parse(text: str):
        if not ok(value := convert(text)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return parse


POSITIVE_INT = argument_type(int, lambda v: v >= 1, "positive")
POSITIVE = argument_type(float, lambda v: 0 < v < math.inf, "a positive finite number")
NON_NEGATIVE = argument_type(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
FINITE = argument_type(float, math.isfinite, "a finite number")
FRACTION = argument_type(float, lambda v: 0 <= v < 1, "at least 0 and below 1")


def comma_separated(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def eval_set_names(text: str) -> tuple[str, ...]:
    """Test set names, "commonsense" standing for the eight commonsense tasks."""
    names = tuple(dict.fromkeys(n for name in comma_separated(text)
                                for n in (data.COMMONSENSE_TASKS if name == "commonsense" else (name,))))
    if not names or not set(names) <= EVAL_SETS.keys():
        raise argparse.ArgumentTypeError(f"{text!r}: choose test sets among {', '.join(EVAL_SETS)} (commonsense: the "
                                         f"last eight), comma-separated")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-0.5B", help="hub name or local folder (config.json, safetensors, tokenizer)")
    a("--method", default="lorasb", choices=METHODS)
    a("--rank", type=int, help="adapter rank (default: 96 for lorasb/loraxs, 32 for lora)")
    a("--lora_alpha", type=FINITE, help="LoRA only: scale = alpha / rank (default: 2 * rank)")
    a("--targets", type=comma_separated, default=",".join(lorasb.DEFAULT_TARGETS), help="module-name suffixes to adapt")
    a("--train_data", default="gsm8k", choices=("gsm8k", "metamathqa", "commonsense"))
    a("--num_train", type=POSITIVE_INT, help="use the first N training examples (metamathqa default: 50000)")
    a("--data_dir", help="folder with GSM8K train.jsonl and test.jsonl (default: download and cache)")
    a("--metamathqa_path", help="local MetaMathQA .json/.jsonl (default: download from the hub)")
    a("--commonsense_dir", help="commonsense data in the authors' layout: <task>/test.json, and commonsense_170k.json "
      "or <task>/train.json to train on (default: download LLM-Adapters' files)")
    a("--commonsense_prompt", default="alpaca", choices=("alpaca", "authors"), help="commonsense training prompt: "
      "alpaca (the evaluation's) or authors (theirs: 12 spaces open each line after the first)")
    a("--epochs", type=POSITIVE_INT, default=3, help="passes over the training set")
    a("--max_steps", type=POSITIVE_INT, help="stop the schedule after this many optimizer steps")
    a("--lr", type=POSITIVE, default=1e-4, help="peak learning rate (the paper's arithmetic setting)")
    a("--warmup_ratio", type=FRACTION, default=0.02, help="linear warmup over this fraction of the steps")
    a("--schedule", default="cosine", choices=("cosine", "linear"), help="decay after the warmup")
    a("--weight_decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay (the authors' 0.01 was an accident)")
    a("--grad_clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm to this (0 disables)")
    a("--batch_size", type=POSITIVE_INT, default=32, help="examples per optimizer step, over all GPUs")
    a("--micro_batch_size", type=POSITIVE_INT, default=4, help="examples per forward pass on one GPU")
    a("--max_length", type=POSITIVE_INT, default=512, help="truncate training examples to this many tokens")
    a("--num_init_samples", type=POSITIVE_INT, help="examples of the estimate (default: 0.1%% of the data, >= 32)")
    a("--init_rule", default="adamw", choices=("adamw", "sgd"), help="dW = -lr_1 * sign G (adamw) or -lr_1 * G")
    a("--init_svd", default="exact", choices=lorasb.SVDS, help="SVD of the initialization; "
      "authors: theirs, svd_lowrank with q = rank, 10 power iterations, seed 42 (lorasb only)")
    a("--init_batch_size", type=POSITIVE_INT, help="examples per batch of the estimate (default: --micro_batch_size)")
    a("--lr_1", type=POSITIVE, help="the step size of the first-update estimate, which sets the size of R at init "
      "(default: the LR of the first optimizer step; the authors' run used 1e-4 / 333.34 = 2.99994e-7)")
    a("--init_accumulate_on", default="device", choices=("device", "cpu"), help="where the fp32 gradient sums live")
    a("--eval_data", type=eval_set_names, default="gsm8k", help="test sets to answer: gsm8k (1319), math (5000), "
      "the commonsense tasks boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa, "
      "or commonsense for all eight")
    a("--math_path", help="local MetaMath MATH_test.jsonl (default: download from MetaMath's repository)")
    a("--eval_limit", type=POSITIVE_INT, help="evaluate on the first N problems of each test set (default: all)")
    a("--eval_batch_size", type=POSITIVE_INT, default=64, help="prompts per generation batch")
    a("--max_new_tokens", type=POSITIVE_INT, default=256, help="generation budget per GSM8K question (theirs)")
    a("--math_max_new_tokens", type=POSITIVE_INT, default=512, help="generation budget per MATH problem (theirs)")
    a("--commonsense_max_new_tokens", type=POSITIVE_INT, default=32, help="per commonsense question (theirs)")
    a("--eval_merge", default="exact", choices=("exact", "bf16"), help="exact (the adapter as trained: merged in "
      "fp32, unmerged with bf16 weights) or bf16 (the authors': merged, then every weight in bf16)")
    a("--eval_only", action="store_true", help="skip training; evaluate --model (with --adapter if given)")
    a("--adapter", help="with --eval_only: an adapter.safetensors saved by this script")
    a("--out_dir", help="where outputs go (default: runs/gsm8k-<method>-r<rank>, runs/gsm8k-eval)")
    one_of = p.add_mutually_exclusive_group().add_argument
    one_of("--overwrite", action="store_true", help="start over in an existing out_dir (deleting its checkpoints)")
    one_of("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    a("--save_every", type=POSITIVE_INT, default=200, help="checkpoint every N optimizer steps (and at the end)")
    a("--log_every", type=POSITIVE_INT, default=10, help="print and log metrics every N optimizer steps")
    a("--seed", type=int, default=42)
    a("--device", help="cuda, cpu, ... (default: cuda when available)")
    a("--dtype", choices=("bfloat16", "float32"), help="model weights (default: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    if args.rank is None and args.method in DEFAULT_RANK:
        args.rank = DEFAULT_RANK[args.method]
    if args.lora_alpha is None and args.method == "lora":
        args.lora_alpha = 2.0 * args.rank
    if args.out_dir is None:
        run = "eval" if args.eval_only else args.method + (f"-r{args.rank}" if args.rank else "")
        args.out_dir = os.path.join("runs", f"gsm8k-{run}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.init_batch_size is None:
        args.init_batch_size = args.micro_batch_size
    return args


def check_args(args, ddp_world_size: int) -> list[str]:
    """Every problem argparse cannot see in one argument alone (combinations, files, the number of processes, the
    out_dir), listed at once."""
    problems = []
    if args.rank is not None and args.rank < 1:  # here, not in argparse, to be listed with the other problems
        problems.append(f"--rank {args.rank}: the rank must be at least 1")
    if args.init_svd == "authors" and args.method != "lorasb":
        problems.append(f"--init_svd authors is LoRA-SB's initialization; --method {args.method} does not use it")
    if args.batch_size % (args.micro_batch_size * ddp_world_size):
        problems.append(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                        f"{args.micro_batch_size} x {ddp_world_size} GPU(s): gradient accumulation needs a whole "
                        "number")
    if args.num_init_samples is not None and args.num_init_samples < ddp_world_size:
        problems.append(f"--num_init_samples {args.num_init_samples} is fewer than the {ddp_world_size} processes: "
                        "every process needs at least one example for the estimate")
    if args.adapter and not args.eval_only:
        problems.append("--adapter is for --eval_only (training writes its own adapter)")
    if args.adapter and args.method == "full":
        problems.append("--adapter with --method full: pass the fine-tuned model folder as --model instead")
    # exists, not is_file: the loaders refuse a FIFO or a folder in place of a file, saying what it is
    if args.data_dir and not all((Path(args.data_dir) / f"{s}.jsonl").exists() for s in ("train", "test")):
        problems.append(f"--data_dir {args.data_dir}: needs train.jsonl and test.jsonl (GSM8K)")
    problems += [f"--{name} {getattr(args, name)}: no such file" for name in ("adapter", "metamathqa_path", "math_path")
                 if getattr(args, name) and not Path(getattr(args, name)).exists()]
    if args.commonsense_dir and not Path(args.commonsense_dir).is_dir():
        problems.append(f"--commonsense_dir {args.commonsense_dir}: no such folder")
    elif args.train_data == "commonsense" and not args.eval_only and args.commonsense_dir and \
            not datasets.commonsense_train_files(args.commonsense_dir):
        problems.append(f"--commonsense_dir {args.commonsense_dir}: holds neither commonsense_170k.json nor a "
                        "<task>/train.json to train on")
    return problems + run_folder.check(args)


def check_model(args, config: model_lib.ModelConfig) -> list[str]:
    """Problems that need the model's shapes (read from config.json alone, before any weight is loaded)."""
    if args.method == "full" or args.eval_only:
        return []
    try:
        targets = lorasb.find_targets(model_lib.build_model(config), args.targets)
    except ValueError as e:
        return [f"--targets: {e}"]
    return [f"--{problem}" for problem in lorasb.rank_problems(targets, args.rank)][:3]


# ---------------------------------------------------------------------------------------------------------------------
# Setup: one process, or one of torchrun's (ddp_rank of ddp_world_size); device, dtypes, seed.
# ---------------------------------------------------------------------------------------------------------------------

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
        problems = check_args(args, ddp_world_size)
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
        if self.master_process:
            warnings.warn(message, stacklevel=2)

    def my_share(self, n: int) -> list[int]:
        """The indices of n items that this process handles: every ddp_world_size-th one from ddp_rank."""
        return list(range(self.ddp_rank, n, self.ddp_world_size))


def device_line(setup: Setup) -> str:
    """The run's first line: where it computes and in which dtype (a CPU run is many times slower: said at once)."""
    if setup.device.type == "cuda":
        where = f"{setup.device} ({torch.cuda.get_device_name(setup.device)})"
    elif setup.device.type == "cpu":
        found = "a GPU is there, --device cpu asks for the CPU" if torch.cuda.is_available() else "no GPU found"
        where = f"cpu ({found}; {torch.get_num_threads()} threads)"
    else:
        where = str(setup.device)
    dtype = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    computing = f", computing in {dtype(setup.compute_dtype)}" if setup.compute_dtype != setup.weights_dtype else ""
    return f"device {where}, weights {dtype(setup.weights_dtype)}{computing}"


# ---------------------------------------------------------------------------------------------------------------------
# Load: the model folder, the tokenizer and the data (downloaded into the cache when not given as local files).
# ---------------------------------------------------------------------------------------------------------------------

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
        return [(data.TRAIN_PROMPT.format(instruction=r["question"]), data.gsm8k_response(r["answer"])) for r in rows]
    if args.train_data == "commonsense":
        indent = data.AUTHORS_INDENT if args.commonsense_prompt == "authors" else ""
        files = datasets.commonsense_train_files(args.commonsense_dir)
        rows = [r for path in files for r in data.load_commonsense(path)]
        return [(data.commonsense_prompt(r, indent), r["output"]) for r in rows[:args.num_train]]
    rows = data.load_metamathqa(args.num_train or 50_000, datasets.metamathqa_file(args.metamathqa_path))
    return [(data.TRAIN_PROMPT.format(instruction=r["query"]), r["response"]) for r in rows]


@dataclass
class Loaded:
    """What the run reads before the weights: the model folder and config, the tokenizer, and the data."""
    folder: Path
    config: model_lib.ModelConfig
    tokenizer: Tokenizer
    questions: list[dict]  # the GSM8K test questions, unless only commonsense tasks are evaluated
    pairs: list[tuple[str, str]] | None  # the (prompt, response) training pairs; None with --eval_only
    math_problems: list[dict] | None = None  # the MATH test problems, with --eval_data math
    commonsense: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # --eval_data commonsense tasks

    @property
    def eos_ids(self) -> set[int]:
        """Generation stops at any of these: the tokenizer's EOS and the config's (often a longer list)."""
        return {self.tokenizer.eos_id, *self.config.eos_token_ids} - {None}


def load(args, setup: Setup) -> Loaded:
    """Resolve the model folder (local, HF cache or download) and the data, read config.json, check that the weights
    fit it and what depends on the model's shapes, then load the tokenizer. Under torchrun process 0 downloads first;
    the others then find the files in the cache."""
    if setup.ddp and not setup.master_process:
        dist.barrier()
    folder = hub.resolve_model(args.model)
    commonsense = {task: data.load_commonsense(datasets.commonsense_test_file(task, args.commonsense_dir),
                                               task)[:args.eval_limit]
                   for task in args.eval_data if task in data.COMMONSENSE_TASKS}
    questions = ([] if len(commonsense) == len(args.eval_data)
                 else data.load_gsm8k("test", datasets.gsm8k_dir(args.data_dir))[:args.eval_limit])
    pairs = None if args.eval_only else training_pairs(args)
    math_problems = None
    if "math" in args.eval_data:
        math_problems = data.load_math(datasets.math_file(args.math_path))[:args.eval_limit]
    if setup.ddp and setup.master_process:
        dist.barrier()
    config = model_lib.load_config(folder)
    model_lib.check_checkpoint(folder, config)  # the weights fit config.json, before check_model builds its skeleton
    problems = check_model(args, config)
    if not questions and not commonsense:
        test_file = datasets.gsm8k_dir(args.data_dir) / "test.jsonl"
        problems.append(f"{test_file} holds no test question: evaluation needs one")
    if pairs == []:  # else training_examples would blame --max_length for leaving no response token
        problems.append(f"no training example in {', '.join(map(str, training_data_files(args)))}: training needs one")
    problems += [f"{datasets.commonsense_test_file(task, args.commonsense_dir)} holds no test question: evaluation "
                 "needs one" for task, records in commonsense.items() if not records]
    if problems:
        refuse(problems)
    return Loaded(folder, config, Tokenizer.from_dir(folder), questions, pairs, math_problems, commonsense)


def training_examples(loaded: Loaded, args, setup: Setup) -> list[dict]:
    """The training pairs tokenized (data.tokenize_dataset), less those that --max_length leaves without a response
    token: they would train nothing, and a micro-batch of only such examples has a loss of 0/0 = NaN."""
    examples, num_truncated = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
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


# ---------------------------------------------------------------------------------------------------------------------
# The schedule: the number of steps, the LR of each, and what the LoRA-SB initialization derives from it.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the arguments and the data imply for training (recorded in config.json)."""
    grad_accum: int  # micro-batches per optimizer step on each process
    total_steps: int
    warmup_steps: int
    lr_1: float  # the step size of LoRA-SB's first-update estimate: the LR of the first optimizer step, or --lr_1
    num_init_samples: int | None  # examples of the LoRA-SB estimate (None for the other methods)


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
            refuse([f"{'--num_init_samples' if args.num_init_samples else 'the default number of init samples'} "
                    f"{num_init}: the first-update estimate can use at most {most} of the {num_examples} training "
                    f"examples ({ddp_world_size} process(es), batches of --init_batch_size {args.init_batch_size}); "
                    f"pass --num_init_samples {most} or fewer"])
    return Plan(grad_accum, total_steps, warmup_steps, lr_1, num_init)


def max_init_samples(num_examples: int, batch_size: int, world_size: int) -> int:
    """The most examples the LoRA-SB estimate can take: process r reads its share (samples r, r + world_size, ...)
    from its own batches of one epoch, as data.Batches deals them: batches of batch_size (the last one short) dealt
    round-robin, the leftover batches dropped. The last process holds the short batch when none is dropped."""
    num_batches = math.ceil(num_examples / batch_size)
    capacity = num_batches // world_size * batch_size  # every process but maybe the last
    short = num_batches * batch_size - num_examples if num_batches % world_size == 0 else 0
    return min(world_size * capacity, world_size * (capacity - short) + world_size - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Initializing the adapters: the one place where the method enters the run.
# ---------------------------------------------------------------------------------------------------------------------

def causal_lm_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction over the labelled (response) tokens of a batch, in fp32: their mean,
    or with reduction="sum" their sum."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def estimate_update_from_examples(model, examples: list[dict], pad_id: int, args, plan: Plan,
                                  setup: Setup) -> dict[str, torch.Tensor]:
    """dW = -lr_1 * sign(G) for every target weight, G summed over plan.num_init_samples training examples in an order
    of their own (seed + 1), in batches of --init_batch_size (the batching sets the weights of G's terms), split over
    the processes; see lorasb.estimate_first_update."""
    local_samples = len(setup.my_share(plan.num_init_samples))
    init_batches = data.Batches(examples, args.init_batch_size, args.seed + 1, rank=setup.ddp_rank,
                                world_size=setup.ddp_world_size, pad_id=pad_id)
    setup.log(f"estimating the first update from {plan.num_init_samples} examples (lr_1 = {plan.lr_1:.3g}, "
              f"rule {args.init_rule})")
    if args.lr_1 is None and plan.warmup_steps <= 1:
        setup.warn(f"lr_1 = {plan.lr_1:.3g} is the peak learning rate: a schedule of {plan.total_steps} steps has "
                   f"{plan.warmup_steps} warmup step(s), so LoRA-SB starts from a full fine-tuning step of the "
                   f"adapter's peak learning rate on every weight (truncated to rank {args.rank}), a large jump that "
                   f"can hurt (README: 'lr_1 sets the size of the initialization'). More steps or a larger "
                   f"--warmup_ratio make lr_1 = --lr / warmup_steps a full fine-tuning step of sensible size.")
    # A batch counts once its backward pass is done (when the next one comes, or the estimate returns), so the bar
    # reaches 100% when the estimate has, not one batch's forward and backward before.
    bar = tqdm(desc="estimating", total=local_samples, unit="example", disable=not setup.master_process)
    previous = 0

    def loss_fn(m, batch):
        nonlocal previous
        bar.update(previous)
        previous = len(batch["input_ids"])
        with setup.autocast():
            return causal_lm_loss(m, to_device(batch, setup.device))

    updates = lorasb.estimate_first_update(model, init_batches, loss_fn, local_samples, plan.lr_1, args.targets,
                                           rule=args.init_rule,
                                           accumulate_on="cpu" if args.init_accumulate_on == "cpu" else None)
    bar.update(previous)
    bar.close()
    return updates


def initialize_adapters(model, examples: list[dict], pad_id: int, args, plan: Plan,
                        setup: Setup) -> lorasb.AdapterReport | None:
    """Turn the pretrained model into what --method trains, freezing everything else:

        lorasb  estimate dW (above), then B, R, A = U_r, S_r, V_r^T of its SVD: the model starts at W0 + [dW]_r
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
    targets. Count them before the adapters are added."""
    lora32 = sum(32 * (m.out_features + m.in_features) for m in lorasb.find_targets(model, targets).values())
    return {"full": sum(p.numel() for p in model.parameters()), "lora32": lora32}


def describe_trainable(model, reference_counts: dict[str, int], setup: Setup) -> int:
    """Print the trainable parameter count beside LoRA r=32's and full fine-tuning's; return it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora32, full = reference_counts["lora32"], reference_counts["full"]
    versus_lora = f"1/{lora32 / trainable:.1f} of" if trainable <= lora32 else f"{trainable / lora32:.1f}x"
    setup.log(f"trainable parameters: {trainable:,} = {versus_lora} LoRA r=32 ({lora32:,}) = "
              f"{100 * trainable / full:.4f}% of full fine-tuning ({full:,})")
    return trainable


# ---------------------------------------------------------------------------------------------------------------------
# Training: AdamW on whatever requires grad, gradient accumulation over micro-batches, the LR schedule above.
# ---------------------------------------------------------------------------------------------------------------------

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


def train(model, optimizer, batches: data.Batches, start_step: int, args, plan: Plan, setup: Setup, out: Path,
          stop: checkpoints.StopOnSignal) -> float:
    """Steps start_step + 1 .. plan.total_steps: log every --log_every steps to metrics.jsonl and the progress bar,
    checkpoint every --save_every steps, at the end, and at the step a signal stops the run (`stop`). Returns the
    seconds it took."""
    run_model = torch.compile(model) if args.compile else model
    if setup.ddp:
        run_model = distributed.wrap(run_model, setup.device)
    setup.log(f"training: {plan.total_steps} steps of {args.batch_size} examples ({plan.grad_accum} x "
              f"{args.micro_batch_size} x {setup.ddp_world_size}), lr {args.lr:g} (warmup {plan.warmup_steps}, "
              f"{args.schedule}), weight decay {args.weight_decay:g}")
    t0 = last_log = time.time()
    tokens = 0
    diverged_at = torch.zeros((), dtype=torch.long, device=setup.device)  # first step with a NaN/inf loss or grad norm
    run_model.train()
    bar = tqdm(range(start_step + 1, plan.total_steps + 1), initial=start_step, total=plan.total_steps,
               desc="training", disable=not setup.master_process)
    for step in bar:
        result = train_step(run_model, optimizer, batches, step, args, plan, setup)
        finite = torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])
        diverged_at.masked_fill_((diverged_at == 0) & ~finite, step)  # on the device: no sync per step
        tokens += result["tokens"] * setup.ddp_world_size
        stopping = stop.requested()
        saving = stopping or step % args.save_every == 0 or step == plan.total_steps
        if saving or step % args.log_every == 0:
            stop_if_diverged(diverged_at, optimizer if saving else None, step, args, setup, out)
        if step % args.log_every == 0 or step == plan.total_steps:
            loss = result["loss"]
            if setup.ddp:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            now = time.time()
            row = {"step": step, "loss": loss.item(), "lr": result["lr"], "grad_norm": result["grad_norm"].item(),
                   "tokens_per_s": tokens / (now - last_log), "elapsed_s": now - t0}
            tokens, last_log = 0, now
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if setup.master_process:
                run_folder.append_jsonl(out / "metrics.jsonl", row)
        if saving:
            if setup.master_process:
                checkpoints.save(out, step, model, optimizer, batches, setup.device)
            if setup.ddp:
                dist.barrier()
        if stopping:
            bar.close()  # before the message that ends the output
            stop.stop(step, out / run_folder.CHECKPOINTS, setup.master_process)
    if stop.requested():  # the signal came during the last checkpoint, which is written
        stop.stop(plan.total_steps, out / run_folder.CHECKPOINTS, setup.master_process)
    return time.time() - t0


def stop_if_diverged(diverged_at: torch.Tensor, optimizer, step: int, args, setup: Setup, out: Path) -> None:
    """Stop the run with a clear message, before anything more is saved, once a step's loss or gradient norm was NaN or
    inf (the weights that train then are, or soon will be), or, given the optimizer (before a save), when a weight it
    trains is. The checkpoints already written stay as they are."""
    if setup.ddp:
        dist.all_reduce(diverged_at, op=dist.ReduceOp.MAX)
    first = int(diverged_at.item())
    if not first and optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        first = 0 if torch.stack([torch.isfinite(p).all() for p in params]).all() else step
    if first:  # every process stops; process 0 says why
        sys.exit(f"Stopped at step {step}: training diverged (the loss, the gradient norm or the weights became NaN or "
                 f"inf at step {first}). Nothing from step {first} on was saved; the checkpoints in "
                 f"{out / run_folder.CHECKPOINTS} are as they were. Start over with a lower --lr (this run: "
                 f"{args.lr:g}) and --overwrite." if setup.master_process else 1)


def write_config(out: Path, args, plan: Plan, loaded: Loaded, num_trainable: int, setup: Setup) -> None:
    """config.json: every setting as resolved, the plan, the model's config."""
    run_folder.write_json(out / "config.json", {**vars(args), **vars(plan), "world_size": setup.ddp_world_size,
                                                "trainable_parameters": num_trainable,
                                                "model_config": vars(loaded.config), "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------------------------------
# Save: the adapter and its PEFT export, or the fine-tuned model folder.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: the model as evaluated (--eval_merge), the held-out loss, then on each test set batched greedy decoding
# with a KV cache, the authors' prompt, stop strings and scoring.
# ---------------------------------------------------------------------------------------------------------------------

def load_adapter_to_evaluate(model, args, setup: Setup) -> dict:
    """With --eval_only: load --adapter if given; returns what the summary says was evaluated."""
    described = {"method": "base", "rank": None}
    if args.adapter:
        info = lorasb.load_adapter(model, args.adapter)
        described.update(method=info["method"], rank=info["rank"])
        setup.log(f"loaded {info['method']} adapter (rank {info['rank']}) from {args.adapter}")
        trained_on = info.get("base_model")
        if trained_on and checkpoints.canonical_model(trained_on) != checkpoints.canonical_model(args.model):
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
    B R A in bf16; here it is computed in fp32 and the sum is rounded once.)"""
    model.eval()
    if args.eval_merge == "bf16" or setup.weights_dtype == torch.float32:
        lorasb.merge_adapters(model)
    if args.eval_merge == "bf16":
        for p in model.parameters():  # not model.to(), which would round the fp32 RoPE frequencies too
            p.data = p.data.to(torch.bfloat16)


def held_out_loss(model, tokenizer: Tokenizer, questions: list[dict], args, setup: Setup) -> float:
    """Mean next-token loss per response token of the GSM8K reference solutions, in the training format (teacher
    forcing): a smoother measure than accuracy for comparing methods on the same budget."""
    pairs = [(data.TRAIN_PROMPT.format(instruction=q["question"]), data.gsm8k_response(q["answer"])) for q in questions]
    return response_loss(model, tokenizer, pairs, args, setup)


def response_loss(model, tokenizer: Tokenizer, pairs: list[tuple[str, str]], args, setup: Setup) -> float:
    """Mean next-token loss per response token of (prompt, response) pairs, over all processes."""
    examples, _ = data.tokenize_dataset(tokenizer, [pairs[i] for i in setup.my_share(len(pairs))], args.max_length)
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
    """Greedy completions of this process's share of the questions of `eval_set`, cut at the authors' stop strings,
    after at most --max_new_tokens (GSM8K), --math_max_new_tokens (MATH) or --commonsense_max_new_tokens new tokens.
    Each row holds the question, its gold answer (GSM8K: the number after "#### "; MATH: the reference's \\boxed{}
    answer; a commonsense task: the record's answer), MATH's subject and level when the file has them, and the
    completion."""
    mine = setup.my_share(len(questions))
    commonsense = eval_set in data.COMMONSENSE_TASKS
    prompts = [tokenizer.encode(data.commonsense_prompt(questions[i]) if commonsense
                                else data.eval_prompt(questions[i]["question"])) for i in mine]
    max_new_tokens = {"gsm8k": args.max_new_tokens, "math": args.math_max_new_tokens}.get(
        eval_set, args.commonsense_max_new_tokens)
    # Stop strings are matched on the generated text only (the prompt contains "Instruction:" and "Response:");
    # the last few tokens suffice to see a new one, so each check decodes a short tail.
    stop = lambda new: any(s in tokenizer.decode(new[-8:]) for s in data.STOP_STRINGS)  # noqa: E731
    # generate sorts the prompts by length into batches (less padding) and shows a progress bar, token by token
    outputs = model_lib.generate(model, prompts, max_new_tokens, eos_ids, tokenizer.pad_id, stop=stop,
                                 batch_size=args.eval_batch_size, progress=setup.master_process)
    rows = []
    for i, new in zip(mine, outputs):
        question = questions[i]
        gold = data.gold_answer(question["answer"]) if eval_set == "gsm8k" else question["answer"]
        rows.append({"index": i, "question": question["instruction" if commonsense else "question"], "gold": gold,
                     **{key: question[key] for key in ("subject", "level") if key in question},
                     "completion": data.cut_at_stop(tokenizer.decode(new, skip_special_tokens=True))[0]})
    return rows


# The per-answer lists of a scorer's result (data.score_gsm8k, data.score_commonsense, math_grader.score_math) -> the
# fields of each prediction row.
PER_ANSWER = {"extracted": "extracted", "is_correct": "correct",
              "is_correct_authors_fallback": "correct_authors_fallback"}


def score_rows(score: Callable[[list, list], dict], rows: list[dict]) -> tuple[dict, list[dict]]:
    """Score the rows' completions against their gold answers with `score`: its metrics (accuracy, correct, invalid,
    total, ...), and the rows with each answer's extracted value and verdict(s)."""
    scored = score([r["completion"] for r in rows], [r["gold"] for r in rows])
    per_answer = {PER_ANSWER[key]: scored.pop(key) for key in PER_ANSWER if key in scored}
    return scored, [{**r, **{name: values[i] for name, values in per_answer.items()}} for i, r in enumerate(rows)]


def score_math_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """MATH's score_rows, scored correctly with what the authors' is_equiv fallback gives beside it (the figure
    comparable with their published MATH numbers), and the accuracy by subject and by level when the file has them."""
    metrics, rows = score_rows(score_math, rows)
    for field in ("subject", "level"):
        if all(field in r for r in rows):
            verdicts = {}
            for r in rows:
                verdicts.setdefault(r[field], []).append(r["correct"])
            metrics[f"by_{field}"] = {value: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)}
                                      for value, v in sorted(verdicts.items())}
    return metrics, rows


def commonsense_test_pairs(commonsense: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The evaluated commonsense test records as (prompt, answer text) pairs, for the held-out loss."""
    return [(data.commonsense_prompt(r), r["output"]) for records in commonsense.values() for r in records]


def evaluate(model, loaded: Loaded, args, setup: Setup) -> tuple[dict, dict[str, list[dict]]]:
    """The held-out loss, and the scored answers of every problem of each --eval_data set (gathered from all
    processes, in order). The held-out loss is on GSM8K's test solutions, or, when only commonsense tasks are
    evaluated, on their test answers ("the correct answer is ...", the same --eval_limit records). Returns the metrics,
    GSM8K's at the top level, MATH's and each commonsense task's under its name with the tasks' mean accuracy as
    commonsense_accuracy, and the scored rows of each set."""
    prepare_evaluation(model, args, setup)
    problems = {"gsm8k": loaded.questions, "math": loaded.math_problems, **loaded.commonsense}
    score = {"gsm8k": partial(score_rows, data.score_gsm8k), "math": score_math_rows,
             **{task: partial(score_rows, partial(data.score_commonsense, task)) for task in loaded.commonsense}}
    metrics, predictions = {}, {}
    with torch.no_grad(), setup.autocast():
        if loaded.questions:
            test_loss_on = f"{len(loaded.questions)} GSM8K test solutions"
            test_loss = held_out_loss(model, loaded.tokenizer, loaded.questions, args, setup)
        else:
            pairs = commonsense_test_pairs(loaded.commonsense)
            test_loss_on = f"{len(pairs)} commonsense test answers of " + ", ".join(loaded.commonsense)
            test_loss = response_loss(model, loaded.tokenizer, pairs, args, setup)
        for eval_set in args.eval_data:
            rows = generate_answers(model, loaded.tokenizer, problems[eval_set], loaded.eos_ids, args, setup, eval_set)
            if setup.ddp:
                rows = distributed.gather_rows(rows, setup.ddp_world_size)
            metrics[eval_set], predictions[eval_set] = score[eval_set](rows)
    if loaded.commonsense:
        metrics["commonsense_accuracy"] = sum(metrics[task]["accuracy"] for task in loaded.commonsense) / len(
            loaded.commonsense)
    return {**metrics.pop("gsm8k", {}), "test_loss": test_loss, "test_loss_on": test_loss_on, **metrics}, predictions


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process: CUDA tensors allocated on `device`, or else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB


def report(model, loaded: Loaded, args, setup: Setup, out: Path, described: dict) -> dict:
    """Evaluate, then write the predictions of each test set (predictions.jsonl for GSM8K, predictions_math.jsonl)
    and summary.json and print the summary (process 0); returns the summary. `described` names what was evaluated
    (method, rank, trainable parameters, timings)."""
    metrics, predictions = evaluate(model, loaded, args, setup)
    summary = {**metrics, **described, "model": args.model, "eval_merge": args.eval_merge,
               "peak_memory_bytes": peak_memory_bytes(setup.device)}
    if setup.master_process:
        out.mkdir(parents=True, exist_ok=True)
        for eval_set, rows in predictions.items():
            run_folder.write_jsonl(out / EVAL_SETS[eval_set], rows)
        run_folder.write_json(out / "summary.json", summary)
        print_summary(summary, out, outputs_written(args))
    return summary


def outputs_written(args) -> list[str]:
    """What a run writes into its out_dir (listed at its end): the evaluation's files, and a training run's own."""
    evaluation = ["summary.json", *(EVAL_SETS[name] for name in args.eval_data)]
    if args.eval_only:
        return evaluation
    trained = ["model/"] if args.method == "full" else ["adapter.safetensors", "peft_adapter/"]
    return ["config.json", "metrics.jsonl", run_folder.CHECKPOINTS + "/", *trained, *evaluation]


def print_summary(summary: dict, out: Path, outputs: list[str]) -> None:
    accuracies = []
    if "accuracy" in summary:
        accuracies.append(f"GSM8K test: {summary['accuracy']:.2%} ({summary['correct']}/{summary['total']}, "
                          f"{summary['invalid']} without an answer)")
    if "math" in summary:
        m = summary["math"]
        accuracies.append(f"MATH test: {m['accuracy']:.2%} ({m['correct']}/{m['total']}, {m['invalid']} without an "
                          f"answer); with the authors' is_equiv fallback {m['accuracy_authors_fallback']:.2%} "
                          f"({m['changed_by_authors_fallback']} verdicts flipped)")
    accuracies += [f"{task} test: {m['accuracy']:.2%} ({m['correct']}/{m['total']}, {m['invalid']} without an answer)"
                   for task, m in summary.items() if task in data.COMMONSENSE_TASKS]
    if "commonsense_accuracy" in summary:
        accuracies.append(f"commonsense mean accuracy: {summary['commonsense_accuracy']:.2%}")
    trained = (f"trainable parameters {summary['trainable_parameters']:,} | init {summary['init_seconds']:.1f} s | "
               f"training {summary['train_seconds']:.1f} s | ") if "train_seconds" in summary else ""  # not eval-only
    print(f"\n{'=' * 72}\n" + "\n".join(accuracies) + f"\nheld-out loss {summary['test_loss']:.4f} on "
          f"{summary['test_loss_on']}  [{summary['method']}, rank {summary['rank']}, {summary['model']}]\n"
          f"{trained}peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB\n"
          f"outputs in {out}/: {', '.join(outputs)}\n{'=' * 72}")


# ---------------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    setup = Setup.from_args(args)
    with run_folder.lock(args.out_dir, writer=setup.master_process):  # one run per --out_dir, before it is touched
        summary = run(args, setup, argv)
    if setup.ddp:
        distributed.finish()
    return summary


def run(args, setup: Setup, argv) -> dict:
    """The phases of a run (or of an --eval_only evaluation), in an --out_dir that no other run writes."""
    setup.log(device_line(setup))
    loaded = load(args, setup)
    if args.eval_only:
        out = run_folder.prepare(args.out_dir, args.overwrite, OUTPUTS, writer=setup.master_process)
        model = model_lib.load_model(loaded.folder, device=setup.device, dtype=setup.weights_dtype)
        described = load_adapter_to_evaluate(model, args, setup)
    else:
        # the data, the schedule and the checkpoints to resume from are checked before anything is deleted or loaded
        examples = training_examples(loaded, args, setup)
        plan = plan_training(args, len(examples), setup.ddp_world_size)
        identity = checkpoints.run_identity(args, setup.ddp_world_size, setup.compute_dtype, training_data_files(args),
                                            loaded.folder)
        checkpoint, state = (checkpoints.resume_state(Path(args.out_dir), identity, setup.log) if args.resume
                             else (None, None))
        out = run_folder.prepare(args.out_dir, args.overwrite, OUTPUTS, writer=setup.master_process)
        model = model_lib.load_model(loaded.folder, device=setup.device, dtype=setup.weights_dtype)
        reference_counts = parameter_counts(model, args.targets)
        t0 = time.time()
        if checkpoint:
            checkpoints.restore_trainable(model, checkpoint, args.method)
        else:
            setup.log(initialize_adapters(model, examples, loaded.tokenizer.pad_id, args, plan, setup)
                      or "full fine-tuning")
            if setup.master_process:
                checkpoints.start(out, model, identity, args.method, args.model)
        init_seconds = time.time() - t0
        num_trainable = describe_trainable(model, reference_counts, setup)

        batches = data.Batches(examples, args.micro_batch_size, args.seed, rank=setup.ddp_rank,
                               world_size=setup.ddp_world_size, pad_id=loaded.tokenizer.pad_id)
        optimizer = make_optimizer(model, args, setup.device)
        start_step = checkpoints.restore_position(state, optimizer, batches, setup.device) if state else 0
        if state:
            setup.log(f"resumed from {checkpoint} at step {start_step}")
        if setup.master_process:
            write_config(out, args, plan, loaded, num_trainable, setup)
            run_folder.cut_metrics(out / "metrics.jsonl", start_step)
        # SIGTERM or SIGINT: the step in progress ends with a checkpoint, then the run stops
        with checkpoints.StopOnSignal(checkpoints.resume_command(__file__, argv, setup.ddp_world_size)) as stop:
            train_seconds = train(model, optimizer, batches, start_step, args, plan, setup, out, stop)
        if setup.master_process:
            with checkpoints.stop_if_a_write_fails(out, resumable=True):
                save_outputs(model, out, args, loaded.folder)
        described = {"method": args.method, "rank": args.rank, "trainable_parameters": num_trainable,
                     "init_seconds": init_seconds, "train_seconds": train_seconds}

    with checkpoints.stop_if_a_write_fails(out, resumable=not args.eval_only):
        return report(model, loaded, args, setup, out, described)


if __name__ == "__main__":
    command.run(main)
