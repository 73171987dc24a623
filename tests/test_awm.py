"""train_awm.py: AWM's loss against a brute-force recomputation, no gradient without advantages, its timestep
draws, and the trainer end to end (weights move, resume is bit-exact, torchrun x 2 on a tiny FLUX)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from plumbing.models import load_model
from sampler import mode_defaults
from test_train import check_run, metrics, train, weights
from train_awm import AWMArgs, awm_loss, stratified_steps
from train_grpo import Learner

ROOT = Path(__file__).resolve().parents[1]


def gradient(model):
    grads = [p.grad.flatten() for p in model.transformer.parameters() if p.grad is not None]
    return torch.cat(grads) if grads else torch.zeros(1)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_the_loss_is_advantage_weighted_flow_matching(batch, beta, tiny_flux_dir):
    """awm_loss's gradient and errors equal a loop over the points, each its own forward, written from
    AWM's formulas (scxue/advantage_weighted_matching, scripts/train_sd3_awm.py)."""
    model, traj, adv = batch
    ref = load_model(tiny_flux_dir, height=32, width=32).transformer if beta else None
    with torch.no_grad():  # the policy moved off the reference, so the KL term has a gradient
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    learner = Learner(model, ref, mode_defaults(AWMArgs(beta=beta, train_batch_size=4, adv_clip_max=2.0)))
    kept = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # trajectory 3 dropped (a non-finite reward)
    rows, steps = torch.tensor([4, 0, 3]), torch.tensor([[0, 3], [1, 5], [2, 4]])  # (n, k)
    noise = torch.randn(6, *traj.clean.shape[1:], generator=torch.Generator().manual_seed(1))
    scale, p_ = 1 / 3, 0.25

    model.transformer.zero_grad()
    errors = awm_loss(learner, traj, adv.clamp(-2, 2), kept, rows, steps, noise, scale)
    fast = gradient(model).clone()

    model.transformer.zero_grad()
    expected = []
    for j, (i, t) in enumerate(
        (i, t) for i, row in zip(rows.tolist(), steps.tolist(), strict=True) for t in row
    ):
        sigma = traj.sigmas[t]
        x0, eps = traj.clean[i : i + 1], noise[j : j + 1]
        x_t = (1 - sigma) * x0 + sigma * eps
        embeds = {name: e[i : i + 1] for name, e in traj.embeds.items()}
        v = model.velocity(model.transformer, x_t, sigma.reshape(1), embeds)
        d = ((v - (eps - x0)) ** 2).mean()
        a = adv[i].clamp(-2, 2) / 2.0  # clipped to adv_clip_max, scaled into [-1, 1]
        loss = a * sigma * ((d + 1e-10) ** p_ - 1e-10**p_) / p_
        if beta:
            with torch.no_grad():
                v_ref = model.velocity(ref, x_t, sigma.reshape(1), embeds)
            loss = loss + beta * ((v - v_ref) ** 2).mean()
        (loss * kept[i] * scale / 2).backward()
        expected.append(d.detach())
    slow = gradient(model)
    torch.testing.assert_close(errors, torch.stack(expected), atol=1e-6, rtol=1e-5)
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, atol=1e-6 * slow.abs().max().item(), rtol=1e-4)


def test_equal_advantages_give_no_gradient(batch):
    """Rewards that all tie give every advantage 0: without a KL term nothing is learned."""
    model, traj, _ = batch
    learner = Learner(model, None, mode_defaults(AWMArgs(train_batch_size=4)))
    rows, steps = torch.arange(6), torch.tensor([[0], [1], [2], [3], [4], [5]])
    noise = torch.randn(6, *traj.clean.shape[1:], generator=torch.Generator().manual_seed(2))
    model.transformer.zero_grad()
    errors = awm_loss(learner, traj, torch.zeros(6), torch.ones(6), rows, steps, noise, 1 / 6)
    assert (errors > 0).all() and gradient(model).abs().max() == 0


def test_stratified_steps_draw_one_step_from_each_stratum():
    steps = stratified_steps(2000, 16, 0.5, torch.Generator().manual_seed(0))  # 8 strata of 2 steps
    assert steps.shape == (2000, 8)
    strata = torch.arange(16).reshape(8, 2)
    for j in range(8):
        assert set(steps[:, j].tolist()) == set(strata[j].tolist())  # each step of its stratum, no other
    assert abs((steps[:, 0] == 0).float().mean() - 0.5) < 0.05  # uniform within a stratum
    uneven = stratified_steps(500, 9, 0.67, torch.Generator().manual_seed(0))  # 6 strata over 9 steps
    assert uneven.shape == (500, 6) and (uneven.diff(dim=1) > 0).all() and uneven.max() == 8


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 iterations of AWM on the toy world, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("awm")
    train("train_awm.py", out, "--num-iterations", "4", "--checkpoint-every", "2")
    return out


def test_a_toy_run_moves_the_weights(straight):
    rows = check_run(straight, 4)
    assert all(r["ratio"] == 1.0 and r["clip_frac"] == 0.0 for r in rows)  # AWM has no ratio to clip
    trained = weights(straight / "checkpoints" / "iter_00004" / "transformer")
    base = weights(ROOT / "assets" / "toy" / "transformer")
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


def test_resume_equals_an_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(Path(straight, "checkpoints", "iter_00002"), out / "checkpoints" / "iter_00002")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(straight)[:2]))
    train("train_awm.py", out, "--num-iterations", "4", "--checkpoint-every", "2", "--resume")
    a = weights(straight / "checkpoints/iter_00004/transformer")
    b = weights(out / "checkpoints/iter_00004/transformer")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_awm_flag_is_refused_on_resume(straight, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(Path(straight, "checkpoints", "iter_00002"), out / "checkpoints" / "iter_00002")
    proc = train("train_awm.py", out, "--num-iterations", "4", "--awm-power", "1", "--resume", check=False)
    assert proc.returncode != 0 and "--awm-power 0.25 -> 1.0" in proc.stderr


def test_torchrun_two_ranks_on_a_tiny_flux(tmp_path, tiny_flux_dir):
    flux = ["--model", str(tiny_flux_dir), "--height", "32", "--width", "32", "--timeout", "60"]
    flux += [
        "--reward",
        "jpeg_compressibility",
    ]  # the toy verifier scores a random FLUX's images 0 alike: no advantage
    train("train_awm.py", tmp_path, "--num-iterations", "2", *flux, nproc=2)
    rows = check_run(tmp_path, 2)
    assert all(r["num_trajectories"] == 16 for r in rows)  # both ranks' 8 trajectories
    trained = weights(tmp_path / "checkpoints" / "iter_00002" / "transformer")
    base = weights(Path(tiny_flux_dir) / "transformer")
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


def test_a_lora_run_with_a_kl_term_trains_its_adapter(tmp_path):
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--beta", "0.01", "--learning-rate", "1e-3"]
    train("train_awm.py", tmp_path, "--num-iterations", "1", *lora)
    check_run(tmp_path, 1)
    adapter = weights(tmp_path / "checkpoints" / "iter_00001" / "lora")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
