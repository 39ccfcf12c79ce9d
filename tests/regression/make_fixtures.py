"""Write the file-format regression fixtures of a released steerlab version (RELIABILITY row 12).

    python tests/regression/make_fixtures.py v1    # once per released file-format version; commit the folder

Into ``tests/regression/<version>/``: a tiny LLaMA (its own safetensors, so the fixture does not
depend on how a future torch initialises weights), interventions of every serialisable type with
trained-looking (non-default) weights saved by ``lab.save``, a run graph, a ``Subspace``, a
``ReftModel`` (LoReFT + DiReFT) saved by ``save_pretrained``, from version 2 on also a ``DASResult``,
a ``SearchResult`` and a patching ``SweepResult``, and ``expected.safetensors``: the outputs each
produced when it was saved (the sweep: its values). ``test_old_files.py`` loads every version's files with
today's code and requires the same outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

import steerlab as sl
from steerlab import reft
from steerlab.alignment import IIA, Curve, DASResult, SearchResult

HERE = Path(__file__).resolve().parent
SITE = "blocks.1.resid_post"


def model() -> T.PreTrainedModel:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval()


def inputs() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    base = {"input_ids": torch.randint(3, 90, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    base["attention_mask"][1, :2] = 0  # left padding on the second row
    source = {"input_ids": torch.randint(3, 90, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    return base, source


def interventions(lab, base, source) -> list[sl.Intervention]:
    """One of each serialisable type, built by a first run, weights then moved off their initial values."""
    d = lab.d_model
    g = torch.Generator().manual_seed(2)
    ivs = [
        sl.Interchange(SITE, positions=[-1]),
        sl.SubspaceInterchange(SITE, size=3, positions=[-1]),
        sl.BoundlessSubspaceInterchange("blocks.0.resid_post", positions=[-1], init_boundary=0.3, temperature=0.5),
        sl.SigmoidMask("blocks.2.resid_pre", positions=[-1], init=-1.0),
        sl.Add("blocks.0.mlp.out", positions=[-1], trainable=True, width=d, alpha=2.0),
        sl.Zero("blocks.1.attn.z", heads=[1], positions=[0, -1]),
        sl.Mean("blocks.2.mlp.out", torch.randn(d, generator=g), positions=[-1]),
        sl.Scale("blocks.2.attn.out", factor=0.5),
        sl.Noise("blocks.0.resid_pre", std=0.5, seed=3, positions=[0, -1]),
    ]
    logits_with(lab, ivs, base, source)
    with torch.no_grad():
        for iv in ivs:
            for p in iv.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ivs


def reft_interventions(d: int) -> list:
    torch.manual_seed(3)
    ivs = [reft.LoReFT("blocks.1.resid_post", rank=2, width=d, positions="f1+l1"),
           reft.DiReFT("blocks.2.resid_post", rank=2, width=d, positions="l2")]
    with torch.no_grad():
        for iv in ivs:
            for name, p in iv.named_parameters():
                if "rotate" not in name and "parametriz" not in name:
                    p.add_(0.3 * torch.randn_like(p))
    return ivs


def sweep_source(base: dict, source: dict) -> dict:
    """The source's tokens under the base's padding: every position aligns, and the padded row leaves cells empty."""
    return {"input_ids": source["input_ids"], "attention_mask": base["attention_mask"]}


def das_result(lab) -> DASResult:
    """A DAS result as a fit reports it (two variables, controls, curves), bases from a fixed seed."""
    g = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(lab.d_model, 5, generator=g))[0].T
    subs = {"X": sl.Subspace(q[:2], SITE, positions=[-1], metadata={"variable": "X", "iia": 0.81}),
            "Y": sl.Subspace(q[2:], SITE, positions=[-1], metadata={"variable": "Y", "iia": 0.77})}
    iia = lambda v: IIA(v, 200, 0.5)  # noqa: E731
    curve = Curve(loss=[1.2, 0.7, 0.4], epoch_step=[3], epoch_iia=[0.8], temperature=[], size=[])
    return DASResult(site=SITE, positions=[-1], variables=("X", "Y"), sizes={"X": 2, "Y": 3}, subspaces=subs,
                     iia={"X": iia(0.81), "Y": iia(0.77), "all": iia(0.79)}, full_vector={"X": iia(0.9), "Y": iia(0.88)},
                     curve=curve, random_init={"all": iia(0.52)}, random_init_curve=curve, localist={"all": iia(0.6)},
                     localist_method="exhaustive", localist_dims={"X": [0, 1], "Y": [2, 3, 4]}, config={"lr": 0.01},
                     timings={"fit": 1.5}, fingerprint=lab.fingerprint())


def logits_with(lab, ivs, base, source) -> torch.Tensor:
    """Outputs of ``ivs`` (as saved: sourced ones without a source) with ``source`` as every source run."""
    for iv in ivs:
        if iv.sourced:
            iv.source = source
    try:
        return lab.run(base, ivs).logits
    finally:
        for iv in ivs:
            if iv.sourced:
                iv.source = None


def main(version: str) -> None:
    torch.set_num_threads(1)
    out = HERE / version
    if out.exists():
        sys.exit(f"{out} exists: a released version's fixtures are never rewritten")
    m = model()
    m.save_pretrained(out / "model")
    base, source = inputs()
    lab = sl.wrap(m)
    d = lab.d_model
    ivs = interventions(lab, base, source)
    lab.save(out / "interventions", ivs)
    expected = {"interventions": logits_with(lab, ivs, base, source)}
    g = sl.Graph()
    src = g.run(source, name="source")
    mid = g.run(base, [sl.Interchange("blocks.0.resid_post", positions=[-1], source=src)], name="mid")
    patched = g.run(base, [sl.SubspaceInterchange("blocks.2.resid_post", size=2, positions=[-1], source=mid)], name="patched")
    lab.execute(g)  # builds the subspace interchange (its width comes from the site)
    expected["graph"] = lab.execute(g)[patched].logits
    lab.save(out / "graph", g)
    sub = sl.Subspace(torch.linalg.qr(torch.randn(d, 4, generator=torch.Generator().manual_seed(5)))[0].T, SITE, positions=[-1],
                      metadata={"variable": "X", "iia": 0.9})
    sub.save(out / "subspace")
    expected["subspace"] = logits_with(lab, [sub.intervention()], base, source)
    lab.unwrap()
    rm = reft.get_reft_model(m, reft_interventions(d))
    with torch.no_grad():
        expected["reft"] = rm(**base).logits
    rm.save_pretrained(out / "reft")
    rm.unwrap()
    if version != "v1":
        lab = sl.wrap(m)
        res = das_result(lab)
        res.save(out / "das_result")
        expected["das_result"] = logits_with(lab, [res.intervention("X")], base, source)
        SearchResult([res], res.variables, {"sizes": [2, 3]}, {"total": 2.5}, {SITE: 1}, lab.fingerprint()).save(out / "das_search")
        sweep = sl.sweep(lab, base, sweep_source(base, source), sites=["blocks.0.resid_post", "blocks.2.mlp.out"], metric=sl.metrics.logit_diff(5, 7))
        sweep.save(out / "sweep", fingerprint=lab.fingerprint())
        expected["sweep"] = sweep.values
        lab.unwrap()
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v1")
