"""``[train]``: ReFT training, what ``steerlab train RUN.toml`` runs (its [reft] and [data] tables nest here)."""

from __future__ import annotations

from pathlib import Path

from steerlab.experiment.core import Context, Step, StepOutput, file_sha, register_step
from steerlab.training import TRAIN_KEYS

KEYS = {
    "reft": "table: the fields of steerlab.reft.ReftConfig (layers, rank, positions, intervention, ...)",
    "data": "table: file (JSONL or CSV rows prompt/response or text/label; relative to the experiment file), chat_template, system, max_length",
    "epochs": "training epochs (default 1)",
    "lr": "learning rate (default 4e-3)",
    "batch_size": "examples per step (default 8)",
    "gradient_accumulation_steps": "micro-batches of batch_size per optimiser step (default 1)",
    "weight_decay": "AdamW weight decay, never on the orthonormal maps (default 0)",
    "warmup_ratio": "fraction of steps of linear warm-up (default 0)",
    "seed": "seed of the initial weights and the data order (default: the experiment's seed)",
    "shuffle": "reshuffle every epoch (default true)",
    "log_every": "optimiser steps between loss readings, what the progress bar shows (default 10)",
    "checkpoint_every": "optimiser steps between checkpoints (default 50)",
    "keep_checkpoints": "checkpoints kept (default 2)",
}
# a key the training loop gains is a key of this table too, documented generically until described above
KEYS.update({k: f"see steerlab.training ({t.__name__})" for k, t in TRAIN_KEYS.items() if k not in KEYS})


def _config(table: dict, ctx: Context, out: Path):
    from steerlab.training import RunConfig

    table = dict(table)
    reft, data = table.pop("reft", {}), table.pop("data", {})
    table.setdefault("seed", ctx.seed)
    model = ctx.experiment.model
    raw = {"model": model["name"], "output_dir": str(out), "reft": reft, "data": data, "train": table,
           **{k: model[k] for k in ("dtype", "device") if k in model}}
    return RunConfig.from_dict(raw, base=ctx.base, where=f"{ctx.experiment.where} [train]", output_dir=out)


def parse(table: dict, ctx: Context):
    _config(table, ctx, Path("train"))  # every key and the data file checked now; built for real at run time
    return dict(table)


def plan(table: dict) -> str:
    reft = table.get("reft", {})
    return (f"ReFT training: {reft.get('intervention', 'LoReFT')} rank {reft.get('rank', '?')} at layers {reft.get('layers', '?')}, "
            f"positions {reft.get('positions', '?')!r}, on {table.get('data', {}).get('file')!r}, {table.get('epochs', 1)} epochs")


def run(table: dict, ctx: Context) -> StepOutput:
    from steerlab.training import train_from_config
    from steerlab.viz import save_html

    cfg = _config(table, ctx, ctx.out / "train")
    result = train_from_config(cfg, log=ctx.log)
    fig = result.plot()
    files = [p for p in (result.final, save_html(fig, cfg.output_dir / "training_curve.html")) if p is not None]
    summary = {"steps": result.steps, "first_loss": round(result.losses[0], 6) if result.losses else None,
               "last_loss": round(result.losses[-1], 6) if result.losses else None, "final": str(result.final) if result.final else None}
    return StepOutput(summary=summary, figures={"ReFT training loss": fig}, files=files, result=result,
                      inputs={f"data:{cfg.data_file.name}": file_sha(cfg.data_file)})


register_step(Step("train", parse=parse, run=run, plan=plan, keys=KEYS, order=40, needs_task=False, needs_lab=False,
                   doc="ReFT training (steerlab train's run file); saves train/final and train/training_curve.html"))
