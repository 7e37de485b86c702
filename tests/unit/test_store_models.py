"""The model store: manifests, sampling defaults, names, resolve_model, local imports, the
hub file choice and the split-GGUF merge (pensieve/store/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pensieve.store import ModelNotFound, ModelNotPulled, ModelStore, SamplingDefaults, \
    StoreError, resolve_manifest, resolve_model
from pensieve.store.catalogue import CATALOGUE, lookup
from pensieve.store.gguf_merge import merge_gguf
from pensieve.store.hub import HubFile, HubSource, choose_files, parse_hub
from pensieve.store.local import import_path
from pensieve.store.manifest import Manifest, describe
from pensieve.store.pull import PullOptions, pull
from pensieve.store.sampling import from_generation_config, known_file_params


def tiny_gguf(path: Path, *, tensors: int = 3, context: int = 256) -> Path:
    """A small real GGUF (llama metadata, a few F32/F16 tensors) written with ``gguf``."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_block_count(1)
    w.add_string("general.name", "tiny")
    rng = np.random.default_rng(0)
    for i in range(tensors):
        dtype = np.float32 if i % 2 == 0 else np.float16
        w.add_tensor(f"blk.0.t{i}.weight", rng.standard_normal((3 + i, 32)).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_manifest_round_trips_through_json() -> None:
    m = Manifest(name="a:1b", source="hf:o/r", format="gguf", entry="a.gguf", sha256="ab" * 32,
                 size=10, architecture="llama", context_length=4096,
                 params=SamplingDefaults(temperature=0.3, top_k=40))
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    assert m.to_json()["params"] == {"temperature": 0.3, "top_k": 40}


def test_sampling_defaults_validate_merge_and_read_generation_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SamplingDefaults(temperature=3.0)
    with pytest.raises(ValueError):
        SamplingDefaults.from_json({"temprature": 0.5})
    merged = SamplingDefaults(temperature=0.1).over(SamplingDefaults(temperature=0.9, top_p=0.8))
    assert merged == SamplingDefaults(temperature=0.1, top_p=0.8)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
         "repetition_penalty": 1.05}))
    assert from_generation_config(tmp_path) == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 5}))
    assert from_generation_config(tmp_path) == SamplingDefaults(temperature=0.0)
    assert from_generation_config(tmp_path / "missing") == SamplingDefaults()


def test_the_default_model_file_gets_the_catalogue_defaults() -> None:
    from pensieve.loaders.default_model import default_model_path

    params = known_file_params(default_model_path())
    assert params == CATALOGUE["smollm2:135m"].params
    assert params.temperature is not None and params.temperature < 1.0


def test_catalogue_names_and_stems() -> None:
    for name in ("qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b", "gemma3:270m", "smollm2:135m",
                 "qwen3-coder:30b", "phi3:mini", "gpt-oss:20b"):
        entry = lookup(name)
        assert entry is not None and entry.name == name
        assert entry.source.startswith(("pypi:", "hf:"))
        if entry.source.startswith("pypi:"):
            assert entry.parted is not None and len(entry.parted.sha256) == 64
    assert lookup("smollm2").name == "smollm2:135m"  # one entry has that stem
    assert lookup("qwen2.5-coder") is None  # several do


def test_store_resolves_paths_names_and_says_what_to_do(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    model = tiny_gguf(tmp_path / "tiny.gguf")
    assert resolve_model(model, store) == model  # an existing path wins
    manifest = pull(str(model), store, PullOptions(name="tiny:1m"))
    path, found = resolve_manifest("tiny:1m", store)
    assert found == manifest and path.read_bytes() == model.read_bytes()
    assert (manifest.format, manifest.architecture, manifest.context_length) == ("gguf", "llama", 256)
    assert [m.name for m in store.list()] == ["tiny:1m"]
    with pytest.raises(ModelNotPulled, match="pensieve pull smollm2:135m"):
        resolve_model("smollm2:135m", store)
    with pytest.raises(ModelNotFound, match="pensieve models"):
        resolve_model("no-such-model", store)
    assert store.remove("tiny:1m") == manifest
    assert store.list() == [] and model.is_file()
    with pytest.raises(ModelNotFound):
        store.remove("tiny:1m")
    with pytest.raises(StoreError, match="invalid model name"):
        pull(str(model), store, PullOptions(name="../escape"))


def test_local_import_hardlinks_copies_or_symlinks(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "m.gguf")
    for mode, expect in (("auto", "hardlink"), ("copy", "copy"), ("symlink", "symlink")):
        staging = tmp_path / mode
        staging.mkdir()
        entry, used = import_path(model, staging, mode)
        target = staging / entry
        assert used == expect
        assert target.read_bytes() == model.read_bytes()
        assert target.is_symlink() == (mode == "symlink")
        same_inode = os.stat(target).st_ino == os.stat(model).st_ino
        assert same_inode == (mode != "copy")
    with pytest.raises(StoreError, match="not a GGUF"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"nope")
        import_path(bad, tmp_path / "auto", "auto")


def test_a_folder_import_reads_config_and_generation_config(tmp_path: Path) -> None:
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "max_position_embeddings": 32768}))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    store = ModelStore(tmp_path / "store")
    m = pull(str(folder), store, PullOptions(params=SamplingDefaults(top_k=30)))
    assert (m.format, m.architecture, m.context_length, m.entry) == ("hf", "qwen2", 32768, ".")
    assert m.params == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=30)
    assert {f.name for f in m.files} == {"config.json", "generation_config.json", "model.safetensors"}
    assert resolve_model(m.name, store) == store.folder(m.name).resolve()
    assert describe(folder)[0] == "hf"


