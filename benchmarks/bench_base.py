"""The base layer's speed, as ratios against the floor, measured in one process.

Two models: SmolLM2-135M (real weights; compute-bound on a CPU) and a
narrow, deep random LLaMA (width 64, 30 layers) where per-hook and per-call
overhead shows. For each:

* steered forward ÷ plain forward (target <= 1.02): an ``Add`` on every
  layer at the first 3 and last 3 real tokens; a LoReFT-shaped edit (a rank-4
  ``SubspaceInterchange`` from a fixed ``SourceValue``, so ``R`` is
  materialised and ``h + (t - hRᵀ)R`` applied) on every layer at the same
  positions; an ``Add`` on one layer at the last token; and an empty
  ``lab.run`` (the fixed per-call cost);
* interchange with one source (a patch of the last token's residual stream)
  ÷ two plain forwards, with the source site at an early, a middle and the
  last layer: the source run stops right after its site, which is what the
  early-layer rows save;
* the nnsight engine ÷ the hook engine on the same graphs;
* ``import steerlab`` over ``import torch, transformers`` (fresh interpreters).

The patching-sweep ratio lives in ``bench_sweep.py`` (run here when present).

Usage::

    python benchmarks/bench_base.py                      # CPU, fp32
    python benchmarks/bench_base.py --device cuda --dtype bfloat16
    python benchmarks/bench_base.py --quick --models deep
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402
from _timing import Bench, Row, count_ops, import_time, print_table, record  # noqa: E402

import steerlab as sl  # noqa: E402

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Once upon a time there was a small robot who wanted to learn how to paint the sky",
    "def fibonacci(n): return n if n < 2 else",
    "Steering vectors change a model's behaviour by adding a direction to its residual stream at",
]


def deep_llama(device: torch.device, dtype: torch.dtype):
    """The narrow deep LLaMA (``_models``) and 4 prompts of 32 tokens, one left-padded."""
    model = _models.deep_llama(device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0  # one left-padded example
    ids[mask == 0] = 0
    return model, None, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def smollm(device: torch.device, dtype: torch.dtype):
    """SmolLM2-135M (``_models.smollm``: real weights, or its shape where the package cannot travel); 4 prompts."""
    model, tok, note = _models.smollm(device, dtype)
    print(f"SmolLM2-135M: {note}", flush=True)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return model, tok, {k: v.to(device) for k, v in enc.items()}


def _other(inp: dict) -> dict:
    """Source inputs of the same shape: the batch rolled by one example."""
    return {k: v.roll(1, 0) for k, v in inp.items()}


def steering_rows(lab, model, inp, bench: Bench, engines: list[str]) -> list[tuple]:
    n, d = lab.n_layers, lab.d_model
    g = torch.Generator().manual_seed(2)
    dev, dt = lab.device, lab.dtype
    adds = [sl.Add(f"blocks.{i}.resid_post", torch.randn(d, generator=g).to(dev, dt) * 0.1, positions="f3+l3") for i in range(n)]
    batch = inp["input_ids"].shape[0]
    das = [
        sl.SubspaceInterchange(
            f"blocks.{i}.resid_post", size=4, positions="f3+l3",
            source=sl.SourceValue(torch.randn(batch, 6, d, generator=g).to(dev, dt)),
        )
        for i in range(n)
    ]
    one = [sl.Add(f"blocks.{n // 2}.resid_post", torch.randn(d, generator=g).to(dev, dt), positions=-1)]
    kw = {"use_cache": False} if getattr(lab, "facts", lab).is_hf else {}  # before the redesign Lab held the facts

    def plain():
        return model(**inp, **kw)

    bench.add("plain", plain)
    rows = []
    for eng in engines:
        tag = "" if eng == "hooks" else f" [{eng}]"

        def run(ivs, eng=eng):
            return lambda: lab.run(inp, ivs, engine=eng, **kw) if eng != "hooks" else lab.run(inp, ivs, **kw)

        bench.add(f"noop{tag}", run([]))
        bench.add(f"add_all{tag}", run(adds))
        bench.add(f"das_all{tag}", run(das))
        bench.add(f"add_one{tag}", run(one))
        target = 1.02 if eng == "hooks" else None
        rows += [
            (f"empty lab.run ÷ plain forward{tag}", f"noop{tag}", "plain", None, "fixed per-call cost"),
            (f"Add on all {n} layers, f3+l3 ÷ plain{tag}", f"add_all{tag}", "plain", target, ""),
            (f"rank-4 subspace edit on all {n} layers ÷ plain{tag}", f"das_all{tag}", "plain", target, "LoReFT-shaped"),
            (f"Add on 1 layer, last token ÷ plain{tag}", f"add_one{tag}", "plain", target, ""),
        ]
    rows += _steady_rows(lab, model, inp, bench, kw, {"add_all": adds, "das_all": das})
    return rows


def _steady_rows(lab, model, inp, bench: Bench, kw: dict, graphs: dict) -> list[tuple]:
    """The same edits without a per-call plan: attached for the whole benchmark (each on its own copy
    of the model, so the other cases stay plain) and, where the library has it, ``lab.prepare`` (validated
    and compiled once, each call binds its inputs)."""
    import copy

    rows = []
    n = lab.n_layers
    prepared = hasattr(sl, "PreparedRun")  # lab.prepare(ivs) -> PreparedRun came with the redesign
    label = {"add_all": f"Add on all {n} layers, f3+l3", "das_all": f"rank-4 subspace edit on all {n} layers"}
    # the floors of any hook-based edit, in plain torch: a hook that does nothing, and a hook that adds
    # each layer's vector at the same positions (clone + index add; no library)
    for kind in ("noop", "add"):
        twin = _hooked_twin(model, inp, kind, [iv.vector for iv in graphs["add_all"]])
        bench.add(f"floor {kind}", lambda twin=twin: twin(**inp, **kw))
    rows.append((f"floor: a no-op hook on all {n} layers ÷ plain", "floor noop", "plain", None, "plain torch"))
    rows.append((f"floor: plain-torch Add on all {n} layers, f3+l3 ÷ plain", "floor add", "plain", None, "plain torch"))
    for key, ivs in graphs.items():
        twin = copy.deepcopy(model)
        sl.wrap(twin).attach(copy.deepcopy(ivs))  # stays attached: the twin serves only this case

        def attached(twin=twin):
            return twin(**inp, **kw)

        bench.add(f"{key} attached", attached)
        rows.append((f"{label[key]}, attached ÷ plain", f"{key} attached", "plain", 1.05, "hooks installed once"))
        if key == "add_all":
            rows.append((f"{label[key]}, attached ÷ the plain-torch Add", f"{key} attached", "floor add", None, "library overhead"))
        if prepared:
            run = lab.prepare(ivs)
            bench.add(f"{key} prepared", lambda run=run: run(inp, **kw))
            rows.append((f"{label[key]}, lab.prepare ÷ plain", f"{key} prepared", "plain", 1.05, "compiled once"))
    return rows


def _hooked_twin(model, inp: dict, kind: str, vectors: list):
    """A copy of ``model`` with a plain-torch forward hook on every decoder layer: ``noop`` returns
    nothing; ``add`` adds ``vectors[i]`` at each example's first 3 and last 3 real tokens."""
    import copy

    twin = copy.deepcopy(model)
    mask = inp["attention_mask"].bool()
    real = [torch.nonzero(m).flatten() for m in mask]
    idx = torch.stack([torch.cat([r[:3], r[-3:]]) for r in real]).to(mask.device)  # [batch, 6]
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    for i, layer in enumerate(twin.model.layers):
        if kind == "noop":
            layer.register_forward_hook(lambda mod, args, out: None)
            continue

        def add(mod, args, out, v=vectors[i]):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[rows, idx] += v
            return (h, *out[1:]) if isinstance(out, tuple) else h

        layer.register_forward_hook(add)
    return twin


