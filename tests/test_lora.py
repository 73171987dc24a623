"""LoRA (--lora-rank): the toy run learns, resumes bit-exactly and runs under torchrun x 2, where two ranks
average to one process's gradient; the KL reference is the base; a saved adapter loads into the stock FLUX and
SD3 pipelines and into eval.py."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from plumbing import lora
from plumbing.models import load_model, load_transformer
from plumbing.runtime import UsageError, cli
from sampler import mode_defaults
from test_train import TINY, check_run, metrics, train

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--beta", "0.01", "--learning-rate", "1e-3"]
LORA += ["--ema-decay", "0.5"]  # the average of the adapter's weights, saved and resumed as the adapter is


def adapter_weights(checkpoint):
    return lora.read_adapter(Path(checkpoint, "lora"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """4 iterations of step-level GRPO with a rank-4 adapter, the KL term and the average of the weights, a
    checkpoint every 2."""
    out = tmp_path_factory.mktemp("lora")
    train("train_grpo.py", out, *LORA, "--num-iterations", "4", "--checkpoint-every", "2")
    return out


def test_lora_toy_run_learns_and_saves_only_the_adapter(lora_run):
    check_run(lora_run, 4)
    ckpt = lora_run / "checkpoints" / "iter_00004"
    assert not (ckpt / "transformer").exists()
    trained = adapter_weights(ckpt)
    assert len(trained) == 2 * (8 * 2 + 3 * 2)  # A and B of 8 projections x 2 joint blocks, 3 x 2 single
    assert all(v.dtype == torch.float32 for v in trained.values())
    # B starts at 0 (the policy starts as the base): training moved it
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0
    assert lora.read_adapter(ckpt / "ema").keys() == trained.keys()  # the average: an adapter too
    config = torch.load(ckpt / "trainer.pt", weights_only=True)["args"]
    assert config["lora_rank"] == 4 and config["lora_alpha"] == 8


def test_lora_resume_equals_an_uninterrupted_run(lora_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run / "checkpoints" / "iter_00002", out / "checkpoints" / "iter_00002")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(lora_run)[:2]))
    train("train_grpo.py", out, *LORA, "--num-iterations", "4", "--checkpoint-every", "2", "--resume")
    for folder in ("lora", "ema"):  # the adapter, and its average
        a, b = (lora.read_adapter(run / "checkpoints/iter_00004" / folder) for run in (lora_run, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(lora_run))


def test_lora_resume_with_another_rank_is_refused(lora_run, tmp_path):
    import train_grpo

    shutil.copytree(lora_run / "checkpoints" / "iter_00002", tmp_path / "checkpoints" / "iter_00002")
    argv = [*TINY, *LORA, "--lora-rank", "8", "--output-dir", str(tmp_path), "--resume"]
    with pytest.raises(UsageError, match="--lora-rank 4 -> 8"):
        train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, argv))


def test_lora_torchrun_two_ranks_end_with_one_adapter(tmp_path):
    # Each rank draws its own noise, so a 2-rank run is not one process's run; what must hold is that the
    # averaged gradients keep the ranks' adapters bit-identical (save_checkpoint checks it: MAX == MIN).
    # With gradient checkpointing (the GPU default): the frozen base must still pass gradients to the adapter.
    train("train_grpo.py", tmp_path, *LORA, "--num-iterations", "2", "--gradient-checkpointing", nproc=2)
    rows = check_run(tmp_path, 2)
    assert all(r["num_trajectories"] == 16 for r in rows)
    trained = adapter_weights(tmp_path / "checkpoints" / "iter_00002")
    assert all(math.isfinite(v.abs().max().item()) for v in trained.values())
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0


def lora_step_gradients(rank, world, init_file, out):
    """The adapter's gradient for one optimizer step on this rank's share of 8 fixed trajectories (averaged
    over ranks as train_grpo.main does under torchrun), saved to out/rank{rank}.pt."""
    import torch.distributed as dist

    import train_grpo
    from sampler import rollout

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = load_model("toy")
    params = perturbed(model.transformer)  # a random B: the gradient of A is not zero
    traj = rollout(model, ["a red circle", "two blue squares"], num_generations=4, num_steps=6, seed=0)
    args = mode_defaults(cli(train_grpo.Args, train_grpo.PRESETS, [*TINY, *LORA]))
    learner = train_grpo.Learner(model, lora.AdapterOff(model.transformer), args)  # with the KL term
    n = 8 // world
    rows = torch.arange(rank * n, (rank + 1) * n)  # this rank's trajectories
    steps = torch.stack(
        [torch.randperm(5, generator=torch.Generator().manual_seed(int(r)))[:2] for r in rows]
    )
    train_grpo.step_loss(learner, traj, torch.linspace(-1.5, 1.5, 8), torch.ones(8), rows, steps, scale=1 / n)
    if world > 1:
        lora.average_gradients(params)
        dist.destroy_process_group()
    torch.save([p.grad for p in params], Path(out, f"rank{rank}.pt"))


def test_lora_gradients_of_two_ranks_equal_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    lora_step_gradients(0, 1, None, tmp_path / "one")  # all 8 trajectories in one process
    torch.multiprocessing.spawn(lora_step_gradients, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))  # the ranks hold one gradient
    assert max(g.abs().max().item() for g in one) > 0
    for a, b in zip(ranks[0], one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the same sum, in another order


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lora-rank", "-1"], "--lora-rank -1: must be >= 0"),
        (["--lora-targets", "no_such"], "--lora-targets no_such"),
        (["--lora-rank", "0", "--lora-alpha", "4"], "add --lora-rank R"),
    ],
)
def test_lora_bad_flags(tmp_path, flags, message):
    import train_grpo

    argv = [*TINY, "--output-dir", str(tmp_path), "--lora-rank", "2", *flags]
    with pytest.raises(UsageError, match=message):
        train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, argv))


def perturbed(transformer, rank=4):
    """transformer with a rank-`rank` adapter whose B is random, so that the adapter changes the output."""
    params = lora.add_lora(transformer, rank, None)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    return params


def toy_inputs(model, n=2):
    torch.manual_seed(2)
    embeds = model.encode_prompts(["a red circle", "two blue squares"][:n])
    return torch.randn(n, *model.latent_shape), torch.rand(n), embeds  # (n, L, C), (n,)


def test_kl_reference_is_the_base_with_the_adapter_off():
    model = load_model("toy")
    base = copy.deepcopy(model.transformer).eval()
    policy = model.transformer
    params = perturbed(policy)
    x, s, embeds = toy_inputs(model)
    v_policy = model.velocity(policy, x, s, embeds)  # (n, L, C), with the adapter
    with torch.no_grad():
        v_ref = model.velocity(lora.AdapterOff(policy), x, s, embeds)
        v_base = model.velocity(base, x, s, embeds)
    assert torch.equal(v_ref, v_base)
    assert not torch.allclose(v_policy, v_base)
    v_policy.square().mean().backward()  # the reference call left the adapter on and trainable
    assert all(p.requires_grad and p.grad is not None for p in params)
    assert torch.equal(model.velocity(policy, x, s, embeds), v_policy.detach())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_saved_adapter_loads_into_the_stock_pipeline(family, tiny_flux_dir, tiny_sd3_dir, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = tiny_flux_dir if family == "flux" else tiny_sd3_dir
    model = load_model(str(folder), height=32, width=32)
    perturbed(model.transformer)
    lora.save_adapter(model.transformer, tmp_path / "lora")
    stock = (FluxPipeline if family == "flux" else StableDiffusion3Pipeline).from_pretrained(folder)
    stock.load_lora_weights(tmp_path / "lora")  # the stock loader, no project code
    evaluated = load_transformer(load_model(str(folder), height=32, width=32), tmp_path / "lora")  # eval.py's
    torch.manual_seed(3)
    embeds = model.encode_prompts(["a red circle"])
    x, s = torch.randn(1, *model.latent_shape), torch.tensor([0.7])  # (1, ...), (1,)
    with torch.no_grad():
        v = model.velocity(model.transformer.eval(), x, s, embeds)
        v_stock = model.velocity(stock.transformer.eval(), x, s, embeds)
        v_eval = model.velocity(evaluated, x, s, embeds)
        v_base = model.velocity(lora.AdapterOff(model.transformer), x, s, embeds)
    assert torch.allclose(v_stock, v, atol=1e-6) and torch.allclose(v_eval, v, atol=1e-6)
    assert not torch.allclose(v_base, v, atol=1e-3)


def test_eval_takes_a_lora_run_with_hybrid_rows(tiny_flux_dir, tmp_path):
    import eval
    from test_eval import PROMPTS, STEPS, flags, scores_by_row

    model = load_model(str(tiny_flux_dir), height=32, width=32)
    perturbed(model.transformer)
    lora.save_adapter(model.transformer, tmp_path / "run" / "checkpoints" / "iter_00001" / "lora")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    hybrid = ["--hybrid-steps", "0", str(STEPS), "1"]
    argv = flags(
        tiny_flux_dir, tmp_path, tmp_path / "eval", "--checkpoints", f"lora={tmp_path / 'run'}", *hybrid
    )
    eval.main(cli(eval.Args, eval.PRESETS, argv))
    rows = scores_by_row(json.loads((tmp_path / "eval" / "results.json").read_text()))
    base, trained = rows[str(tiny_flux_dir)], rows["lora"]
    assert base != trained  # base + adapter is not the base
    assert rows[f"lora [hybrid 0/{STEPS}]"] == base and rows[f"lora [hybrid {STEPS}/{STEPS}]"] == trained
    assert rows[f"lora [hybrid 1/{STEPS}]"] not in (base, trained)
