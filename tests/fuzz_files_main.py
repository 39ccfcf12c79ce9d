"""Which mutated saves another steerlab accepts: the measurement behind ``tests/fuzz_files_main.json``.

    python -m tests.test_fuzz_files --write /tmp/mutated                  # with this checkout
    PYTHONPATH=<a steerlab tree> python tests/fuzz_files_main.py /tmp/mutated > tests/fuzz_files_main.json

The second command runs with whichever steerlab ``PYTHONPATH`` puts first
(for the record in this repository: the code before file-format version 2,
arranged as an installed ``steerlab`` package). Each load runs in a forked
child with a 2 GB address-space cap; the output lists the mutation ids
whose load returned without an error. It uses only the public loaders both
versions share.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch
import transformers as T

import steerlab as sl
from steerlab import reft
from steerlab.alignment import DASResult, SearchResult

HERE = Path(__file__).resolve().parent


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    model_a = T.LlamaForCausalLM.from_pretrained(HERE / "regression" / "v1" / "model").eval()
    model_b = T.LlamaForCausalLM.from_pretrained(HERE / "regression" / "v1" / "model").eval()
    lab = sl.wrap(model_a)
    fp = lab.fingerprint()
    loaders = {
        "interventions": lambda d: lab.load_interventions(d),
        "graph": lambda d: lab.load_graph(d),
        "subspace": lambda d: sl.Subspace.load(d, fingerprint=fp),
        "reft": lambda d: reft.ReftModel.from_pretrained(d, model_b),
        "das_result": lambda d: DASResult.load(d, fingerprint=fp),
        "das_search": lambda d: SearchResult.load(d, fingerprint=fp),
    }
    accepted, tried = [], 0
    for id_file in sorted(folder.glob("*.id")):
        loader, mid = id_file.read_text().split("\n")[:2]
        tried += 1
        pid = os.fork()
        if pid == 0:
            resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY))
            try:
                loaders[loader](folder / id_file.stem)
            except BaseException:  # noqa: BLE001 - refused, whatever the way
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            accepted.append(mid)
    print(json.dumps({"steerlab": sl.__file__, "tried": tried, "accepted": accepted}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
