"""
The published recipes, as presets of the scripts' `Args` (`--preset NAME` switches every default at once). The
defaults of train_grpo.Args are themselves GCPO's FLUX.1-dev recipe (arXiv 2510.21583; github
xingzhejun/GCPO); each preset here names the script or config it reproduces, and what still differs and why.
"""

from pathlib import Path

TOY_CURVE = Path(__file__).resolve().parents[1] / "assets" / "toy" / "l1rel.json"

TRAIN = {
    # The toy world (not a paper's): 16 prompts x 8 images, all 128 trajectories in one optimizer step, 200
    # iterations (25,600 trajectories). The policy gradient of the toy's verifier is mostly noise
    # (scripts/gradient_snr.py: a batch of 128 has cosine ~0.01 with the next), so the preset buys volume: the
    # VAE's 16 tokens make a trajectory 2.6x cheaper than the pixel bundle's 64, and all 128 go into one
    # optimizer step, the setting that first learned (NOTES.md, issue 24). lr 1e-4 with Flow-GRPO's GenEval KL
    # (beta 0.04): at lr 5e-5 every run gained less, and at lr 1e-4 without the KL a step-level run collapsed
    # after ~175 iterations (README, Results). Each trajectory trains all 16 of its steps, as Flow-GRPO trains
    # all of its own: twice the default half's transitions, for 1.65x the time of an iteration (~6.4 s on one
    # thread against ~3.9), which lifted step-level GRPO's held-out gain from +0.057 to +0.071 (3 seeds,
    # paired by seed +0.009 to +0.024). Evaluated as Flow-GRPO evaluates, with an EMA of the weights, here
    # over the last ~20 iterations (0.95 a step): it lifted the chunk objective's held-out gain by ~0.01 on
    # each of 3 seeds and left the step objective's as it was.
    "toy": dict(
        model="toy",
        prompts="toy:train",
        reward=("toy",),
        height=32,
        width=32,
        prompts_per_rank=16,
        num_generations=8,
        rollout_batch_size=128,
        train_batch_size=64,
        timestep_fraction=1.0,
        clip_range=1e-3,
        learning_rate=1e-4,
        beta=0.04,
        max_grad_norm=1.0,
        gradient_accumulation_steps=128,
        num_iterations=200,
        ema_decay=0.95,
        gradient_checkpointing=False,
        output_dir="runs/toy-grpo",
        checkpoint_every=50,
        image_every=20,
        device="cpu",
    ),
    # Flow-GRPO's SD3.5-M PickScore recipe (github yifan123/flow_grpo, config/grpo.py `pickscore_sd3` over
    # config/base.py): 10 steps of the pipeline scheduler's own sigmas, all 9 trainable steps trained (its
    # timestep_fraction 0.99 of 10 steps), 48 prompts x 24 images an epoch (here 8 GPUs x 6 prompts), two
    # optimizer steps of it, batch std, no shared noise, clip 1e-4, KL beta 0.01, grad norm 1.0, LoRA r 32 /
    # alpha 64 (scripts/train_sd3.py) at lr 3e-4, an EMA of the weights for evaluation (its decay 0.9 every 8
    # optimizer steps, 0.9 ** (1 / 8) = 0.987 every step). Differences: bf16 compute where it uses fp16; the
    # EMA updates every step, without Flow-GRPO's warm-up ramp of the decay (plumbing/ema.py).
    "sd35": dict(
        model="stabilityai/stable-diffusion-3.5-medium",
        prompts="pickapic:train",
        reward=("pickscore",),
        height=512,
        width=512,
        guidance_scale=4.5,
        num_steps=10,
        schedule="pipeline",
        num_generations=24,
        prompts_per_rank=6,
        init_same_noise="none",
        rollout_batch_size=8,
        timestep_fraction=1.0,
        clip_range=1e-4,
        adv_std="batch",
        beta=0.01,
        lora_rank=32,
        lora_alpha=64,
        learning_rate=3e-4,
        max_grad_norm=1.0,
        gradient_accumulation_steps=72,
        ema_decay=0.987,
        output_dir="runs/sd35-grpo",
    ),
    # DanceGRPO's FLUX recipe (github XueZeyue/DanceGRPO, scripts/finetune/finetune_flux_grpo.sh, its 8-GPU
    # variant): the dance SDE at eta 0.3, 16 steps of shift 3, 720 px, 2 prompts x 12 images a GPU with one
    # initial noise, 60% of the steps trained, clip 1e-4, advantages clipped to 5, lr 1e-5, grad norm 1.0,
    # 12 trajectories an optimizer step, HPSv2.1, 300 iterations. The SLAS paper builds on this recipe: the
    # natural base for --slas-gamma. GCPO's reimplementation of it uses grad norm 0.01 and 17 steps instead.
    "dance": dict(
        reward=("hpsv2",),
        sde_mode="dance",
        eta=0.3,
        num_steps=16,
        timestep_fraction=0.6,
        clip_range=1e-4,
        max_grad_norm=1.0,
        num_iterations=300,
        output_dir="runs/dance-grpo",
    ),
}
# DanceGRPO's FLUX LoRA recipe (scripts/finetune/finetune_flux_grpo_8gpus_lora.sh, read through a public
# adaptation that lists its own changes): the dance recipe with 12 steps, LoRA rank 128 / alpha 256, lr 3e-4.
# One GPU runs one rank's share of it, 24 trajectories an iteration (`--prompts-per-rank 16` for all 192).
TRAIN["dance-lora"] = TRAIN["dance"] | dict(
    num_steps=12, lora_rank=128, lora_alpha=256, learning_rate=3e-4, output_dir="runs/dance-lora-grpo"
)