def interchange_rows(lab, model, inp, bench: Bench, engines: list[str]) -> list[tuple]:
    n = lab.n_layers
    src = _other(inp)
    kw = {"use_cache": False} if getattr(lab, "facts", lab).is_hf else {}  # before the redesign Lab held the facts

    def two_plain():
        model(**src, **kw)
        return model(**inp, **kw)

    bench.add("two plain", two_plain)
    rows = []
    for eng in engines:
        tag = "" if eng == "hooks" else f" [{eng}]"
        for layer in (1, n // 2, n - 1):
            iv = sl.Interchange(f"blocks.{layer}.resid_post", positions=-1, source=src)

            def run(iv=iv, eng=eng):
                return lab.run(inp, [iv], engine=eng, **kw) if eng != "hooks" else lab.run(inp, [iv], **kw)

            bench.add(f"ic{layer}{tag}", run)
            rows.append((f"interchange, source site at layer {layer} ÷ 2 plain{tag}", f"ic{layer}{tag}", "two plain", None,
                         "source stops after its site"))
    return rows


def engine_rows(rows: list[tuple], engines: list[str]) -> list[tuple]:
    """nnsight engine ÷ hook engine on the same graphs, from cases already timed."""
    if "nnsight" not in engines:
        return []
    out = []
    for label, case, _floor, _t, _note in rows:
        if case.endswith(" [nnsight]"):
            what = label.split(" ÷")[0]
            out.append((f"{what}: nnsight engine ÷ hook engine", case, case.removesuffix(" [nnsight]"), None, "overhead"))
    return out


def _note(note: str, ours: float, floor: float, n_layers: int) -> str:
    """An engine row's note: the nnsight engine's added cost per call, in ms and per layer."""
    if note != "overhead":
        return note
    extra = (ours - floor) * 1e3
    return f"{extra:+.2f} ms/call ({extra * 1e3 / n_layers:+.0f} µs/layer)"


def bench_model(name: str, loader, args) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tok, inp = loader(device, dtype)
    lab = sl.wrap(model, tok)
    engines = ["hooks"] + (["nnsight"] if args.nnsight else [])
    bench = Bench(device=device, rounds=args.rounds, min_round_s=args.round_s)
    with torch.no_grad():
        rows = steering_rows(lab, model, inp, bench, engines)
        rows += interchange_rows(lab, model, inp, bench, engines)
        rows += engine_rows(rows, engines)
        t = bench.run()
        ops = {c: count_ops(bench.cases[c]) for c in ("plain", "noop", "add_all", "das_all", "add_one", "two plain", f"ic{lab.n_layers - 1}")}
    b, s = inp["input_ids"].shape
    title = f"{name} (batch {b}, seq {s}, {args.dtype}, {device.type}; {lab.n_layers} layers, d={lab.d_model})"
    print_table(title, [Row(label, t[c], t[f], tgt, _note(note, t[c], t[f], lab.n_layers)) for label, c, f, tgt, note in rows])
    n = lab.n_layers
    record(f"{title}: ATen operators per call (load-independent)", [{"measure": k, "ops": v} for k, v in ops.items()])
    print(f"  ATen ops per call (load-independent): plain {ops['plain']}, empty run +{ops['noop'] - ops['plain']}, "
          f"Add on all layers +{ops['add_all'] - ops['plain']} ({(ops['add_all'] - ops['noop']) / n:.1f}/layer), "
          f"subspace edit on all layers +{ops['das_all'] - ops['plain']} ({(ops['das_all'] - ops['noop']) / n:.1f}/layer), "
          f"Add on 1 layer +{ops['add_one'] - ops['plain']}; interchange at the last layer {ops[f'ic{n - 1}']} vs two plain {ops['two plain']}")
    lab.unwrap()


def bench_import(rounds: int) -> None:
    t = import_time(
        {
            "torch, transformers": "import torch, transformers",
            "steerlab": "import steerlab",
            "torch, transformers, steerlab": "import torch, transformers, steerlab",
        },
        rounds=rounds,
    )
    base = t["torch, transformers"]
    print_table(
        "import time (fresh interpreters)",
        [
            Row("import steerlab ÷ import torch, transformers", t["steerlab"], base, None, "steerlab imports neither transformers nor nnsight"),
            Row("import torch, transformers, steerlab ÷ without steerlab", t["torch, transformers, steerlab"], base, None, "steerlab's own cost"),
        ],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default="deep,smollm", help="comma-separated: deep, smollm")
    p.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1, robust on a shared machine)")
    p.add_argument("--no-nnsight", dest="nnsight", action="store_false", help="skip the nnsight-engine rows")
    p.add_argument("--no-import", dest="imports", action="store_false", help="skip the import-time rows")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="do not run bench_sweep.py")
    args = p.parse_args(argv)
    args.rounds, args.round_s = (5, 0.1) if args.quick else (9, 0.25)
    torch.set_grad_enabled(False)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)  # OpenMP threads that outnumber free cores spin: 10x slower forwards
    loaders = {"deep": ("narrow deep LLaMA", deep_llama), "smollm": ("SmolLM2-135M", smollm)}
    for key in args.models.split(","):
        name, loader = loaders[key.strip()]
        bench_model(name, loader, args)
    if args.imports:
        bench_import(3 if args.quick else 7)
    sweep = Path(__file__).with_name("bench_sweep.py")
    if args.sweep and sweep.exists():
        cmd = [sys.executable, str(sweep), "--device", args.device, "--dtype", args.dtype, "--models", args.models] + (["--quick"] if args.quick else [])
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
