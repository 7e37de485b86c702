"""xgrammar imported without transformers, for a server.

xgrammar's own import imports transformers only to name two tokenizer classes (for
``TokenizerInfo.from_huggingface``, which Pensieve does not call: ``grammar.build_tokenizer_info``
reads the vocabulary itself) and to subclass its ``LogitsProcessor`` (``xgrammar.contrib.hf``).
That import is ~14 MB of a CPU server's resident memory (transformers, huggingface_hub, httpx,
filelock; measured after Pensieve's own imports) and ~0.6 s of its start-up thread. A server
imports xgrammar with a stand-in ``transformers`` module in ``sys.modules``, removed right after:
a later ``import transformers`` gets the real package, only xgrammar's
``from_huggingface`` / ``contrib.hf`` keep the stand-in's empty classes. Library users and
tests import it plainly (``stand_in=False``).
"""

from __future__ import annotations

import sys
import types
from typing import Any


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("transformers", "a stand-in while xgrammar is imported")

    def attribute(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)  # no __path__ etc.: a submodule import fails plainly
        return type(name, (), {"__module__": "transformers"})

    module.__getattr__ = attribute  # type: ignore[attr-defined]
    return module


def import_xgrammar(stand_in: bool) -> Any:
    """``import xgrammar`` (ImportError when it is not installed); with ``stand_in`` and
    transformers not imported yet, under a stand-in transformers module (see the module doc)."""
    if not stand_in or "transformers" in sys.modules or "xgrammar" in sys.modules:
        import xgrammar

        return xgrammar
    module = _stand_in()
    sys.modules["transformers"] = module
    try:
        import xgrammar
    except ImportError:
        raise
    except Exception:  # a version that needs more of transformers at import: the plain import
        for name in [n for n in sys.modules if n == "xgrammar" or n.startswith("xgrammar.")]:
            del sys.modules[name]
        del sys.modules["transformers"]
        import xgrammar
    finally:
        if sys.modules.get("transformers") is module:
            del sys.modules["transformers"]
    return xgrammar
