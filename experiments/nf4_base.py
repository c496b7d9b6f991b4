"""LoRA-SB on a 4-bit frozen base: SmolLM2-135M-Instruct with fp32 weights against the same weights in NF4
(train_gsm8k.py --quantize nf4), on the study's data and budget (experiments/study.py).

    python experiments/nf4_base.py --out experiments/results   # fp32 on CPU: about 30 minutes on 2 quiet cores
    python experiments/nf4_base.py --quick --model DIR --data_dir DIR --out DIR   # every part on a tiny budget

What it measures, each base against the other:
  - the bytes of the frozen weights (all of them, and the target layers');
  - the agreement of the initialization: the fraction of target weights where G at W0 and G at Q(W0) (the trainer's
    estimate on its init examples) have the same sign, and the overlap of the two B subspaces and of the two A
    subspaces, ||Q_1^T Q_2||_F^2 / r per layer (1: the same subspace, r / dim: unrelated ones), averaged over layers;
  - rho at the start (the study's claim-1 measure, study.captured): the share of the full gradient on the probe
    examples that each base's own B, A capture, against its own gradient;
  - validation and held-out loss after the study's budget (30 steps of 4 examples) for LoRA-SB r=96 and LoRA r=32 on
    each base, at the lrs the study chose on its validation split (experiments/results/study.json: LoRA-SB 3e-4, LoRA
    1e-3). On NF4 the adapters are evaluated unmerged, as the trainer does.
Every part goes to <--out>/nf4_base.json as soon as it is done and is reused by a rerun with the same settings (the
study's rules: experiments/common.Results); the trained adapters go to the study's cache of trained weights.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python experiments/nf4_base.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import lorasb  # noqa: E402
import train_gsm8k as trainer  # noqa: E402
from experiments import common, study as study_lib  # noqa: E402
from experiments.common import Results  # noqa: E402
from machinery import command, nf4, reporting  # noqa: E402

BASES = ("none", "nf4")  # --quantize of each base
LRS = {"lorasb": 3e-4, "lora": 1e-3}  # the study's chosen lrs (experiments/results/study.json, claim 3)


def base_model(study: study_lib.Study, quantize: str):
    """The pretrained model on `quantize`'s base, with the trainer's arguments of a LoRA-SB run of the budget."""
    args = study.trainer_args("lorasb", study.budget.rank, LRS["lorasb"], study.budget.steps, quantize=quantize)
    setup = trainer.Setup.from_args(args)
    return common.base_model(study.folder, setup, quantize), setup, args


def frozen_bytes(study: study_lib.Study) -> dict:
    """Bytes of the frozen weights of each base: all of them (a tied embedding once), and the target layers' alone."""
    out = {}
    for quantize in BASES:
        model, _, _ = base_model(study, quantize)
        targets = lorasb.find_targets(model).values()
        target_bytes = sum(m.weight.nbytes + (m.absmax.nbytes if isinstance(m, nf4.NF4Linear) else 0)
                           for m in targets)
        out[quantize] = {"all": sum(p.nbytes for p in model.parameters()) + nf4.nf4_bytes(model),
                         "targets": target_bytes}
    return out


def initialization(study: study_lib.Study) -> dict:
    """On each base: the trainer's estimate on its init examples (dW = -lr_1 sign G), the probe gradient at the start,
    and LoRA-SB's B, R, A made from that dW (as initialize_adapters makes them); then the agreement of the two bases'
    initializations, and rho of each base's own subspaces against its own probe gradient."""
    b, signs, spaces, rho = study.budget, {}, {}, {}
    for quantize in BASES:
        model, setup, args = base_model(study, quantize)
        plan = trainer.plan_training(args, len(study.examples), 1)
        updates = {name: update for group in trainer.estimate_update_from_examples(
            model, study.examples, study.pad_id, args, plan, setup) for name, update in group.items()}
        signs[quantize] = {name: torch.sign(update).to(torch.int8) for name, update in updates.items()}
        grads = study_lib.full_gradient(study, model, setup)
        lorasb.add_adapters(model, "lorasb", b.rank, updates=updates, svd=args.init_svd)
        del updates
        spaces[quantize] = study_lib.subspaces(model)
        rho[quantize] = study_lib.captured(grads, {"lorasb": spaces[quantize]}, b.rank)
        del grads, model
    equal = sum(int((signs["none"][n] == signs["nf4"][n]).sum()) for n in signs["none"])
    total = sum(s.numel() for s in signs["none"].values())
    return {"sign_agreement": equal / total, "rank": b.rank, **subspace_overlaps(spaces["none"], spaces["nf4"]),
            "rho": {quantize: rho[quantize]["all"] for quantize in BASES}}


