"""A tiny random Llama and a byte tokenizer: an engine that runs in milliseconds on CPU."""

from __future__ import annotations

from typing import Sequence

import torch

from pensieve.engine.config import EngineConfig
from pensieve.backends.torch_backend import torch_engine
from pensieve.engine.engine import Engine
from pensieve.models.args import ModelArgs
from pensieve.models.llama import LlamaForCausalLM

EOS = 256


class ByteTokenizer:
    """ids 0..255 are bytes, 256 is end of turn. Real enough to split UTF-8 characters."""

    bos_token = None
    eos_token = "<eos>"
    bos_token_id = None
    eos_token_ids = frozenset({EOS})
    add_bos = False
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        return self.eos_token if token_id == EOS else self.decode([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id == EOS


def tiny_args(vocab_size: int = 257) -> ModelArgs:
    return ModelArgs(
        architecture="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
    )


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_args()).eval()
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def tiny_engine(**overrides) -> Engine:
    cfg = dict(context_length=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    cfg.update(overrides)
    return torch_engine(tiny_model(), tiny_args(), ByteTokenizer(), EngineConfig(**cfg))
