"""The maths of train_grpo.py and train_chunk.py: advantages, and the chunk objective against the step one."""

from dataclasses import replace

import pytest
import torch

import train_chunk
import train_grpo
from chunking import chunk_bounds
from plumbing.models import load_model
from plumbing.runtime import UsageError
from sampler import mode_defaults
from train_chunk import ChunkArgs, chunk_loss, first_fit_batches
from train_grpo import Args, Learner, compute_advantages, step_loss

ALL = torch.ones(6)  # every trajectory of the batch fixture kept (none dropped for a non-finite reward)


def test_group_advantages_are_z_scores_and_zero_variance_groups_get_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5, -1.0, 4.0, 0.0, 2.0])
    group = torch.arange(3).repeat_interleave(4)
    adv, frac_zero = compute_advantages(rewards, group, adv_clip_max=100)
    for g in (0, 2):
        a = adv[group == g]
        assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-6  # unbiased std, as DanceGRPO
    assert torch.equal(adv[group == 1], torch.zeros(4)) and frac_zero == pytest.approx(1 / 3)
    outlier = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 100])  # its z-score is 7 / sqrt(8) = 2.47
    clipped, _ = compute_advantages(outlier, torch.zeros(8, dtype=torch.long), adv_clip_max=2.0)
    assert clipped.max() == 2.0 and clipped.min() > -2.0


def test_batch_std_advantages_use_one_std_for_the_batch():
    rewards, group = torch.tensor([1.0, 3.0, 10.0, 20.0]), torch.tensor([0, 0, 1, 1])
    adv, _ = compute_advantages(rewards, group, adv_std="batch", adv_clip_max=100)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -5.0, 5.0]) / rewards.std())


def test_slas_gamma_zero_is_std_free_advantage_over_batch_std_and_shaping_keeps_sign_and_order():
    g = torch.Generator().manual_seed(0)
    rewards, group = torch.rand(24, generator=g), torch.arange(4).repeat_interleave(6)
    d = rewards - rewards.view(4, 6).mean(1).repeat_interleave(6)
    linear, _ = compute_advantages(rewards, group, slas_gamma=0.0, adv_clip_max=100)
    torch.testing.assert_close(linear, d / d.std())
    shaped, _ = compute_advantages(rewards, group, slas_gamma=0.5, adv_clip_max=100)
    assert torch.equal(shaped.sign(), d.sign())
    assert torch.equal(shaped.argsort(), d.argsort())
    expected = d.sign() * d.abs() ** 1.5
    torch.testing.assert_close(shaped, expected / expected.std())


def grads_of(model, fn):
    model.transformer.zero_grad(set_to_none=True)
    out = fn()
    return out, torch.cat([p.grad.flatten() for p in model.transformer.parameters() if p.grad is not None])


@pytest.mark.parametrize("chunk_ratio", ["chunk", "step"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_chunks_of_size_one_equal_the_step_objective(batch, beta, chunk_ratio, tiny_flux_dir):
    model, traj, adv = batch
    T = traj.log_probs.shape[1]
    # nudge the weights so ratios differ from 1 and some get clipped
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    ref = load_model(tiny_flux_dir, height=32, width=32).transformer if beta else None  # the un-nudged base
    args = ChunkArgs(clip_range=1e-3, beta=beta, train_batch_size=4, chunk_ratio=chunk_ratio)
    learner = Learner(model, ref, mode_defaults(args))
    rows = torch.tensor([0, 2, 3, 5])
    steps = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(i))[:3] for i in range(4)])
    step_ratio, step_grad = grads_of(model, lambda: step_loss(learner, traj, adv, ALL, rows, steps, 0.25))
    chunk_ratio, chunk_grad = grads_of(
        model, lambda: chunk_loss(learner, traj, adv, ALL, rows, steps, [1] * T, 0.25)
    )
    assert (step_ratio - 1).abs().max() > 1e-4  # the comparison is not between two trivial ratios of 1
    assert (step_ratio - chunk_ratio).abs().max() < 1e-6
    assert (step_grad - chunk_grad).abs().max() < 1e-6 and step_grad.abs().max() > 0


