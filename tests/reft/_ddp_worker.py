"""Run by ``torch.distributed.run`` from test_ddp.py: a ReFT model trained by the Trainer on 2 CPU processes (gloo).

Also imported by the test for the one-process reference over the same global batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers as T

from steerlab import reft
from steerlab.models import embedded_path

STEPS, PER_DEVICE = 3, 2
PROMPTS = [f"Item {i}: name a word that rhymes with {w}." for i, w in enumerate("cat dog sun hat log run bat fog".split())] * 2
RESPONSES = [f"{w} rhymes." for w in "bat fog fun mat cog bun hat hog".split()] * 2


def build():
    tok = T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, pad_token_id=tok.pad_token_id, initializer_range=0.3)
    model = T.LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[0, 1], rank=2, positions="f1+l1", dropout=0.0), tokenizer=tok)
    ds = reft.InstructionDataset(tok, PROMPTS, RESPONSES, positions=rm.positions, chat_template=False)
    return rm, ds, tok


SEEN: list[list[int]] = []


def _record(module, args, kwargs):
    """Note which examples (by their real tokens) each training forward of this process ran on."""
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    SEEN.append([hash(tuple(r[m.bool()].tolist())) for r, m in zip(ids, mask)])


def run(out: Path, per_device: int, **extra) -> reft.ReftModel:
    rm, ds, tok = build()
    rm.register_forward_pre_hook(_record, with_kwargs=True)
    args = T.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=5e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        train_sampling_strategy="sequential", **extra,
    )
    trainer = reft.ReftTrainerForCausalLM(model=rm, args=args, train_dataset=ds)
    trainer.train()
    return rm


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    rm = run(out, PER_DEVICE, ddp_backend="gloo")
    rank = int(os.environ["RANK"])
    (out / f"seen.{rank}.json").write_text(json.dumps(SEEN))
    if rank == 0:
        rm.save_pretrained(out / "final")
    # both ranks leave together: a rank that exits while the other still holds the gloo group can be
    # aborted at interpreter shutdown ("terminate called without an active exception", seen in CI order)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
