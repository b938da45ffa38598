"""Embedding export: the files each tool reads, and the round-trip check that loads them in a fresh pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tuner.errors import TunerError
from tuner.export.embeddings import (
    artifact_files,
    check_embeddings,
    file_stem,
    fresh_pipeline,
    load_into,
    write_embeddings,
)
from tuner.models import FAMILIES

TOKEN = "<sks-cat>"


def _vectors(num_encoders: int, num_vectors: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_vectors, 32, generator=gen) for _ in range(num_encoders)]


def test_sd1_writes_diffusers_and_portable_files(tmp_path, tiny_models):
    vectors = _vectors(1, 3)
    files = write_embeddings(tmp_path, TOKEN, vectors, {"modelspec.title": "sks-cat"})
    assert [f.path.name for f in files] == ["learned_embeds.safetensors", "sks-cat.safetensors"]
    diffusers_file = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(diffusers_file) == [TOKEN] and torch.equal(diffusers_file[TOKEN], vectors[0])
    portable = load_file(tmp_path / "sks-cat.safetensors")
    assert list(portable) == ["emb_params"] and torch.equal(portable["emb_params"], vectors[0])
    with safe_open(tmp_path / "sks-cat.safetensors", "pt") as handle:
        assert handle.metadata()["modelspec.title"] == "sks-cat"
    assert check_embeddings(files, TOKEN, vectors, str(tiny_models["sd1"]), FAMILIES["sd1"]) == 0.0
    records = artifact_files(files, TOKEN, tmp_path)
    assert [r.path for r in records] == ["learned_embeds.safetensors", "sks-cat.safetensors"]
    assert 'sd["emb_params"], token="<sks-cat>"' in records[1].load and "A1111" in records[1].tools


def test_sdxl_writes_one_file_per_encoder_and_clip_l_clip_g(tmp_path, tiny_models):
    vectors = _vectors(2, 2)
    files = write_embeddings(tmp_path, TOKEN, vectors)
    names = [f.path.name for f in files]
    assert names == ["learned_embeds.safetensors", "learned_embeds_2.safetensors", "sks-cat.safetensors"]
    portable = load_file(tmp_path / "sks-cat.safetensors")
    assert set(portable) == {"clip_l", "clip_g"}
    assert torch.equal(portable["clip_l"], vectors[0]) and torch.equal(portable["clip_g"], vectors[1])
    assert torch.equal(load_file(tmp_path / "learned_embeds_2.safetensors")[TOKEN], vectors[1])
    assert check_embeddings(files, TOKEN, vectors, str(tiny_models["sdxl"]), FAMILIES["sdxl"]) == 0.0
    assert "text_encoder=pipe.text_encoder_2" in artifact_files(files, TOKEN, tmp_path)[1].load


def test_multi_vector_token_expands_at_load(tmp_path, tiny_models):
    vectors = _vectors(1, 3)
    files = write_embeddings(tmp_path, TOKEN, vectors)
    pipe = fresh_pipeline(str(tiny_models["sd1"]), FAMILIES["sd1"])
    load_into(pipe, files[0], TOKEN)
    assert pipe.maybe_convert_prompt(f"a photo of {TOKEN}", pipe.tokenizer) == (
        f"a photo of {TOKEN} {TOKEN}_1 {TOKEN}_2"
    )


def test_round_trip_failure_names_the_difference(tmp_path, tiny_models):
    vectors = _vectors(1, 1)
    files = write_embeddings(tmp_path, TOKEN, vectors)
    wrong = [vectors[0] + 0.25]
    with pytest.raises(TunerError, match="max difference 0.25"):
        check_embeddings(files, TOKEN, wrong, str(tiny_models["sd1"]), FAMILIES["sd1"])


def test_round_trip_failure_on_wrong_vector_count(tmp_path, tiny_models):
    files = write_embeddings(tmp_path, TOKEN, _vectors(1, 2))
    with pytest.raises(TunerError, match=r"as \(2, 32\) vectors, trained \(1, 32\)"):
        check_embeddings(files, TOKEN, _vectors(1, 1), str(tiny_models["sd1"]), FAMILIES["sd1"])


@pytest.mark.parametrize(
    ("token", "stem"),
    [
        ("<sks-cat>", "sks-cat"),
        ("<my style/v2>", "my-style-v2"),
        ("<>", "embedding"),
        ("learned_embeds", "learned_embeds_emb"),
    ],
)
def test_file_stem(token, stem):
    assert file_stem(token) == stem