@pytest.fixture(scope="module")
def nudged(tiny_flux_dir):
    """A policy a little off the sampler's weights (ratios != 1, some clipped) and the un-nudged reference."""
    policy = load_model(tiny_flux_dir, height=32, width=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return policy, load_model(tiny_flux_dir, height=32, width=32).transformer


def test_pack_fills_batches_longest_first_and_gives_an_oversized_chunk_its_own():
    assert first_fit_batches([2, 1, 3, 1, 7], 4) == [[4], [2, 1], [0, 3]]
    assert first_fit_batches([1, 1, 1], 2) == [[0, 1], [2]]  # ties keep their order
    assert first_fit_batches([], 4) == []


@pytest.mark.parametrize("chunk_ratio", ["chunk", "step"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("train_batch_size, forwards", [(1, 10), (5, 4), (64, 1)])
def test_packed_chunks_give_the_gradient_of_one_forward_per_chunk(
    batch, nudged, beta, train_batch_size, forwards, chunk_ratio, monkeypatch
):
    _, traj, adv = batch
    policy, ref = nudged
    args = ChunkArgs(clip_range=2e-4, beta=beta, chunk_ratio=chunk_ratio)
    learner = Learner(policy, ref if beta else None, mode_defaults(args))
    kept = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # trajectory 3 dropped (a non-finite reward)
    sizes, scale = [1, 2, 3], 0.2  # T = 6 steps
    rows = torch.tensor([4, 0, 3, 1, 5])
    chunks = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 1], [1, 0]])  # (n, k): chunk ids, any order

    def one_forward_per_chunk():  # brute force: each chunk on its own, its ratio, its loss, its backward
        eps, ratios = learner.args.clip_range, []
        for row, picked in zip(rows.tolist(), chunks.tolist(), strict=True):
            for j in picked:
                steps = torch.arange(sum(sizes[:j]), sum(sizes[: j + 1]))
                logp, kl = learner.log_probs(traj, torch.full_like(steps, row), steps)
                log_ratio = logp - traj.log_probs[row, steps]
                ratio = log_ratio.mean().exp()
                r = ratio if chunk_ratio == "chunk" else log_ratio.exp()  # the control: a ratio per step
                surrogate = torch.maximum(-adv[row] * r, -adv[row] * r.clamp(1 - eps, 1 + eps)).mean()
                loss = (surrogate + beta * kl.mean()) * kept[row]
                (loss * scale / chunks.shape[1]).backward()
                ratios.append(ratio.detach())
        return torch.stack(ratios)

    ref_ratio, ref_grad = grads_of(policy, one_forward_per_chunk)
    learner.args.train_batch_size = train_batch_size
    rows_per_forward, log_probs = [], learner.log_probs

    def counted(traj, r, t):
        rows_per_forward.append(len(r))
        return log_probs(traj, r, t)

    monkeypatch.setattr(learner, "log_probs", counted)
    ratio, grad = grads_of(policy, lambda: chunk_loss(learner, traj, adv, kept, rows, chunks, sizes, scale))
    # 20 rows: one forward per chunk at batch size 1, four full forwards of 5 (chunks of several
    # trajectories, never split), one forward of all
    assert len(rows_per_forward) == forwards and sum(rows_per_forward) == 20
    assert max(rows_per_forward) <= max(train_batch_size, max(sizes))
    outside = (ref_ratio - 1).abs() > learner.args.clip_range
    assert outside.any() and not outside.all()  # ratios inside and outside the clip range
    torch.testing.assert_close(ratio, ref_ratio, atol=1e-6, rtol=0)  # same order: row-major (rows, chunks)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-5 * ref_grad.abs().max().item(), rtol=1e-5)


def test_one_chunk_of_all_steps_is_the_sequence_level_ratio(batch):
    model, traj, adv = batch
    T = traj.log_probs.shape[1]
    learner = Learner(model, None, mode_defaults(ChunkArgs(clip_range=1e-3)))
    rows = torch.tensor([1, 4])
    ratio = chunk_loss(learner, traj, adv, ALL, rows, torch.zeros(2, 1, dtype=torch.long), [T], 1.0)
    with torch.no_grad():  # brute force: every step scored on its own, then exp of the mean log-ratio
        logp = torch.stack(
            [learner.log_probs(traj, torch.tensor([r] * T), torch.arange(T))[0] for r in (1, 4)]
        )
    torch.testing.assert_close(ratio, (logp - traj.log_probs[rows]).mean(1).exp(), atol=1e-6, rtol=0)
    assert chunk_bounds([T]) == [(0, T)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_descent_step_moves_log_probs_with_the_advantage(batch, sign):
    """The objective's sign: a step down its gradient raises log pi where A > 0, lowers it where A < 0."""
    model, traj, _ = batch
    T = traj.log_probs.shape[1]
    learner = Learner(
        model, None, mode_defaults(Args(clip_range=1.0))
    )  # a clip this wide leaves the plain policy gradient
    rows, steps = torch.tensor([2]), torch.arange(T)[None]  # (1,), (1, T)

    def mean_logp():
        with torch.no_grad():
            return learner.log_probs(traj, rows.expand(T), steps[0])[0].mean()

    before, saved = mean_logp(), [p.detach().clone() for p in model.transformer.parameters()]
    _, grad = grads_of(model, lambda: step_loss(learner, traj, torch.full((6,), sign), ALL, rows, steps, 1.0))
    with torch.no_grad():
        for p in model.transformer.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad / grad.norm())
    after = mean_logp()
    with torch.no_grad():
        for p, q in zip(model.transformer.parameters(), saved, strict=True):
            p.copy_(q)
    assert (after - before) * sign > 0, (before, after)


