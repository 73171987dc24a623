"""sampler.py: the step's density against torch.distributions, ratio == 1 on re-scoring, parity with the
stock diffusers pipelines."""

import pytest
import torch
from torch.distributions import Normal

from plumbing.models import load_model, pack, unpack
from plumbing.runtime import UsageError
from sampler import rollout, sde_step, sigma_schedule

PROMPTS = ["a red circle on the left", "two blue squares"]


def test_sigma_schedule_matches_published_values():
    expected = [
        1.000,
        0.980,
        0.957,
        0.933,
        0.907,
        0.878,
        0.846,
        0.811,
        0.771,
        0.727,
        0.677,
        0.621,
        0.556,
        0.480,
        0.391,
        0.286,
        0.158,
        0,
    ]
    torch.testing.assert_close(sigma_schedule(17, 3.0), torch.tensor(expected), atol=6e-4, rtol=0)


def reference_mean_std(mode, x, v, s, s_next, eta, sigma_max):
    """Written independently of sampler.py: the expanded Flow-GRPO form (arXiv 2505.05470), DanceGRPO's form
    (arXiv 2505.07818), as their released step functions compute them."""
    dt = s_next - s
    if mode == "flow":
        g = eta * torch.sqrt(s / (1 - torch.where(s == 1, sigma_max, s)))
        mean = x * (1 + g**2 * dt / (2 * s)) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
        return mean, g * torch.sqrt(-dt)
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2  # DanceGRPO's score estimate
    return x + v * dt - 0.5 * eta**2 * score * dt, eta * torch.sqrt(-dt)


@pytest.mark.parametrize("mode,eta", [("flow", 0.7), ("dance", 0.3)])
@pytest.mark.parametrize("per_row", [False, True])
def test_log_prob_matches_torch_distributions(mode, eta, per_row):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g)
    sigmas = sigma_schedule(17)
    if per_row:  # each row its own step, including sigma = 1, as a chunk batches them
        s, s_next = sigmas[[0, 3, 7, 11, 15]], sigmas[[1, 4, 8, 12, 16]]
    else:
        s, s_next = sigmas[5].expand(5), sigmas[6].expand(5)
    prev, log_prob = sde_step(
        v,
        x,
        s if per_row else float(s[0]),
        s_next if per_row else float(s_next[0]),
        mode=mode,
        eta=eta,
        generator=g,
        sigma_max=sigmas[1],
    )
    mean, std = reference_mean_std(mode, x, v, s.view(-1, 1, 1), s_next.view(-1, 1, 1), eta, sigmas[1])
    expected = Normal(mean, std.expand_as(mean)).log_prob(prev).mean((1, 2))
    assert log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=1e-5)
    # scoring the same sample again gives the same number
    _, again = sde_step(v, x, s, s_next, mode=mode, eta=eta, prev_sample=prev, sigma_max=sigmas[1])
    torch.testing.assert_close(again, log_prob, atol=0, rtol=0)


def test_flow_step_statistics():
    sigmas = sigma_schedule(17)
    x, v = torch.full((200_000, 1), 0.5), torch.full((200_000, 1), -0.3)
    prev, _ = sde_step(v, x, sigmas[4], sigmas[5], eta=0.7, generator=torch.Generator().manual_seed(1))
    mean, std = reference_mean_std("flow", x[:1], v[:1], sigmas[4], sigmas[5], 0.7, sigmas[1])
    assert abs(prev.mean() - mean.item()) < 4 * std.item() / 200_000**0.5
    assert abs(prev.std() / std.item() - 1) < 0.01


def test_ode_and_cps_modes():
    x, v = torch.randn(3, 8), torch.randn(3, 8)
    prev, log_prob = sde_step(v, x, 0.6, 0.5, mode="ode")
    torch.testing.assert_close(prev, x - 0.1 * v)
    assert torch.equal(log_prob, torch.zeros(3))
    prev, log_prob = sde_step(v, x, 0.6, 0.5, mode="cps", eta=0.5, generator=torch.Generator().manual_seed(0))
    _, again = sde_step(v, x, 0.6, 0.5, mode="cps", eta=0.5, prev_sample=prev)
    assert torch.equal(log_prob, again) and (log_prob <= 0).all()


def test_bad_inputs_raise_one_clear_error(tmp_path):
    x = torch.randn(2, 4)
    with pytest.raises(UsageError, match="unknown SDE mode 'sde'"):
        sde_step(x, x, 0.5, 0.4, mode="sde")
    with pytest.raises(UsageError, match="sigma_next < sigma"):
        sde_step(x, x, 0.4, 0.5)
    with pytest.raises(UsageError, match="sigma_max"):
        sde_step(x, x, 1.0, 0.9)
    with pytest.raises(UsageError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))


