"""Parts freed after caching: their memory goes, they come back bit for bit (for validation, or by themselves when
called), and a run names what it freed in its header."""

from __future__ import annotations

import pytest
import torch

from tuner import offload
from tuner.tiny import tiny_text_encoder, tiny_vae


def storage_bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])


def test_a_freed_module_holds_no_memory_and_comes_back_bit_for_bit(tmp_path):
    encoder = tiny_text_encoder(64).requires_grad_(False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = encoder(ids).last_hidden_state
    params = list(encoder.parameters())
    size = offload.tensor_bytes(encoder)
    assert offload.free(encoder, torch.device("cpu"), tmp_path, "text_encoder") == size > 0
    assert offload.is_freed(encoder) and storage_bytes(encoder) == 0
    assert len(list(tmp_path.iterdir())) == 1  # spilled next to the cache, not kept in memory
    device, spill, name = offload.restore(encoder)
    assert (device.type, spill, name) == ("cpu", tmp_path, "text_encoder")
    assert list(encoder.parameters()) == params  # the same Parameter objects: references stay valid
    assert not list(tmp_path.iterdir())
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, before)


def test_a_freed_module_loads_itself_back_when_called(tmp_path):
    """A cache entry re-encoded mid-run (a damaged file, say) costs a reload, not a crash."""
    vae = tiny_vae().requires_grad_(False)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist.mean
    offload.free(vae, torch.device("cpu"), tmp_path, "vae")
    with torch.no_grad():
        after = vae.encode(pixels).latent_dist.mean
    assert not offload.is_freed(vae) and torch.equal(after, before)


def test_trained_modules_are_never_freed(tmp_path):
    encoder = tiny_text_encoder(64).requires_grad_(False)
    encoder.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trained parameters"):
        offload.free(encoder, torch.device("cpu"), tmp_path, "text_encoder")


def test_encoders_on_brings_freed_parts_back_for_the_duration(tiny_models, tmp_path):
    from tuner.models import load_parts
    from tuner.runtime import encoders_on

    parts = load_parts(str(tiny_models["sd1"]))
    parts.vae.requires_grad_(False)
    parts.text_encoder.requires_grad_(False)
    for name, module in (("text_encoder", parts.text_encoder), ("vae", parts.vae)):
        parts.freed[name] = offload.free(module, parts.device, tmp_path, name)
    with encoders_on(parts):
        assert not offload.is_freed(parts.text_encoder) and not offload.is_freed(parts.vae)
        assert storage_bytes(parts.vae) > 0
    assert offload.is_freed(parts.text_encoder) and offload.is_freed(parts.vae)


def test_a_run_frees_what_caching_made_idle_and_says_so(tiny_models, tmp_path, capsys):
    """LoRA on tiny SD1 with cached latents and embeddings: the header names the freed text encoder and VAE and
    the speed levers; validation renders with them back; the export's round trip loads every part at the end.
    The optimizer steps inside backward (fused_backward), through the loop, its schedule and its checkpoint."""
    import numpy as np
    from PIL import Image

    from tuner.config import RunConfig
    from tuner.loop import train

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
        (images / f"{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    config = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(tiny_models["sd1"])},
        "data": {"path": str(images), "resolution": 64, "enable_bucket": False},
        "lora": {"rank": 2},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3, "fused_backward": True, "max_grad_norm": None},
        "train": {"output_dir": str(tmp_path / "run"), "max_train_steps": 2, "train_batch_size": 2,
                  "checkpointing_steps": 2, "report_to": "none"},
        "validation": {"validation_steps": 1, "prompts": ["a photo"], "seeds": [0], "num_inference_steps": 1},
    }  # fmt: skip
    run = train(RunConfig.for_method("lora").model_validate(config), summary=False)
    header = capsys.readouterr().out
    assert "freed after caching: text_encoder" in header and ", vae " in header and "spilled to disk" in header
    assert "speed: tf32 n/a (CPU) · attention sdpa auto (CPU) · NCHW · compile none · fused backward" in header
    assert "trainable: unet_lora " in header  # one line for the run's groups, not one per parameter
    assert (run / "grids" / "step-000001.png").is_file() and (run / "grids" / "step-000002.png").is_file()
    assert (run / "pytorch_lora_weights.safetensors").is_file()
