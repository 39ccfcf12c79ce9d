"""steerlab: locate causal subspaces with DAS, steer with ReFT, in one vocabulary.

The public face: everything a notebook needs is importable from here.
``import steerlab`` changes nothing global; nnsight, peft and kaleido are
imported only where used.
"""

from steerlab.interventions import *  # noqa: F403 - re-export the base layer's public API
from steerlab.interventions import __all__ as _base

__version__ = "0.1.0"

__all__ = [*_base, "__version__"]

from steerlab.models import ModelNotFound, load  # noqa: E402

__all__ += ["load", "ModelNotFound"]

# the upper layers load on first use (`sl.viz.patching_heatmap`, `sl.reft.LoReFT`), so that
# `import steerlab` stays light and a layer is imported only by those who use it
_LAZY = ("viz", "alignment", "reft")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"steerlab.{name}")
    raise AttributeError(f"module 'steerlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
