"""A GGUF's token embedding and output layer on CUDA as their codes: no bfloat16 copies.

A Qwen3-8B Q4_K_M file's 151936 × 4096 token table (Q4_K) and output layer (Q6_K) are 0.35 and
0.51 GB as codes, 1.24 GB each in bfloat16. On CUDA:

* the output layer is the projection layer its format takes (``cuda_int8.cuda_codes_linear``:
  ``CudaInt4Linear``, ``CudaQ6KLinear``, ``CudaInt8Linear``), on the same kernels as the rest;
* the embedding is ``CudaCodesEmbedding`` over such a layer: a lookup gathers the codes and
  scales of the rows asked for and dequantises those alone (``rows``: a few torch ops, fixed
  shapes, no host sync, so decode CUDA graphs capture it);
* a tied pair is one layer: the embedding looks its rows up in the output layer's codes.

``plan`` picks the tables to keep (and dequantises the rest); ``swap_in`` puts them in place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from pensieve.backends.cuda_int8 import code_layout, cuda_codes_linear
from pensieve.loaders.int4_codes import Int8Groups
from pensieve.models.quant_linear import Int4Groups

log = logging.getLogger(__name__)

Codes = Int4Groups | Int8Groups
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class CudaCodesEmbedding(nn.Module):
    """Embedding lookup from a one-part code layer's rows (``table.rows(ids)``, float32), in
    the dtype the model was cast to (an empty float buffer ``model.to(dtype)`` converts)."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        if not hasattr(table, "rows"):
            raise TypeError(f"{type(table).__name__} has no row lookup")
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(ids.reshape(-1))
        return rows.to(self.dtype_probe.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.extra_repr()}"


def plan(int4: dict[str, Codes], int8: dict[str, tuple[torch.Tensor, torch.Tensor]], tied: bool
         ) -> tuple[dict[str, Codes], dict[str, torch.Tensor]]:
    """Take the embedding and output layer out of a checkpoint's kept codes (``int4``, and
    ``int8``: its Q8_0 tables as (codes, float16 scales); both changed in place): (HF name →
    codes kept for CUDA, HF name → float weight for the rest). A tied pair's one table is kept
    under the embedding's name."""
    tables: dict[str, Codes] = {n: int4.pop(n) for n in (EMBED, HEAD) if n in int4}
    for n in [n for n in (EMBED, HEAD) if n in int8]:
        codes, scales = int8.pop(n)
        tables[n] = Int8Groups(codes, scales, None, 32, "Q8_0")
    keep = {n: g for n, g in tables.items()
            if code_layout(g) is not None and not (tied and n == HEAD)}
    return keep, {n: g.dequantize() for n, g in tables.items() if n not in keep}


def swap_in(model: nn.Module, tables: Mapping[str, Codes], tied: bool) -> None:
    """Put ``plan``'s tables in place: the output layer as its code layer, the embedding as
    ``CudaCodesEmbedding`` (over the output layer's codes where tied)."""
    if not tables:
        return
    if EMBED in tables:
        table = cuda_codes_linear((tables[EMBED],))
        model.model.embed_tokens = CudaCodesEmbedding(table)
        if tied:
            model.lm_head = table
        else:  # looked up, never multiplied: no kernel plan or workspace for it
            table.lookup_only = True
    if HEAD in tables:
        model.lm_head = cuda_codes_linear((tables[HEAD],))
    log.info("CUDA tables kept as codes: %s%s", ", ".join(
        f"{n.split('.')[-2]} {getattr(g, 'ggml_type', '') or 'int4'}" for n, g in tables.items()),
        " (tied: one table)" if tied and EMBED in tables else "")