def rescore(model, traj, rows, steps):
    """Re-score transitions (rows x steps) in one batch, each row with its own sigma, as the trainers do."""
    rows, steps = torch.as_tensor(rows), torch.as_tensor(steps)
    embeds = {k: e[rows] for k, e in traj.embeds.items()}
    s, s_next = traj.sigmas[steps], traj.sigmas[steps + 1]
    v = model.velocity(model.transformer, traj.latents[rows, steps], s, embeds)
    _, log_prob = sde_step(
        v,
        traj.latents[rows, steps],
        s,
        s_next,
        prev_sample=traj.latents[rows, steps + 1],
        sigma_max=traj.sigmas[1],
    )
    return (log_prob - traj.log_probs[rows, steps]).exp()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rescoring_gives_ratio_one(family, tiny_flux_dir, tiny_sd3_dir):
    model = load_model(tiny_flux_dir if family == "flux" else tiny_sd3_dir, height=32, width=32)
    with torch.no_grad():
        traj = rollout(model, PROMPTS, num_generations=3, num_steps=6, seed=0)
        n, t = traj.log_probs.shape
        assert traj.latents.shape == (n, t + 1, *model.latent_shape) and traj.images.shape == (6, 3, 32, 32)
        all_rows = rescore(model, traj, torch.arange(n).repeat_interleave(t), torch.arange(t).repeat(n))
        one_by_one = torch.stack(
            [rescore(model, traj, [i], [j]) for i in range(n) for j in range(t)]
        ).flatten()
        chunk = rescore(model, traj, [4, 4, 4], [1, 2, 3])  # one trajectory's consecutive steps as a batch
    for ratios in (all_rows, one_by_one, chunk):
        assert (ratios - 1).abs().max() < 1e-6


def test_rollout_ignores_batch_size_and_shares_noise(tiny_flux_dir):
    model = load_model(tiny_flux_dir, height=32, width=32)
    full = rollout(model, PROMPTS, num_generations=2, num_steps=4, seed=3)
    micro = rollout(model, PROMPTS, num_generations=2, num_steps=4, seed=3, batch_size=1)
    torch.testing.assert_close(micro.latents, full.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(micro.log_probs, full.log_probs, atol=1e-5, rtol=0)
    alone = rollout(
        model, PROMPTS[:1], num_generations=2, num_steps=4, seed=3
    )  # trajectory j keeps its noise
    torch.testing.assert_close(alone.latents, full.latents[:2], atol=1e-5, rtol=0)
    grouped = rollout(model, PROMPTS, num_generations=2, num_steps=4, seed=3, init_same_noise="group")
    x0 = grouped.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and not torch.equal(x0[0], x0[2])
    assert not torch.equal(grouped.latents[0, 1], grouped.latents[1, 1])  # the policy noise still differs
    everyone = rollout(model, PROMPTS, num_generations=2, num_steps=4, seed=3, init_same_noise="all")
    assert all(torch.equal(everyone.latents[0, 0], everyone.latents[i, 0]) for i in range(4))


def test_an_sde_window_leaves_the_steps_after_it_to_the_ode(tiny_flux_dir):
    model = load_model(tiny_flux_dir, height=32, width=32)
    with torch.no_grad():
        full = rollout(model, PROMPTS, num_generations=2, num_steps=6, seed=0)  # T = 5 stochastic steps
        window = rollout(model, PROMPTS, num_generations=2, num_steps=6, seed=0, sde_window=2)
        assert torch.equal(window.latents[:, :3], full.latents[:, :3])  # the window's steps: the same draws
        assert (window.log_probs[:, :2] != 0).all() and (window.log_probs[:, 2:] == 0).all()
        assert not torch.equal(window.latents[:, 3], full.latents[:, 3])
        for t in range(2, 5):  # after the window, each step is the ODE's Euler step from the state before
            x, s, s_next = window.latents[:, t], window.sigmas[t], window.sigmas[t + 1]
            v = model.velocity(model.transformer, x, s.expand(len(x)), window.embeds)
            torch.testing.assert_close(window.latents[:, t + 1], x + v * (s_next - s), atol=1e-5, rtol=0)
        whole = rollout(model, PROMPTS, num_generations=2, num_steps=6, seed=0, sde_window=5)
    assert torch.equal(whole.latents, full.latents) and torch.equal(whole.log_probs, full.log_probs)
    with pytest.raises(UsageError, match="SDE window of 6 steps"):
        rollout(model, PROMPTS, num_generations=2, num_steps=6, seed=0, sde_window=6)


def test_ode_matches_stock_flux_pipeline(tiny_flux_dir):
    from diffusers import FluxPipeline

    model = load_model(tiny_flux_dir, height=32, width=32, quantize_timestep=False)
    traj = rollout(model, PROMPTS, num_generations=1, num_steps=8, mode="ode", seed=0)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    out = pipe(
        PROMPTS,
        latents=traj.latents[:, 0],
        sigmas=torch.linspace(1, 0, 9)[:-1].tolist(),
        num_inference_steps=8,
        guidance_scale=3.5,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert (out - traj.images).abs().max() < 1e-4


def test_ode_matches_stock_sd3_pipeline(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    model = load_model(tiny_sd3_dir, height=32, width=32, guidance_scale=4.5)
    traj = rollout(model, PROMPTS, num_generations=1, num_steps=8, mode="ode", seed=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    out = pipe(
        PROMPTS,
        latents=traj.latents[:, 0],
        sigmas=torch.linspace(1, 0, 9)[:-1].tolist(),
        num_inference_steps=8,
        guidance_scale=4.5,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert (out - traj.images).abs().max() < 1e-4


def test_flux_token_packing_matches_the_stock_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)  # (N, C, h, w) latent pixels
    tokens = pack(x)  # (N, 15, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack(tokens, 6, 10), x)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 80, 8), x)  # 48 x 80 px under an 8x VAE