def subspace_overlaps(first: dict, second: dict) -> dict:
    """||Q_1^T Q_2||_F^2 / r of the B bases and of the A bases of each layer, averaged over the layers and by type."""
    overlaps = {"B": {}, "A": {}}
    for layer, (qb1, qa1) in first.items():
        qb2, qa2 = second[layer]
        overlaps["B"][layer] = ((qb1.T @ qb2).square().sum() / qb1.shape[1]).item()
        overlaps["A"][layer] = ((qa1.T @ qa2).square().sum() / qa1.shape[1]).item()
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {f"{factor}_overlap": mean(list(by_layer.values())) for factor, by_layer in overlaps.items()} | {
        f"{factor}_overlap_by_type": {t: mean([v for layer, v in by_layer.items() if layer.endswith(t)])
                                      for t in lorasb.DEFAULT_TARGETS} for factor, by_layer in overlaps.items()}


def run_name(method: str, quantize: str) -> str:
    return f"nf4_base-{quantize}-{method}"


def train_and_evaluate(study: study_lib.Study, method: str, quantize: str) -> dict:
    """study.train_run of `method` at its LRS lr on `quantize`'s base (validation loss), then the held-out loss on the
    study's test solutions, the trained adapter loaded into a fresh base of the same kind and prepared as the trainer
    evaluates it."""
    b = study.budget
    rank = common.method_ranks(b)[method]
    name = run_name(method, quantize)
    trained = study_lib.train_run(study, method, rank, LRS[method], b.steps, save_as=name, quantize=quantize)
    args = study.trainer_args(method, rank, LRS[method], b.steps, quantize=quantize)
    setup = trainer.Setup.from_args(args)
    model = common.base_model(study.folder, setup, quantize)
    common.load_trained(model, study.cache / f"{name}.safetensors", method)
    trainer.prepare_evaluation(model, args, setup)
    pairs = list(map(data.gsm8k_pair, study.test[:b.test_solutions]))
    return {**trained, "test_loss": common.held_out_loss(model, study.tokenizer, pairs, args, setup)}


def summarize(results: Results) -> str:
    parts = results.parts
    size, init = parts["frozen_bytes"], parts["initialization"]
    lines = ["| | fp32 base | NF4 base |", "|---|---:|---:|",
             f"| frozen weights, MiB (targets alone) | {size['none']['all'] / 2**20:,.1f} "
             f"({size['none']['targets'] / 2**20:,.1f}) | {size['nf4']['all'] / 2**20:,.1f} "
             f"({size['nf4']['targets'] / 2**20:,.1f}) |",
             f"| rho at the start, own B, A (ceiling) | {init['rho']['none']['lorasb']:.3f} "
             f"({init['rho']['none']['ceiling']:.3f}) | {init['rho']['nf4']['lorasb']:.3f} "
             f"({init['rho']['nf4']['ceiling']:.3f}) |"]
    for method in LRS:
        runs = {quantize: parts[f"train/{run_name(method, quantize)}"] for quantize in BASES}
        loss = lambda value: "diverged" if value is None else f"{value:.4f}"  # noqa: E731
        lines.append(f"| {common.METHOD_NAMES[method]} lr {LRS[method]:g}: validation / held-out loss | "
                     + " | ".join(f"{loss(r['validation_loss'])} / {loss(r['test_loss'])}" for r in runs.values())
                     + " |")
    lines += ["", f"Initialization, fp32 base against NF4 base: the signs of G agree on {init['sign_agreement']:.2%} "
                  f"of the target weights; subspace overlap ||Q_1^T Q_2||_F^2 / r (rank {init['rank']}, mean over "
                  f"layers): B {init['B_overlap']:.3f}, A {init['A_overlap']:.3f}."]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments experiments/study.py's Study needs, its budget the study's (or its quick one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_gsm8k_run_arguments(p)
    p.add_argument("--out", default=None, help="folder of nf4_base.json and nf4_base.md (default: runs/nf4_base, or "
                   "runs/nf4_base-quick with --quick; the committed results are --out experiments/results)")
    p.add_argument("--quick", action="store_true", help="the study's tiny budget: every part runs, the figures mean "
                   "nothing")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    args.budget = study_lib.QUICK if args.quick else study_lib.Budget()
    args.out = Path(args.out or ("runs/nf4_base-quick" if args.quick else "runs/nf4_base"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    study = study_lib.Study(args)
    print(f"nf4_base: {reporting.device_line(study.setup)}", flush=True)
    results = Results(args.out / "nf4_base.json", "nf4_base",
                      json.loads(json.dumps(study_lib.settings(args, study) | {"lrs": LRS})))
    results.part("frozen_bytes", lambda: frozen_bytes(study))
    results.part("initialization", lambda: initialization(study))
    for method in LRS:
        for quantize in BASES:
            results.part(f"train/{run_name(method, quantize)}", lambda: train_and_evaluate(study, method, quantize))
    report = summarize(results)
    results.save()
    (args.out / "nf4_base.md").write_text(report + "\n")
    print(report)
    print(results.account())
    return results.data


if __name__ == "__main__":
    command.run(main)
