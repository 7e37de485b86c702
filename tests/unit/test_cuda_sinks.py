"""The Triton paged decode and short-chunk kernels with a sliding window and attention sinks
(gpt-oss), against ``attend_with_sinks`` (the CPU path, itself checked against transformers'
formula): in the Triton interpreter on the CPU, compiled where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_interpreter import run_in_triton_interpreter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from pensieve.backends.cuda_attention import DecodeBatch, paged_decode
    from pensieve.models.sink_attention import attend_with_sinks

    g = torch.Generator().manual_seed(0)
    hq, hk, d, page = 8, 2, 16, 4
    lens = [1, 5, 12, 37]
    num_blocks = sum(-(-n // page) for n in lens) + 3
    k = torch.randn(num_blocks, page, hk, d, generator=g)
    v = torch.randn(num_blocks, page, hk, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(perm[used:used + -(-n // page)])
        used += len(tables[-1])
    bt = torch.zeros(len(lens), max(map(len, tables)) + 1, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t)
    q = torch.randn(len(lens), hq, d, generator=g)
    sinks = 2 * torch.randn(hq, generator=g)
    dev = lambda x: x.to(device)  # noqa: E731
    for window, with_sinks, splits in ((None, True, 1), (8, True, 3), (8, False, 2),
                                       (None, False, 4)):
        meta = DecodeBatch(dev(bt), dev(torch.tensor(lens, dtype=torch.int32)), splits)
        out = paged_decode(dev(q).to(dtype), dev(k).to(dtype), dev(v).to(dtype), meta,
                           window=window, sinks=dev(sinks) if with_sinks else None)
        for i, n in enumerate(lens):
            idx = torch.tensor(tables[i])
            keys = k[idx].reshape(-1, hk, d)[:n]
            values = v[idx].reshape(-1, hk, d)[:n]
            if window is not None:
                keys, values = keys[-window:], values[-window:]
            s = sinks if with_sinks else torch.full((hq,), -1e30)
            ref = attend_with_sinks(q[i:i + 1].double(), keys.double(), values.double(),
                                    s.double(), None)
            err = ((out[i:i + 1].double().cpu() - ref).norm() / ref.norm()).item()
            assert err < tol, (window, with_sinks, splits, n, err)


def check_chunk(device: str, dtype: torch.dtype, tol: float) -> None:
    """A follow-up chunk of new tokens after a cached prefix, padded rows included."""
    from pensieve.backends.cuda_attention import ChunkBatch, paged_chunk
    from pensieve.models.sink_attention import attend_with_sinks

    g = torch.Generator().manual_seed(1)
    hq, hk, d, page, total = 8, 2, 16, 4, 60
    k = torch.randn(total // page + 2, page, hk, d, generator=g)
    v = torch.randn(total // page + 2, page, hk, d, generator=g)
    table = torch.randperm(k.shape[0], generator=g)[: total // page].to(torch.int32)
    keys_all = k[table.long()].reshape(-1, hk, d)
    values_all = v[table.long()].reshape(-1, hk, d)
    sinks = 2 * torch.randn(hq, generator=g)
    for start, n, rows, splits, window, with_sinks in (
            (0, 5, 8, 1, 4, True), (37, 13, 16, 3, 8, True), (20, 7, 8, 2, None, True),
            (29, 9, 16, 2, 6, False)):
        q = torch.randn(rows, hq, d, generator=g)
        meta = ChunkBatch(table.to(device), torch.tensor([start], dtype=torch.int32).to(device),
                          torch.tensor([n], dtype=torch.int32).to(device), splits)
        out = paged_chunk(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), meta,
                          window=window, sinks=sinks.to(device) if with_sinks else None)
        ctx = start + n
        rows_ = torch.arange(n).unsqueeze(1) + start
        cols = torch.arange(ctx).unsqueeze(0)
        hidden = cols > rows_
        if window is not None:
            hidden |= cols <= rows_ - window
        mask = torch.zeros(n, ctx, dtype=torch.float64).masked_fill(hidden, float("-inf"))
        s = sinks if with_sinks else torch.full((hq,), -1e30)
        ref = attend_with_sinks(q[:n].double(), keys_all[:ctx].double(),
                                values_all[:ctx].double(), s.double(), mask)
        err = ((out[:n].double().cpu() - ref).norm() / ref.norm()).item()
        assert err < tol, (start, n, window, with_sinks, err)


def test_decode_and_chunk_with_window_and_sinks_in_the_triton_interpreter():
    run_in_triton_interpreter("import torch; from tests.unit.test_cuda_sinks import check, "
                              "check_chunk; check('cpu', torch.float32, 1e-5); "
                              "check_chunk('cpu', torch.float32, 1e-5); print('ok')")


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_decode_and_chunk_with_window_and_sinks(dtype, tol):
    check("cuda", dtype, tol)
    check_chunk("cuda", dtype, tol)