def test_args_defaults_are_the_gcpo_recipe():
    a = mode_defaults(ChunkArgs())  # eta and clip_range follow the flow SDE's recipe
    assert (a.num_steps, a.shift, a.sde_mode, a.eta, a.num_generations, a.prompts_per_rank) == (
        17,
        3.0,
        "flow",
        0.7,
        12,
        2,
    )
    assert (a.clip_range, a.learning_rate, a.max_grad_norm, a.timestep_fraction) == (5e-5, 1e-5, 0.01, 0.5)
    assert a.chunk_sizes == (2, 3, 4, 7) and a.chunk_fraction == 0.5 and not a.chunk_weighted_sampling
    assert isinstance(a, Args)


def test_the_step_ratio_control_differs_from_the_chunk_ratio_only_where_ratios_leave_one(batch, nudged):
    """`--chunk-ratio step` and GCPO's chunk ratio give one gradient on-policy (every ratio 1) and two once
    the policy has moved: the control isolates the shared ratio and clip."""
    _, traj, adv = batch
    policy, _ = nudged
    rows, chunks, sizes = torch.tensor([0, 4]), torch.tensor([[2], [1]]), [1, 2, 3]

    def grad(chunk_ratio, log_probs=None):
        learner = Learner(policy, None, mode_defaults(ChunkArgs(clip_range=2e-4, chunk_ratio=chunk_ratio)))
        if log_probs is not None:
            learner.log_probs = log_probs
        return grads_of(policy, lambda: chunk_loss(learner, traj, adv, ALL, rows, chunks, sizes, 1.0))[1]

    assert (grad("chunk") - grad("step")).abs().max() > 1e-3 * grad("chunk").abs().max()
    learner = Learner(policy, None, mode_defaults(ChunkArgs()))

    def as_if_on_policy(traj_, r, t):  # the stored log-probs are the policy's own: every ratio exactly 1
        logp, kl = learner.log_probs(traj_, r, t)
        return logp - logp.detach() + traj_.log_probs[r, t], kl

    on_chunk, on_step = grad("chunk", as_if_on_policy), grad("step", as_if_on_policy)
    torch.testing.assert_close(on_chunk, on_step, atol=1e-6 * on_chunk.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_an_sde_window_trains_only_its_steps_and_the_chunks_inside_it(batch, weighted, monkeypatch):
    model, traj, adv = batch  # T = 6 trainable steps
    trained = {}
    monkeypatch.setattr(train_grpo, "step_loss", lambda *a: trained.setdefault("steps", a[-2]))
    monkeypatch.setattr(train_chunk, "chunk_loss", lambda *a: trained.setdefault("chunks", a[-3]))
    window = dict(sde_window=4, timestep_fraction=0.5, chunk_fraction=0.5, chunk_weighted_sampling=weighted)
    args = mode_defaults(ChunkArgs(**window))
    learner, rows = Learner(model, None, args), torch.arange(6)
    train_grpo.step_objective(learner, traj, adv, ALL, rows, 1 / 6, torch.Generator().manual_seed(0))
    assert trained["steps"].shape == (6, 2) and trained["steps"].max() < 4  # 2 of the window's 4 steps
    assert len(trained["steps"].unique()) == 4  # ... and every one of them trains on some trajectory
    chunks = dict(sizes=[2, 2, 2], generator=torch.Generator().manual_seed(0))
    train_chunk.chunk_objective(learner, traj, adv, ALL, rows, 1 / 6, **chunks)
    assert trained["chunks"].shape == (6, 1) and set(trained["chunks"].flatten().tolist()) <= {0, 1}
    lines = train_chunk.describe_chunks(replace(args, chunk_layout="uniform", chunk_size=2), 6)
    assert lines[1].startswith("trained chunks per trajectory: 1 of 2 (the SDE window's first 4 steps)")


def test_an_sde_window_must_fit_the_steps_and_end_with_a_chunk():
    sizes = [2, 2, 2, 10]
    assert train_chunk.window_chunks(sizes, 0) == 4 and train_chunk.window_chunks(sizes, 6) == 3
    with pytest.raises(UsageError, match="choose a window that ends with a chunk: one of 2, 4, 6, 16"):
        train_chunk.window_chunks(sizes, 5)
    with pytest.raises(UsageError, match="--sde-window 17 exceeds the 16 trainable steps"):
        train_grpo.check_batch(Args(num_steps=17, sde_window=17))
    lines = train_grpo.describe_steps(Args(sde_window=6, timestep_fraction=0.67), 16)
    assert lines == ["trained steps per trajectory: 4 of the SDE window's first 6 of T = 16"]
