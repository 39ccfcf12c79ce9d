"""``python -m steerlab.data`` (the same as ``steerlab fetch``): fetch every data archive once, ahead of time.

The loaders themselves (``polarity``, ``french``, ``snippets``, ``read_rows``, ...) live in
:mod:`steerlab.reft.corpora`, beside the steering evaluation that reads them; they are
re-exported here, where the setup step and earlier code find them.
"""

from __future__ import annotations

from steerlab.reft.corpora import *  # noqa: F403 - the public names, re-exported
from steerlab.reft.corpora import __all__, prefetch  # noqa: F401

if __name__ == "__main__":  # python -m steerlab.data: the setup step that fetches the data archives
    for path in prefetch():
        print(f"cached {path}")
