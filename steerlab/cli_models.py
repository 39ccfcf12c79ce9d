"""Loading the model a command names: shared by the ``steerlab`` command and its subcommands' modules.

Kept apart from ``cli.py`` so a subcommand written in its own module (``steer_eval_cli.py``) loads
models the same way without importing the CLI back (no import cycle).
"""

from __future__ import annotations

import argparse

from steerlab.interventions.errors import ConfigError, SteerlabError

__all__ = ["load_lab"]


def load_lab(args: argparse.Namespace):
    """``wrap(*load(MODEL))``, with the reasons a model cannot be found said in one line."""
    import torch

    import steerlab as sl
    from steerlab.models import resolve_model

    name = args.model
    resolve_model(name)  # a name that cannot be found fails here, at once, with the near match
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per command is noise on a terminal
    try:
        model, tok = sl.load(name, dtype=getattr(torch, args.dtype), device=args.device, task=getattr(args, "task", None))
    except SteerlabError:
        raise
    except (OSError, ValueError) as e:  # transformers' "not a valid model identifier" and friends: several lines, keep the first
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"cannot load model {name!r}: {first.strip()}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return sl.wrap(model, tok)
