"""Run a model the way the engine does, for exactness tests against a reference: one sequence's
prefill over a paged KV cache with a shuffled block table (whole, or chunked then decoded token
by token), and greedy generation through the real engine."""

from __future__ import annotations

import torch

from pensieve.backends.torch_backend import torch_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams
from pensieve.models.forward_context import ForwardContext, SequenceSlice

BLOCK = 4


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    """``n`` random ids past the three special ones."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, ids: list[int], start: int, blocks: list[int], kv) -> torch.Tensor:  # noqa: ANN001
    """Feed ids[start:] of one sequence whose KV lives in ``blocks``; logits of every row."""
    n = len(ids) - start
    slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, len(ids))])
    seq = SequenceSlice(0, n, len(ids), torch.tensor(blocks))
    ctx = ForwardContext(kv[0], kv[1], slots, [seq], torch.arange(n))
    with torch.no_grad():
        return model(torch.tensor(ids[start:]), torch.arange(start, len(ids)), ctx)


def paged_logits(model, args, ids: list[int], chunks: list[int], layout=None  # noqa: ANN001
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole prefill, chunked prefill at ``chunks`` then one decode per remaining token),
    each over its own cache with a shuffled block table. ``layout``: the family's per-layer
    ``PagedKV`` shapes (``Family.cache_layout``); None: every layer
    ``[num_kv_heads, head_dim]``."""
    blocks = torch.randperm(64, generator=torch.Generator().manual_seed(1))[: -(-len(ids) // BLOCK)]
    blocks = blocks.tolist()

    def cache():  # noqa: ANN202
        if layout is not None:
            return ([torch.zeros(64, BLOCK, c.kv_heads, c.head_dim) for c in layout],
                    [torch.zeros(64, BLOCK, c.kv_heads, c.v_head_dim) for c in layout])
        shape = (64, BLOCK, args.num_kv_heads, args.head_dim)
        return [torch.zeros(shape) for _ in range(args.num_layers)], [
            torch.zeros(shape) for _ in range(args.num_layers)]

    whole = run(model, ids, 0, blocks, cache())
    kv, parts, start = cache(), [], 0
    for end in [*chunks, *range(chunks[-1] + 1, len(ids) + 1)]:
        parts.append(run(model, ids[:end], start, blocks, kv))
        start = end
    return whole, torch.cat(parts)


def engine_tokens(model, ckpt, context: int, ids: list[int], steps: int) -> list[int]:  # noqa: ANN001
    """Greedy tokens of the real engine (paged KV, chunked prefill) for ``ids``."""
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, EngineConfig(
        context_length=context, block_size=BLOCK, max_num_seqs=2, max_num_batched_tokens=16))
    engine.add_request("r", ids, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.has_work():
        for delta in engine.step():
            out.extend(delta.token_ids)
    return out