# train_chunk.py: the same recipes; the toy one cuts the toy model's own L1rel curve (64 held-out prompts,
# `python chunking.py --output-dir assets/toy`) into 4 chunks with the `curve` rule.
CHUNK = {name: {**p, "output_dir": p["output_dir"].replace("grpo", "chunk")} for name, p in TRAIN.items()}
# Its chunks are drawn as GCPO draws them, half of them per trajectory (`chunk_fraction` 0.5, ~7 of 16 steps
# with weighted sampling): training all of them would leave weighted sampling nothing to choose.
CHUNK["toy"] |= dict(chunk_layout="curve", chunk_curve=str(TOY_CURVE))
# GCPO publishes chunks only for its 17-step FLUX schedule ([2, 3, 4, 7] of 16 trainable steps). The recipes
# with other schedules keep its shape: four chunks, each its share of the T trainable steps (2/16, 3/16, 4/16,
# 7/16 of T, rounded to sum to T), short where the latents move fast and long at the end.
CHUNK["sd35"] |= dict(chunk_sizes=(1, 2, 2, 4))  # T = 9
CHUNK["dance"] |= dict(chunk_sizes=(2, 3, 4, 6))  # T = 15
CHUNK["dance-lora"] |= dict(chunk_sizes=(1, 2, 3, 5))  # T = 11

# train_awm.py: the same rollouts, AWM's loss and its hyper-parameters (github
# scxue/advantage_weighted_matching, config/dgx_awm.py): LoRA r 32 / alpha 64 at lr 3e-4, grad norm 1.0,
# advantages over one std of the whole batch, one optimizer step per rollout batch, 6 of 14 sigmas trained.
# Its PickScore run on SD3.5-M: KL to the base 1e-4; rollouts here stay Flow-GRPO's (AWM samples 14 ODE steps
# without CFG), training 6 of their 9 sigmas. The toy preset is train_grpo.py's, the loss AWM's, at the lr,
# KL and timestep fraction it was measured with before the GRPO preset moved to lr 1e-4 / beta 0.04, an EMA
# and all 16 steps trained (not measured for AWM). AWM's own EMA (of recent policies, the loss's anchor) is
# not Flow-GRPO's evaluation EMA: neither AWM preset keeps one.
AWM = {
    "toy": TRAIN["toy"]
    | dict(learning_rate=5e-5, beta=0.0, ema_decay=0.0, timestep_fraction=0.5, output_dir="runs/toy-awm"),
    "sd35": TRAIN["sd35"]
    | dict(beta=1e-4, timestep_fraction=0.67, gradient_accumulation_steps=144, ema_decay=0.0)
    | dict(output_dir="runs/sd35-awm"),
    # GCPO's FLUX.1-dev rollouts (the defaults) with Flow-Factory's FLUX AWM config (arXiv 2602.12529,
    # examples/awm/lora/flux1/default.yaml: LoRA r 64 / alpha 128, no KL, 4 of 10 sigmas) and AWM's lr,
    # grad norm, batch std and one optimizer step per rank's 24 trajectories.
    "flux": dict(
        lora_rank=64,
        lora_alpha=128,
        learning_rate=3e-4,
        max_grad_norm=1.0,
        adv_std="batch",
        timestep_fraction=0.4,
        gradient_accumulation_steps=24,
        output_dir="runs/flux-awm",
    ),
}

EVAL = {
    # The toy model samples with its training schedule (17 steps, shift 3); hybrid 10 of 17 is GCPO's 30/50.
    "toy": dict(
        model="toy",
        prompts="toy:heldout",
        num_prompts=200,
        reward=("toy",),
        num_steps=17,
        schedule="shift",
        height=32,
        width=32,
        prompts_per_batch=50,
        output_dir="runs/toy-eval",
        device="cpu",
    ),
}
