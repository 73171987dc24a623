"""Every preset is its paper's recipe: the PPO clip by hand, Flow-GRPO's KL and SD3.5 schedule, the stock
pipelines' default images, the mode-dependent defaults, the warning when rollout and training disagree."""

import json
import shutil

import pytest
import torch

import eval
import train_chunk
import train_grpo
from plumbing.models import load_model, pipeline_sigmas
from plumbing.runtime import UsageError, cli
from sampler import mode_defaults, rollout, sde_mean_std, sde_step, sigma_schedule

PROMPTS = ["a red circle on the left", "two blue squares"]


def test_ppo_clip_loss_against_hand_computed_values():
    eps = 0.1
    ratio = torch.tensor([1.2, 0.8, 1.2, 0.8, 1.05], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    loss = train_grpo.ppo_clip_loss(ratio, adv, eps)
    # max(-A r, -A clip(r)): A > 0 above 1 + eps is clipped (-1.1), below 1 - eps not (-0.8); A < 0 mirrors.
    torch.testing.assert_close(loss, torch.tensor([-1.1, -0.8, 1.2, 0.9, -2.1]))
    loss.sum().backward()
    torch.testing.assert_close(
        ratio.grad, torch.tensor([0.0, -1.0, 1.0, 0.0, -2.0])
    )  # no gradient once clipped
    assert (
        train_chunk.ppo_clip_loss is train_grpo.ppo_clip_loss
    )  # the chunk objective clips its r_j the same way


def test_kl_term_is_flow_grpos():
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(4, 3, 8, generator=g) for _ in range(3))
    sigmas = sigma_schedule(10)
    s, s_next = sigmas[[1, 3, 5, 8]], sigmas[[2, 4, 6, 9]]
    sde = dict(mode="flow", eta=0.7, sigma_max=sigmas[1])
    mean, std = sde_mean_std(v, x, s, s_next, **sde)
    mean_ref, _ = sde_mean_std(v_ref, x, s, s_next, **sde)
    # Flow-GRPO train_sd3.py: kl = mean((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = eta sqrt(s / (1 - s))
    std_dev_t = 0.7 * torch.sqrt(s / (1 - s))
    expected = ((mean - mean_ref) ** 2).mean((1, 2)) / (2 * std_dev_t**2)
    torch.testing.assert_close(train_grpo.kl_to_reference(mean, mean_ref, std, s - s_next), expected)


def test_sd3_pipeline_schedule_is_flow_grpos(tiny_sd3_dir):
    model = load_model(tiny_sd3_dir, height=32, width=32)
    published = [1, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0]  # 10 steps, shift 3
    torch.testing.assert_close(pipeline_sigmas(model, 10), torch.tensor(published), atol=6e-4, rtol=0)
    with pytest.raises(UsageError, match="no pipeline scheduler"):
        pipeline_sigmas(load_model("toy"), 10)


def flux_with_dynamic_shift(tiny_flux_dir, tmp_path):
    """The tiny FLUX pipeline with FLUX.1-dev's scheduler settings: the shift depends on the image size."""
    folder = tmp_path / "flux-dynamic"
    shutil.copytree(tiny_flux_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config |= dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", ["flux", "flux-dynamic", "sd3"])
def test_eval_default_reproduces_the_stock_pipeline_called_with_defaults(
    family, tiny_flux_dir, tiny_sd3_dir, tmp_path
):
    from diffusers import DiffusionPipeline

    folder = {"flux": tiny_flux_dir, "flux-dynamic": None, "sd3": tiny_sd3_dir}[family]
    folder = folder or flux_with_dynamic_shift(tiny_flux_dir, tmp_path)
    guidance = 3.5 if family != "sd3" else 4.5
    model = load_model(folder, height=32, width=32, guidance_scale=guidance, quantize_timestep=False)
    sigmas = pipeline_sigmas(model, 6)
    traj = rollout(model, PROMPTS, num_generations=1, num_steps=6, mode="ode", sigmas=sigmas, seed=0)
    pipe = DiffusionPipeline.from_pretrained(folder)
    out = pipe(PROMPTS, latents=traj.latents[:, 0], num_inference_steps=6, guidance_scale=guidance, height=32,
               width=32, output_type="pt").images  # fmt: skip
    assert (out - traj.images).abs().max() < 1e-4
    if family == "flux-dynamic":  # FLUX.1-dev's scheduler: not the training schedule's fixed shift 3
        assert not torch.allclose(sigmas, sigma_schedule(6))


def test_mode_dependent_defaults_follow_the_mode_unless_given():
    def resolved(*flags):
        args = mode_defaults(cli(train_grpo.Args, train_grpo.PRESETS, list(flags)))
        return args.eta, args.clip_range

    assert resolved() == (0.7, 5e-5)  # GCPO
    assert resolved("--sde-mode", "dance") == (0.3, 1e-4)  # DanceGRPO
    assert resolved("--sde-mode", "cps") == (0.7, 1e-5)  # Flow-GRPO's CPS
    assert resolved("--sde-mode", "dance", "--eta", "0.5", "--clip-range", "2e-4") == (0.5, 2e-4)
    assert resolved("--preset", "dance") == (0.3, 1e-4)
    sd35 = cli(train_grpo.Args, train_grpo.PRESETS, ["--preset", "sd35"])
    assert sd35.schedule == "pipeline" and sd35.timestep_fraction == 1.0 and sd35.beta == 0.01
    assert 0.9 ** (1 / 8) == pytest.approx(sd35.ema_decay, abs=5e-4)  # Flow-GRPO's decay 0.9 every 8 steps
    assert cli(eval.Args, eval.PRESETS, []).schedule == "pipeline"
    evaluated = mode_defaults(cli(eval.Args, eval.PRESETS, []))  # no clip range: only eta, ode's is 0
    assert evaluated.eta == 0.0 and (evaluated.num_steps, evaluated.sde_mode) == (50, "ode")
    assert mode_defaults(cli(eval.Args, eval.PRESETS, ["--sde-mode", "dance"])).eta == 0.3


@pytest.mark.parametrize("preset", [None, *train_chunk.PRESETS])
def test_every_chunk_preset_has_a_layout_of_its_trainable_steps(preset):
    args = cli(train_chunk.ChunkArgs, train_chunk.PRESETS, ["--preset", preset] if preset else [])
    sizes = train_chunk.layout(args)  # refuses sizes that do not add up to num_steps - 1
    assert sum(sizes) == args.num_steps - 1


def test_the_trainer_warns_when_rollout_and_training_disagree(tmp_path, capsys, monkeypatch):
    flags = ["--preset", "toy", "--prompts-per-rank", "2", "--num-generations", "4", "--num-steps", "6"]
    flags += ["--gradient-accumulation-steps", "4", "--image-every", "0", "--num-iterations", "1"]
    train_grpo.main(
        cli(train_grpo.Args, train_grpo.PRESETS, flags + ["--output-dir", str(tmp_path / "agree")])
    )
    assert "warning: ratio_first" not in capsys.readouterr().out

    def rescored_off_by_2e_4(*args, **kwargs):  # training's forward disagrees with the rollout's by 2e-4
        x, log_prob = sde_step(*args, **kwargs)
        return x, log_prob + 2e-4

    monkeypatch.setattr(train_grpo, "sde_step", rescored_off_by_2e_4)
    train_grpo.main(
        cli(train_grpo.Args, train_grpo.PRESETS, flags + ["--output-dir", str(tmp_path / "disagree")])
    )
    assert "warning: ratio_first 2.0e-04 is over a tenth of the clip range" in capsys.readouterr().out
