"""scripts/pretrain_toy.py: the edge weights, the committed bundle, a bit-reproducible build, user errors."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sampler
from plumbing import models, toy
from plumbing.runtime import run
from scripts import pretrain_toy

ROOT = Path(__file__).resolve().parents[1]
# A model small enough to pretrain in seconds: width 32 (one head), one block of each kind.
TINY = dict(steps=10, batch_size=4, dim=32, text_dim=16, num_layers=1, num_single_layers=1, eval_prompts=5)
TINY |= dict(vae_steps=3, vae_width=8)  # and an autoencoder of widths 8, 16, 16


def test_edge_weights_mark_pixels_next_to_a_colour_change():
    images = toy.render(["a red square", "two blue triangles"], seed=3)  # (2, 3, 32, 32)
    packed = pretrain_toy.edge_weights(images, 4.0)  # (2, 64, 48), values 1 or 5
    assert packed.shape == (2, 64, 48)
    w = models.toy_latents_to_images((packed - 1) / 4 * 2 - 1)  # 0 or 1 on the pixel grid (2, 3, 32, 32)
    assert torch.equal(w[:, 0], w[:, 2])  # one weight per pixel, on all three channels
    w = w[:, 0]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    for n, y, x in itertools.product(range(2), range(32), range(32)):  # brute force over 3x3 neighbourhoods
        edge = (padded[n, :, y : y + 3, x : x + 3] != images[n, :, y, x, None, None]).any().item()
        assert w[n, y, x].item() == float(edge), (n, y, x)


def test_latent_edge_weights_mark_latent_pixels_over_an_edge():
    images = toy.render(["a red square", "two blue triangles"], seed=3)  # (2, 3, 32, 32)
    packed = pretrain_toy.edge_weights(images, 4.0, latent_channels=4)  # (2, 16, 16): 2x2 latent pixels of 4
    assert packed.shape == (2, 16, 16)
    latent = models.unpack(packed, 8, 8)  # (2, 4, 8, 8)
    assert torch.equal(latent, latent[:, :1].expand_as(latent))  # one weight per latent pixel
    pixels = models.toy_latents_to_images((pretrain_toy.edge_weights(images, 4.0) - 1) / 4 * 2 - 1)[:, 0]
    for n, y, x in itertools.product(range(2), range(8), range(8)):  # a 4x4 block with any edge pixel
        edge = pixels[n, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4].max().item()
        assert latent[n, 0, y, x].item() == 1 + 4 * edge, (n, y, x)


def test_bundle_autoencoder_round_trips_scenes_through_the_flux_path():
    model = models.load_model("toy")
    assert model.kind == "toy" and model.latent_shape == (16, 16)  # 8x8x4 latents, FLUX-packed
    config = json.loads((models.TOY_DIR / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and (models.TOY_DIR / "vae").glob("*.safetensors")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models.TOY_DIR / "vae").eval()
    prompts = toy.sample_prompts("heldout", 64, seed=5)
    images = toy.render(prompts, seed=5)  # (64, 3, 32, 32)
    with torch.no_grad():
        latents = pretrain_toy.to_latents(vae, images)  # (64, 16, 16) what the flow model generates
        decoded = model.decode(latents)  # models.latent_flow_model's decode: unpack, unscale, VAE decode
    assert latents.shape == (64, 16, 16) and abs(latents.std().item() - 1) < 0.2  # normalised
    assert (decoded - images).abs().mean() < 0.02
    verdict = toy.verify(decoded, prompts)
    assert verdict.strict.float().mean() >= 0.95  # the verifier reads the reconstructions as the scenes


def test_bundle_loads_and_rolls_out():
    files = [f for f in models.TOY_DIR.rglob("*") if f.is_file() and f.suffix != ".png"]
    size = sum(f.stat().st_size for f in files)
    assert size <= 10 * 2**20, f"the toy bundle is {size / 2**20:.1f} MB"
    model = models.load_model("toy")
    assert model.kind == "toy"
    tokens = model.encode_prompts(["a red circle", "a green square above two purple circles"])
    assert tokens["prompt_embeds"].shape[:2] == (2, pretrain_toy.MAX_LENGTH)
    assert tokens["pooled_prompt_embeds"].ndim == 2
    prompts = ["a red circle on the left", "two blue squares"]
    traj = sampler.rollout(model, prompts, num_generations=2, num_steps=4, seed=0)
    assert traj.images.shape == (4, 3, 32, 32) and traj.log_probs.shape == (4, 3)
    assert traj.images.min() >= 0 and traj.images.max() <= 1 and torch.isfinite(traj.log_probs).all()
    assert toy.verify(traj.images, traj.prompts).score.shape == (4,)


def test_script_builds_a_bundle_that_pretrain_reproduces_bit_for_bit(tmp_path):
    out = tmp_path / "bundle"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "scripts.pretrain_toy", *flags, "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [line for line in proc.stdout.splitlines() if line.startswith("held-out")]
    assert len(evals) == 2 and all(" all " in line for line in evals), proc.stdout
    assert (out / "samples.png").is_file()
    config = json.loads((out / "toy_config.json").read_text())
    assert config["max_length"] == pretrain_toy.MAX_LENGTH and config["latent_channels"] == 4
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == [8, 16, 16] and vae_config["scaling_factor"] > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build is bit-reproducible on one thread, as the script runs it
    try:
        model, text_encoder, _, vae = pretrain_toy.pretrain(pretrain_toy.Args(**TINY), progress=False)
    finally:
        torch.set_num_threads(threads)
    saved = {
        "transformer/diffusion_pytorch_model.safetensors": model.transformer.state_dict(),
        "text_encoder/model.safetensors": text_encoder.state_dict(),
        "vae/diffusion_pytorch_model.safetensors": vae.state_dict(),
    }
    for name, state in saved.items():
        tensors = load_file(out / name)
        assert len(tensors) > 10, name
        for key, tensor in tensors.items():
            assert torch.equal(tensor, state[key]), (name, key)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--eval-only", "--output-dir", "EMPTY"], "no toy bundle in"),
        (["--steps", "5"], "--steps is 5; it needs at least 10"),
        (["--dim", "48"], "--dim is 48; it must be a positive multiple of 32"),
        (["--vae-width", "12"], "--vae-width is 12; it must be a multiple of 8"),
        (["--eval-prompts", "0"], "--eval-prompts 0: must be >= 1"),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, monkeypatch, capsys, flags, message):
    argv = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    monkeypatch.setattr(
        sys, "argv", ["scripts/pretrain_toy.py", "--output-dir", str(tmp_path / "out"), *argv]
    )
    with pytest.raises(SystemExit) as e:
        run(pretrain_toy.main, pretrain_toy.Args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # it failed before any work