def _files(*names: str) -> dict[str, HubFile]:
    return {n: HubFile(n, 1, None) for n in names}


def test_hub_sources_pick_one_gguf_by_file_or_quant_tag() -> None:
    assert parse_hub("org/repo@v2:Q4_K_M") == HubSource("org/repo", "Q4_K_M", "v2")
    with pytest.raises(StoreError, match="hf:ORG/REPO"):
        parse_hub("just-a-name")
    files = _files("m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md",
                   "big-Q4_K_M-00002-of-00002.gguf", "big-Q4_K_M-00001-of-00002.gguf")
    assert choose_files(HubSource("o/m", "Q8_0"), files) == ["m-Q8_0.gguf"]
    assert choose_files(HubSource("o/m", "q8_0"), files) == ["m-Q8_0.gguf"]
    assert choose_files(HubSource("o/m", "big-Q4_K_M-00001-of-00002.gguf"), files) == [
        "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(StoreError, match="matches 2 GGUFs"):
        choose_files(HubSource("o/m", "Q4_K_M"), files)
    with pytest.raises(StoreError, match="quant tags there"):
        choose_files(HubSource("o/m", "Q2_K"), files)
    with pytest.raises(StoreError, match="pick one"):
        choose_files(HubSource("o/m"), files)
    with pytest.raises(StoreError, match="shards"):
        choose_files(HubSource("o/m", "x-00001-of-00003.gguf"),
                     _files("x-00001-of-00003.gguf", "x-00003-of-00003.gguf"))
    folder = _files("config.json", "model-00001-of-00002.safetensors", "tokenizer.json",
                    "original/consolidated.pth", ".gitattributes", "README.md")
    assert choose_files(HubSource("o/m"), folder) == [
        "config.json", "model-00001-of-00002.safetensors", "tokenizer.json"]


def split_gguf(source: Path, stem: Path, max_tensors: int) -> list[Path]:
    """``source`` split by ``gguf``'s own writer (llama.cpp's split layout and keys)."""
    import gguf

    r = gguf.GGUFReader(str(source))
    w = gguf.GGUFWriter(f"{stem}.gguf", str(r.fields["general.architecture"].contents()),
                        split_max_tensors=max_tensors)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), kind, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(stem.parent.glob(f"{stem.name}-*-of-*.gguf"))


def test_split_gguf_merges_back_to_the_same_model(tmp_path: Path) -> None:
    from pensieve.loaders.gguf_file import GGUFFile

    original = tiny_gguf(tmp_path / "orig.gguf", tensors=5)
    shards = split_gguf(original, tmp_path / "m", max_tensors=2)
    assert len(shards) == 3
    assert GGUFFile(shards[0]).get("split.count") == 3
    merged = tmp_path / "merged.gguf"
    merge_gguf(shards, merged)
    a, b = GGUFFile(original), GGUFFile(merged)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].shape == b.tensors[name].shape
        assert bytes(a.raw(name).numpy()) == bytes(b.raw(name).numpy())
    assert dict(a.metadata.items()) == dict(b.metadata.items())  # split.* keys dropped
    with pytest.raises(StoreError, match="3 shards"):
        merge_gguf(shards[:2], tmp_path / "short.gguf")


def test_a_pinned_pull_already_done_is_not_repeated_and_pulls_do_not_overlap(
        tmp_path: Path) -> None:
    import fcntl
    import hashlib

    model = tiny_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    store = ModelStore(tmp_path / "store")
    source = f"pypi:unused=={1}"  # never fetched: the stored copy already has the pinned hash
    first = pull(str(model), store, PullOptions(name="t", sha256=sha))
    assert pull(source, store, PullOptions(name="t", sha256=sha)) == first
    tuned = pull(source, store, PullOptions(name="t", sha256=sha,
                                            params=SamplingDefaults(temperature=0.5)))
    assert tuned.params.temperature == 0.5 and store.get("t").params.temperature == 0.5
    with pytest.raises(StoreError, match="differs from the expected"):
        pull(str(model), store, PullOptions(name="u", sha256="0" * 64))
    assert store.get("u") is None
    lock = store.root / f".{store.folder('v').name}.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another `pensieve pull` of v is running"):
            pull(str(model), store, PullOptions(name="v"))
