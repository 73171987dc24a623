"""Shared fixtures: tiny random FLUX and SD3 pipelines built from configs, saved in the real diffusers layout.

Nothing is downloaded: tokenizers are built offline with the `tokenizers` library and every model is randomly
initialised from a config, then written with `save_pretrained` so tests load it through `models.load_model`.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = (
    "a an the red blue green yellow circle square triangle cat dog photo of on left right two three".split()
)


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    tok = Tokenizer(
        models.Unigram(
            [(w, -1.0) for w in ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in WORDS]], unk_id=2
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def clip_text_model(hidden, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_model(d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=64,
            d_model=d_model,
            d_ff=2 * d_model,
            d_kv=8,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5,
        shift_factor=0.1,
    )


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-flux")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=scheduler(),
        vae=tiny_vae(4),
        text_encoder=clip_text_model(32),
        tokenizer=clip_tokenizer(folder / "_clip"),
        text_encoder_2=t5_model(32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-sd3")
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
    )
    tokenizer = clip_tokenizer(folder / "_clip")
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler(),
        vae=tiny_vae(4),
        text_encoder=clip_text_model(16, 16),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_model(16, 16),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_model(32),
        tokenizer_3=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def batch(tiny_flux_dir):
    """A tiny FLUX, 6 trajectories (2 prompts x 3, 7 steps: T = 6 trainable) and made-up advantages;
    one per test module, which may nudge the model's weights."""
    from plumbing.models import load_model
    from sampler import rollout

    torch.manual_seed(0)
    model = load_model(tiny_flux_dir, height=32, width=32)
    traj = rollout(model, ["a red circle", "two blue squares"], num_generations=3, num_steps=7, seed=0)
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0, 0.7, 1.5])
    return model, traj, adv
