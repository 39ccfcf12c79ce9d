"""steerlab: locate causal subspaces with DAS, steer with ReFT, in one vocabulary.

The public face: everything a notebook needs is importable from here.
``import steerlab`` changes nothing global; nnsight, peft and kaleido are
imported only where used.
"""

from steerlab.interventions import *  # noqa: F403 - re-export the base layer's public API
from steerlab.interventions import __all__ as _base

__version__ = "0.1.0"

__all__ = [*_base, "__version__"]

from steerlab.models import load  # noqa: E402

__all__ += ["load"]
