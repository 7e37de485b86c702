"""Text ⇄ token ids, over a ``tokenizers.Tokenizer`` built from GGUF metadata or tokenizer.json.

CONTRACT (filled in by the loaders work):

class TextTokenizer:
    bos_token: str | None; eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: frozenset[int]      # every id that ends a turn (eos, <|im_end|>, <|eot_id|> …)
    add_bos: bool                      # whether prompts start with BOS (GGUF add_bos_token)
    vocab_size: int
    def encode(self, text: str) -> list[int]     # special tokens written in text ARE parsed as
                                                 # specials; BOS is NOT added (templates add it)
    def decode(self, ids: Sequence[int]) -> str  # specials kept (skip_special_tokens=False)
    def id_to_piece(self, token_id: int) -> str
    def is_special(self, token_id: int) -> bool
"""
