"""engine/xgrammar_import: a server imports xgrammar without transformers, and xgrammar works."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def test_xgrammar_imported_for_a_server_without_transformers():
    pytest.importorskip("xgrammar")
    code = textwrap.dedent("""
        import sys
        from pensieve.engine import grammar
        assert grammar.grammar_available(server=True)
        assert "transformers" not in sys.modules and "huggingface_hub" not in sys.modules
        info = grammar.xgr.TokenizerInfo(["a", "b", "</s>"], grammar.xgr.VocabType.RAW,
                                         vocab_size=3, stop_token_ids=[2])
        comp = grammar.xgr.GrammarCompiler(info)
        assert comp.compile_json_schema('{"type": "integer"}') is not None
        import transformers  # the real package afterwards
        assert hasattr(transformers, "PreTrainedTokenizerFast") and transformers.__file__
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
