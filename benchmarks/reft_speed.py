"""ReFT speed: ratios measured in one process, printed as a table (CPU or GPU, no network).

    python benchmarks/reft_speed.py                 # CPU: narrow-deep LLaMA + SmolLM2-shaped LLaMA, fp32
    python benchmarks/reft_speed.py --device cuda   # GPU: bf16 (--dtype), longer sequences

Every model has random weights built from a config (nothing to download). For
each model it times, interleaved and repeated (medians):

- one LoReFT (rank 4, the middle layer, last prompt position) training step
  ÷ the floor (frozen forward + backward down to that layer), beside pyreft's
  LoreftIntervention and peft LoRA (r=8 on q,v of every layer) on the same batch;
- the paper's commonsense recipe (every layer, rank 8, first 7 + last 7
  positions, tied): step ÷ plain frozen forward + backward, steered forward ÷
  plain forward, beside pyreft;
- steered generation (prompt positions only) tokens/s ÷ plain generation;
- memory of a training step against plain forward + backward (GPU: peak
  allocated; CPU: bytes autograd saves for the backward, the activations).

Every step includes the optimiser step (AdamW) where there are parameters.
Targets (issue 4): single ÷ floor <= 1.05; recipe step ÷ plain <= 1.10;
recipe forward ÷ plain <= 1.05; generation >= 0.98.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as T
from torch.nn import functional as F

from steerlab import reft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import record  # noqa: E402

MODELS = {
    # width 64, 30 layers: per-layer overhead shows on a CPU
    "narrow-deep (d=64, 30 layers)": dict(hidden_size=64, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=4,
                                          intermediate_size=128, vocab_size=1024),
    # SmolLM2-135M's shape
    "SmolLM2-135M shape (d=576, 30 layers)": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                  intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: the clock: wall time on a GPU; on a CPU the process's CPU time, which other jobs sharing the
#: cores do not inflate (wall-clock ratios on a loaded machine were off by up to 2x)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fns: dict[str, Callable[[], None]], device: str, repeats: int, inner: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved."""
    now = CLOCK[clock]
    for fn in fns.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = now()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((now() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def saved_bytes(fn: Callable[[], None], device: str) -> int:
    """GPU: peak allocated during ``fn``; CPU: bytes of the tensors autograd saves for the backward."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    total = [0]
    seen: set[int] = set()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


class Bench:
    def __init__(self, cfg: dict, device: str, dtype: torch.dtype, batch: int, seq: int, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.dtype = device, dtype
        config = T.LlamaConfig(**cfg, pad_token_id=0)
        self.plain = T.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
        for p in self.plain.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, cfg["vocab_size"], (batch, seq), generator=g).to(device)
        self.mask = torch.ones_like(self.ids)
        self.layers = cfg["num_hidden_layers"]
        self.mid = self.layers // 2
        self.lengths = [seq] * batch

    def copy(self):
        m = copy.deepcopy(self.plain)
        return m

    def loss(self, logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), self.ids.flatten())

    # -- the references -------------------------------------------------------------
    def plain_forward(self):
        with torch.no_grad():
            self.plain(input_ids=self.ids, attention_mask=self.mask)

    def plain_step(self):
        """Frozen forward + backward: the gradient reaches the embeddings (as when every layer is edited)."""
        emb = self.plain.get_input_embeddings()(self.ids).detach().requires_grad_(True)
        self.loss(self.plain(inputs_embeds=emb, attention_mask=self.mask).logits).backward()

    def floor_step(self, layer: int):
        """Frozen forward + backward down to the output of ``layer`` only."""
        def cut(module, args, out):
            return out.detach().requires_grad_(True)

        h = self.plain.model.layers[layer].register_forward_hook(cut)
        try:
            self.loss(self.plain(input_ids=self.ids, attention_mask=self.mask).logits).backward()
        finally:
            h.remove()

    # -- steerlab -------------------------------------------------------------------
    def ours(self, layers, rank: int, positions: str):
        rm = reft.get_reft_model(self.copy(), reft.ReftConfig(layers=layers, rank=rank, positions=positions))
        pos = reft.prompt_positions(self.lengths, positions).to(self.device)
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-4)

        def step():
            self.loss(rm(input_ids=self.ids, attention_mask=self.mask, intervention_positions=pos).logits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def forward():
            with torch.no_grad():
                rm(input_ids=self.ids, attention_mask=self.mask, intervention_positions=pos)

        return rm, step, forward

    # -- peers ------------------------------------------------------------------------
    def pyreft(self, layers, rank: int, positions: str):
        import pyreft

        model = self.copy()
        reps = [{"layer": L, "component": "block_output", "low_rank_dimension": rank,
                 "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=rank, dtype=self.dtype)}
                for L in layers]
        prm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
        prm.set_device(self.device)
        pos = reft.prompt_positions(self.lengths, positions)[:, 0].tolist()
        locs = {"sources->base": (None, [pos] * len(layers))}
        opt = torch.optim.AdamW([p for p in prm.parameters() if p.requires_grad], lr=1e-4)
        base = {"input_ids": self.ids, "attention_mask": self.mask}

        def step():
            self.loss(prm(base, unit_locations=locs)[1].logits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def forward():
            with torch.no_grad():
                prm(base, unit_locations=locs)

        return step, forward

    def lora(self):
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(self.copy(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

        def step():
            self.loss(pm(input_ids=self.ids, attention_mask=self.mask).logits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step


def generation_ratio(b: Bench, rm, new_tokens: int, repeats: int, clock: str) -> float:
    """Steered (prompt positions only) ÷ plain generation, tokens per second."""
    half = b.ids[:, : b.ids.shape[1] // 2]
    enc = {"input_ids": half, "attention_mask": torch.ones_like(half)}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def plain():
        b.plain.generate(**enc, **kw)  # the untouched copy: no hooks at all

    def steered():
        rm.generate(enc, **kw)

    t = timed({"plain": plain, "steered": steered}, b.device, repeats, 1, clock)
    return t["plain"] / t["steered"]


def run_model(name: str, cfg: dict, args) -> list[tuple[str, str, str]]:
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    b = Bench(cfg, args.device, dtype, args.batch, args.seq)
    rows: list[tuple[str, str, str]] = []
    L = b.mid
    _, ours1, _ = b.ours([L], 4, "l1")
    fns = {"floor": lambda: b.floor_step(L), "plain_step": b.plain_step, "ours1": ours1}
    have_lora = importlib.util.find_spec("peft") is not None
    if have_lora:
        fns["lora"] = b.lora()
    have_pyreft = not args.no_pyreft and importlib.util.find_spec("pyreft") is not None  # optional on a bare GPU box
    if have_pyreft:
        fns["pyreft1"] = b.pyreft([L], 4, "l1")[0]
    t = timed(fns, args.device, args.repeats, args.inner, args.clock)
    ms = lambda s: f"{1e3 * s:.2f} ms"  # noqa: E731
    rows.append((name, "floor: frozen fwd+bwd down to layer %d" % L, ms(t["floor"])))
    rows.append((name, "LoReFT r4 @ layer %d, l1: step ÷ floor (target <= 1.05)" % L, f"{t['ours1'] / t['floor']:.3f}  ({ms(t['ours1'])})"))
    if have_pyreft:
        rows.append((name, "pyreft LoReFT, same: step ÷ floor", f"{t['pyreft1'] / t['floor']:.3f}  ({ms(t['pyreft1'])})"))
    if have_lora:
        rows.append((name, "peft LoRA r8 q,v all layers: step ÷ floor  (÷ plain fwd+bwd)",
                     f"{t['lora'] / t['floor']:.3f}  ({t['lora'] / t['plain_step']:.3f})"))

    rm, step, fwd = b.ours("all", 8, "f7+l7")
    fns = {"plain_step": b.plain_step, "plain_fwd": b.plain_forward, "recipe_step": step, "recipe_fwd": fwd}
    if have_pyreft:
        fns["pyreft_step"], fns["pyreft_fwd"] = b.pyreft(list(range(b.layers)), 8, "f7+l7")
    t = timed(fns, args.device, args.repeats, args.inner, args.clock)
    rows.append((name, "plain frozen fwd+bwd / plain forward", f"{ms(t['plain_step'])} / {ms(t['plain_fwd'])}"))
    rows.append((name, "recipe (all layers, r8, f7+l7, tied): step ÷ plain fwd+bwd (target <= 1.10)",
                 f"{t['recipe_step'] / t['plain_step']:.3f}  ({ms(t['recipe_step'])})"))
    rows.append((name, "recipe: steered forward ÷ plain forward (target <= 1.05)", f"{t['recipe_fwd'] / t['plain_fwd']:.3f}"))
    if have_pyreft:
        rows.append((name, "pyreft recipe: step ÷ plain fwd+bwd; forward ÷ plain",
                     f"{t['pyreft_step'] / t['plain_step']:.3f}; {t['pyreft_fwd'] / t['plain_fwd']:.3f}"))
    mem_plain = saved_bytes(b.plain_step, args.device)
    mem_recipe = saved_bytes(step, args.device)
    rows.append((name, "memory: recipe step ÷ plain fwd+bwd" + (" (peak)" if cuda else " (saved activations)"),
                 f"{mem_recipe / mem_plain:.3f}  ({mem_recipe / 2**20:.1f} / {mem_plain / 2**20:.1f} MiB)"))
    _, ours1b, _ = b.ours([L], 4, "l1")
    mem_floor = saved_bytes(lambda: b.floor_step(L), args.device)
    mem_one = saved_bytes(ours1b, args.device)
    rows.append((name, "memory: single-layer step ÷ floor", f"{mem_one / mem_floor:.3f}"))
    rows.append((name, f"generation ({args.new_tokens} new tokens, prompt-only recipe): tokens/s ÷ plain (target >= 0.98)",
                 f"{generation_ratio(b, rm, args.new_tokens, args.repeats, args.clock):.3f}"))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--models", default="all", help="comma-separated substrings of model names, or 'all'")
    p.add_argument("--no-pyreft", action="store_true")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None, help="default: cpu (process time) on a CPU, wall on a GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (1 is far faster on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    args.batch = args.batch or 8
    args.seq = args.seq or (256 if cuda else 64)
    args.inner = args.inner or (10 if cuda else 1)
    rows = []
    for name, cfg in MODELS.items():
        if args.models != "all" and not any(s in name for s in args.models.split(",")):
            continue
        rows += run_model(name, cfg, args)
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    title = f"ReFT speed on {dev}, batch {args.batch} x seq {args.seq}, {args.dtype}, medians of {args.repeats} ({args.clock} time)"
    print(f"\n{title}")
    for model in dict.fromkeys(r[0] for r in rows):
        record(f"{title}: {model}", [{"measure": what, "value": value} for m, what, value in rows if m == model])
    w = max(len(r[1]) for r in rows)
    last = None
    for model, what, value in rows:
        if model != last:
            print(f"\n{model}")
            last = model
        print(f"  {what:<{w}}  {value}")


if __name__ == "__main__":
    main()
