"""Tiny byte-level BPE tokenizers with a chat format's special tokens (gpt-oss's harmony
markers, GLM's, Gemma 4's), as ``TextTokenizer``s: for grammar tests and tiny engines that must write
those markers as single tokens, the way the real vocabularies do."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pensieve.loaders.tokenizer import TextTokenizer

HARMONY_SPECIALS = ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                    "<|constrain|>", "<|return|>", "<|call|>")
GLM_SPECIALS = ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                "</arg_key>", "<arg_value>", "</arg_value>")
GEMMA4_SPECIALS = ("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>",
                   "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>", "<channel|>",
                   "<|think|>")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Weather in Paris is sunny, 21 degrees.",
    'functions.get_weather commentary analysis final json {"city": "Paris", "days": 2}',
    "You are a helpful assistant. Reasoning: medium. Valid channels: analysis, commentary, final.",
    "city days location unit celsius fahrenheit string number integer boolean object array",
]


def tiny_special_tokenizer(specials: tuple[str, ...], *, eos: str, extra_eos: tuple[str, ...] = (),
                           vocab_size: int = 600) -> TextTokenizer:
    """A ~``vocab_size``-token byte-level BPE whose first ids are ``specials`` (control tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    extra = [tok.token_to_id(t) for t in extra_eos]
    return TextTokenizer(tok, bos_token=None, eos_token=eos, add_bos=False,
                         extra_eos_ids=[i for i in extra if i is not None])


def harmony_tokenizer() -> TextTokenizer:
    """gpt-oss's markers; ``<|return|>`` is the EOS (as in its tokenizer_config)."""
    return tiny_special_tokenizer(HARMONY_SPECIALS, eos="<|return|>")


def gemma4_tokenizer() -> TextTokenizer:
    """Gemma 4's markers; a turn ends on ``<eos>`` or ``<turn|>``."""
    return tiny_special_tokenizer(GEMMA4_SPECIALS, eos="<eos>", extra_eos=("<turn|>",))


def glm_tokenizer() -> TextTokenizer:
    """GLM-4.x's markers; a turn ends on ``<|endoftext|>``, ``<|user|>`` or ``<|observation|>``
    (its generation_config's eos ids)."""
    return tiny_special_tokenizer(GLM_SPECIALS, eos="<|endoftext|>", extra_eos=("<|user|>", "<|observation|>"))


def grammar_accepts(compiler, spec, text: str, *, complete: bool = True) -> bool:  # noqa: ANN001
    """Whether the grammar compiled from ``spec`` by ``compiler`` (a ``(tokenizer,
    GrammarCompiler)`` pair) accepts ``text`` token by token (and, with ``complete``, ends there)."""
    import xgrammar as xgr

    tok, comp = compiler
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    matcher = xgr.GrammarMatcher(comp.compile(spec))
    return all(matcher.accept_token(i) for i in ids) and (matcher.is_completed() or not complete)
