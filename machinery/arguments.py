"""The trainer's command line: every option (argparse refuses a bad value of one alone, with type= and choices=),
the defaults that depend on other options (resolved once, never rewritten), and the problems argparse cannot see in
one argument (combinations, files, the number of processes, the model's shapes), listed at once before anything is
loaded or deleted.
"""

import argparse
import math
import os
from pathlib import Path

import torch

import lorasb
import model as model_lib
from machinery import commonsense, datasets, nf4, run_folder
from machinery.input_files import read_json_object

TRAINING_METHODS = (*lorasb.METHODS, "full")  # the adapters of lorasb.py, and full fine-tuning
DEFAULT_RANK = {"lorasb": 96, "loraxs": 96, "lora": 32}  # the paper's Table 1 ranks


def refuse_unless(ok: bool, what: str, text: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")


def positive_int(text: str) -> int:
    refuse_unless((value := int(text)) >= 1, "positive", text)
    return value


def positive(text: str) -> float:
    refuse_unless(0 < (value := float(text)) < math.inf, "a positive finite number", text)
    return value


def non_negative(text: str) -> float:
    refuse_unless(0 <= (value := float(text)) < math.inf, "a finite number >= 0", text)
    return value


def finite(text: str) -> float:
    refuse_unless(math.isfinite(value := float(text)), "a finite number", text)
    return value


def fraction(text: str) -> float:
    refuse_unless(0 <= (value := float(text)) < 1, "at least 0 and below 1", text)
    return value


def comma_separated(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def eval_set_parser(eval_sets: tuple[str, ...]):
    """The argparse type of --eval_data: names among `eval_sets`, comma-separated, "commonsense" standing for the eight
    commonsense tasks."""
    def eval_set_names(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n for name in comma_separated(text)
                                    for n in (commonsense.TASKS if name == "commonsense" else (name,))))
        if not names or not set(names) <= set(eval_sets):
            raise argparse.ArgumentTypeError(f"{text!r}: choose test sets among {', '.join(eval_sets)} (commonsense: "
                                             f"the last eight), comma-separated")
        return names
    return eval_set_names


def parse_args(argv, description: str, eval_sets: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-0.5B", help="hub name or local folder (config.json, safetensors, tokenizer)")
    a("--method", default="lorasb", choices=TRAINING_METHODS)
    a("--rank", type=int, help="adapter rank (default: 96 for lorasb/loraxs, 32 for lora)")
    a("--lora_alpha", type=finite, help="LoRA only: scale = alpha / rank (default: 2 * rank)")
    a("--targets", type=comma_separated, default=",".join(lorasb.DEFAULT_TARGETS), help="module-name suffixes to adapt")
    a("--train_data", default="gsm8k", choices=("gsm8k", "metamathqa", "commonsense"))
    a("--num_train", type=positive_int, help="use the first N training examples (metamathqa default: 50000)")
    a("--data_dir", help="folder with GSM8K train.jsonl and test.jsonl (default: download and cache)")
    a("--metamathqa_path", help="local MetaMathQA .json/.jsonl (default: download from the hub)")
    a("--commonsense_dir", help="commonsense data in the authors' layout: <task>/test.json, and commonsense_170k.json "
      "or <task>/train.json to train on (default: download LLM-Adapters' files)")
    a("--commonsense_prompt", default="alpaca", choices=("alpaca", "authors"), help="commonsense training prompt: "
      "alpaca (the evaluation's) or authors (theirs: 12 spaces open each line after the first)")
    a("--epochs", type=positive_int, default=3, help="passes over the training set")
    a("--max_steps", type=positive_int, help="stop the schedule after this many optimizer steps")
    a("--lr", type=positive, default=1e-4, help="peak learning rate (the paper's arithmetic setting)")
    a("--warmup_ratio", type=fraction, default=0.02, help="linear warmup over this fraction of the steps")
    a("--schedule", default="cosine", choices=("cosine", "linear"), help="decay after the warmup")
    a("--weight_decay", type=non_negative, default=0.0, help="AdamW weight decay (the authors' 0.01 was an accident)")
    a("--grad_clip", type=non_negative, default=1.0, help="clip the gradient norm to this (0 disables)")
    a("--batch_size", type=positive_int, default=32, help="examples per optimizer step, over all GPUs")
    a("--micro_batch_size", type=positive_int, default=4, help="examples per forward pass on one GPU")
    a("--max_length", type=positive_int, default=512, help="truncate training examples to this many tokens")
    a("--num_init_samples", type=positive_int, help="examples of the estimate (default: 0.1%% of the data, >= 32)")
    a("--init_rule", default="adamw", choices=("adamw", "sgd"), help="dW = -lr_1 * sign G (adamw) or -lr_1 * G")
    a("--init_svd", default="exact", choices=lorasb.SVDS, help="SVD of the initialization; "
      "authors: theirs, svd_lowrank with q = rank, 10 power iterations, seed 42 (lorasb only)")
    a("--init_batch_size", type=positive_int, help="examples per batch of the estimate (default: --micro_batch_size)")
    a("--lr_1", type=positive, help="the step size of the first-update estimate, which sets the size of R at init "
      "(default: the LR of the first optimizer step; the authors' run used 1e-4 / 333.34 = 2.99994e-7)")
    a("--init_accumulate_on", default="device", choices=("device", "cpu"), help="where the fp32 gradient sums live")
    a("--init_group_gib", type=positive, default=lorasb.DEFAULT_GROUP_BYTES / 2**30, help="GiB of fp32 gradient sums "
      "the estimate holds at once: the target layers are estimated in groups that fit, one pass over the init samples "
      "each (the same B, R, A bit for bit; default %(default)g)")
    a("--quantize", default="none", choices=("none", "nf4"), help="nf4: the frozen linear layers (all but lm_head) in "
      "4-bit NormalFloat, QLoRA's format (machinery/nf4.py), for lorasb, loraxs and lora")
    a("--eval_data", type=eval_set_parser(eval_sets), default="gsm8k", help="test sets to answer: gsm8k (1319), math "
      "(5000), the commonsense tasks boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, "
      "openbookqa, or commonsense for all eight")
    a("--math_path", help="local MetaMath MATH_test.jsonl (default: download from MetaMath's repository)")
    a("--eval_limit", type=positive_int, help="evaluate on the first N problems of each test set (default: all)")
    a("--eval_batch_size", type=positive_int, default=64, help="prompts per generation batch")
    a("--max_new_tokens", type=positive_int, default=256, help="generation budget per GSM8K question (theirs)")
    a("--math_max_new_tokens", type=positive_int, default=512, help="generation budget per MATH problem (theirs)")
    a("--commonsense_max_new_tokens", type=positive_int, default=32, help="per commonsense question (theirs)")
    a("--eval_merge", default="exact", choices=("exact", "bf16"), help="exact (the adapter as trained: merged in "
      "fp32, unmerged with bf16 weights) or bf16 (the authors': merged, then every weight in bf16)")
    a("--eval_only", action="store_true", help="skip training; evaluate --model (with --adapter if given)")
    a("--adapter", help="with --eval_only: an adapter.safetensors saved by this script")
    a("--out_dir", help="where outputs go (default: runs/gsm8k-<method>-r<rank>, runs/gsm8k-eval)")
    one_of = p.add_mutually_exclusive_group().add_argument
    one_of("--overwrite", action="store_true", help="start over in an existing out_dir (deleting its checkpoints)")
    one_of("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    a("--save_every", type=positive_int, default=200, help="checkpoint every N optimizer steps (and at the end)")
    a("--log_every", type=positive_int, help="print and log metrics every N optimizer steps (default: a twentieth of "
      "the steps, 1 to 10: every step of a run of up to 39 steps, every 10th from 200 steps)")
    a("--seed", type=int, default=42)
    a("--device", help="cuda, cpu, ... (default: cuda when available)")
    a("--dtype", choices=("bfloat16", "float32"), help="model weights (default: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    return resolve_defaults(p.parse_args(argv))


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on other arguments."""
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
    errors = []
    if args.rank is not None and args.rank < 1:  # here, not in argparse, to be listed with the other problems
        errors.append(f"--rank {args.rank}: the rank must be at least 1")
    if problem := lorasb.svd_problem(args.method, args.init_svd):
        errors.append(f"--init_svd {args.init_svd} with --method {args.method}: {problem}")
    if args.batch_size % (args.micro_batch_size * ddp_world_size):
        errors.append(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                      f"{args.micro_batch_size} x {ddp_world_size} GPU(s): gradient accumulation needs a whole number")
    if args.num_init_samples is not None and args.num_init_samples < ddp_world_size:
        errors.append(f"--num_init_samples {args.num_init_samples} is fewer than the {ddp_world_size} processes: "
                      "every process needs at least one example for the estimate")
    if args.quantize == "nf4" and args.method == "full" and not args.eval_only:
        errors.append("--method full --quantize nf4: full fine-tuning trains every weight, and a 4-bit base is frozen; "
                      "train an adapter (--method lorasb, loraxs or lora) on it, or fine-tune without --quantize")
    if args.quantize == "nf4" and args.eval_merge == "bf16":
        errors.append("--eval_merge bf16 with --quantize nf4: a 4-bit base has no bf16 weights to merge into, and "
                      "W0 + B R A requantized to 4 bits would round most of the update away; evaluate the adapter "
                      "unmerged (--eval_merge exact), or the saved adapter on a bf16 base with --eval_only --adapter")
    if args.adapter and not args.eval_only:
        errors.append("--adapter is for --eval_only (training writes its own adapter)")
    if args.adapter and args.method == "full":
        errors.append("--adapter with --method full: pass the fine-tuned model folder as --model instead")
    # exists, not is_file: the loaders refuse a FIFO or a folder in place of a file, saying what it is
    if args.data_dir and not all((Path(args.data_dir) / f"{s}.jsonl").exists() for s in ("train", "test")):
        errors.append(f"--data_dir {args.data_dir}: needs train.jsonl and test.jsonl (GSM8K)")
    errors += [f"--{name} {getattr(args, name)}: no such file" for name in ("adapter", "metamathqa_path", "math_path")
               if getattr(args, name) and not Path(getattr(args, name)).exists()]
    if args.commonsense_dir and not Path(args.commonsense_dir).is_dir():
        errors.append(f"--commonsense_dir {args.commonsense_dir}: no such folder")
    elif args.train_data == "commonsense" and not args.eval_only and args.commonsense_dir and \
            not datasets.commonsense_train_files(args.commonsense_dir):
        errors.append(f"--commonsense_dir {args.commonsense_dir}: holds neither commonsense_170k.json nor a "
                      "<task>/train.json to train on")
    return errors + run_folder.check(args)


def check_model(args, config: model_lib.ModelConfig) -> list[str]:
    """Problems that need the model's shapes (read from config.json alone, before any weight is loaded)."""
    if args.method == "full" or args.eval_only:
        return []
    skeleton = nf4.build_nf4_model(config, "meta") if args.quantize == "nf4" else model_lib.build_model(config)
    try:
        targets = lorasb.find_targets(skeleton, args.targets)
    except ValueError as e:
        return [f"--targets: {e}"]
    problems = [f"--{error}" for error in lorasb.rank_problems(targets, args.rank)][:3]
    unquantized = [name for name, layer in targets.items() if not isinstance(layer, nf4.NF4Linear)]
    if args.quantize == "nf4" and unquantized:
        problems.append(f"--targets with --quantize nf4: {len(unquantized)} target layer(s) cannot be quantized, e.g. "
                        f"{unquantized[:3]} (nf4 keeps {', '.join(nf4.KEEP)} in the model's dtype, as QLoRA does); "
                        f"leave them out of --targets, or train without --quantize")
    return problems


def context_length(folder: Path, config: model_lib.ModelConfig) -> tuple[int, str] | None:
    """The most tokens (prompt and new tokens together) the model takes, and where config.json says so: its
    max_position_embeddings (the positions it was trained on), or its sliding window when that is shorter (model.py
    computes no longer input); None when config.json says neither."""
    positions = read_json_object(folder / "config.json").get("max_position_embeddings")
    said = ((positions, "max_position_embeddings"), (config.sliding_window, "sliding_window"))
    limits = [(n, what) for n, what in said if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return min(limits, default=None)


def memory_bytes(device: torch.device) -> int | None:
    """The memory of the device the run computes on (all of it: a bound no allocation can pass), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_sizes(args, folder: Path, config: model_lib.ModelConfig, prompt_lengths: dict[str, list[int]],
                tasks: dict, setup) -> list[str]:
    """The sizes the model and the memory bound, checked before anything trains: --max_length, and for each test set
    evaluated (`tasks`: its EvalTask by name) its longest prompt (`prompt_lengths`: in tokens) with its new-token
    budget within the model's context length, and generation's KV cache (preallocated: --eval_batch_size prompts of
    that many tokens) within the device's memory."""
    memory, problems = memory_bytes(setup.device), []
    context, whence = context_length(folder, config) or (None, "")
    whence = f"its config.json's {whence}"
    if context and args.max_length > context and not args.eval_only:
        problems.append(f"--max_length {args.max_length} exceeds the {context} tokens the model takes ({whence}): "
                        f"pass --max_length {context} or less")
    cache_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                             * setup.compute_dtype.itemsize)  # keys and values of every layer
    for name, lengths in prompt_lengths.items():
        prompt = max(lengths)
        option, budget, title = tasks[name].max_new_tokens, getattr(args, tasks[name].max_new_tokens), tasks[name].title
        if context and prompt + budget > context:
            problems.append(f"--{option} {budget}: {title}'s longest prompt ({prompt} tokens) and {budget} new tokens "
                            f"exceed the {context} tokens the model takes ({whence}): pass --{option} "
                            f"{max(context - prompt, 1)} or less" + (" (and a shorter prompt)" if prompt >= context
                                                                      else ""))
            continue
        rows = min(args.eval_batch_size, math.ceil(len(lengths) / setup.ddp_world_size))
        cache = rows * (prompt + budget) * cache_bytes_per_token
        if memory and cache > memory:
            problems.append(f"--eval_batch_size {args.eval_batch_size} with --{option} {budget}: generation's KV cache "
                            f"({rows} prompts of up to {prompt + budget} tokens) takes {size(cache)}, more than the "
                            f"{size(memory)} of {setup.device}: lower either")
    return problems


def size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def too_many_init_samples(args, num_init: int, most: int, num_examples: int, ddp_world_size: int) -> str:
    """Why the first-update estimate cannot take `num_init` examples when it can take at most `most`."""
    return (f"{'--num_init_samples' if args.num_init_samples else 'the default number of init samples'} {num_init}: "
            f"the first-update estimate can use at most {most} of the {num_examples} training examples "
            f"({ddp_world_size} process(es), batches of --init_batch_size {args.init_batch_size}); pass "
            f"--num_init_samples {most} or fewer")


def lr_1_warning(args, lr_1: float, warmup_steps: int, total_steps: int) -> str | None:
    """A warning, in plain words, when lr_1 defaults to the peak learning rate (a schedule with at most one warmup
    step)."""
    if args.lr_1 is not None or warmup_steps > 1:
        return None
    return (f"lr_1 = {lr_1:.3g} is the peak learning rate: a schedule of {total_steps} steps has {warmup_steps} "
            f"warmup step(s), so LoRA-SB starts from a full fine-tuning step at the peak learning rate (lr_1 is the "
            f"size of that step, which it keeps in rank {args.rank}): a large jump that can hurt. More steps or a "
            f"larger --warmup_ratio make lr_1 = --lr / warmup steps smaller; --lr_1 sets it.")
