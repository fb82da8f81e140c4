"""Fixtures shared across layers: a small char-level dataset and a tiny LM recipe."""

from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from genforge.data.tokens import prepare_text_dataset

# The test models are tiny: a second intra-op thread gains nothing, and OpenMP's spin-waiting makes
# them many times slower whenever the cores are shared (a server subprocess, a busy CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory) -> Path:
    """A small char-level dataset from the CPython docs (fast to prepare and to learn)."""
    root = tmp_path_factory.mktemp("chardata")
    text = "\n\n".join(topics[k] for k in sorted(topics))[:60_000]
    (root / "docs.txt").write_text(text, encoding="utf-8")
    prepare_text_dataset(str(root / "docs.txt"), str(root / "ds"), tokenizer="char", val_fraction=0.1,
                         doc_split="file")
    return root / "ds"


@pytest.fixture
def tiny_recipe():
    return make_tiny_recipe


def make_tiny_recipe(tmp_path: Path, dataset: Path, name: str = "r", **train) -> Path:
    """An lm recipe small enough to train dozens of steps in a second or two."""
    t = {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10,
         "eval_batches": 4, "log_every": 5, "checkpoint_every": 10, "keep_last": 2, "seed": 7, **train}
    lines = "\n".join(f"  {k}: {v}" for k, v in t.items())
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nfamily: lm\ndataset: {dataset}\nout_dir: {tmp_path / 'runs'}\n"
                 f"model:\n  preset: lm-nano\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 2\n"
                 f"  num_kv_heads: 1\n  intermediate_size: 64\n  context_length: 32\ntrain:\n{lines}\n")
    return p


# --- a tiny text-to-image model (contract 3 of issue 11): random UNet and VAE, the real MiniLM encoder ---

T2I_SIZE = 16  # 16 x 16 x 1 images; a 4 x 8 x 8 latent
T2I_MAX_TOKENS = 16


def make_tiny_text_to_image(run: Path) -> Path:
    """A latent-diffusion run folder: RUN/recipe.yaml and RUN/model/ (a StableDiffusionPipeline with a
    random 1-channel AutoencoderKL and UNet2DConditionModel, all-MiniLM-L6-v2 as text encoder, DDIM)
    plus genforge.json. ~0.5 s to build and save; untrained, so tests check mechanics, not pictures."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertModel, BertTokenizerFast

    from genforge.models.embeddings import default_embedder_path

    torch.manual_seed(0)
    encoder_dir = default_embedder_path()
    encoder = BertModel.from_pretrained(encoder_dir, add_pooling_layer=False).eval()
    encoder.config.use_attention_mask = True  # as the latent-diffusion family saves it (padding masked out)
    tokenizer = BertTokenizerFast.from_pretrained(encoder_dir, model_max_length=T2I_MAX_TOKENS)
    unet = UNet2DConditionModel(
        sample_size=T2I_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=encoder.config.hidden_size, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=T2I_SIZE)
    with torch.no_grad():  # a near-deterministic posterior (log-variance -20), as a trained VAE's is nearly
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20.0
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    model = run / "model"
    pipe.save_pretrained(model)
    meta = {"family": "latent-diffusion", "image_size": T2I_SIZE, "channels": 1, "classes": [str(i) for i in range(10)],
            "dataset": {}, "text_encoder": {"source": str(encoder_dir), "max_tokens": T2I_MAX_TOKENS},
            "vae_scaling_factor": vae.config.scaling_factor}
    (model / "genforge.json").write_text(json.dumps(meta), encoding="utf-8")
    (run / "recipe.yaml").write_text("name: tiny-t2i\nfamily: latent-diffusion\n", encoding="utf-8")
    return run


@pytest.fixture(scope="session")
def t2i_run(tmp_path_factory) -> Path:
    """A tiny random text-to-image run (see make_tiny_text_to_image), built once per session."""
    return make_tiny_text_to_image(tmp_path_factory.mktemp("t2i") / "tiny-t2i")


@pytest.fixture(scope="session")
def t2i_pipe(t2i_run):
    from genforge.models.text_to_image import load_pipeline

    return load_pipeline(t2i_run)


# --- PostgreSQL + pgvector (tests/pg.py): one server per session, a fresh database per test ---

@pytest.fixture(scope="session")
def pg_server():
    from tests.pg import running_pg

    with running_pg() as server:
        yield server


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """URI of the session's PostgreSQL (database `postgres`, pgvector installed)."""
    return pg_server.get_uri("postgres")


@pytest.fixture
def pg_store_url(pg_server) -> str:
    """URI of a database of its own for this test, so tests never see each other's rows."""
    from tests.pg import fresh_database

    return fresh_database(pg_server)


def tiny_random_llama(max_position_embeddings: int = 128):
    """A random tiny Llama over a 300-piece byte-level BPE: near-uniform next-token distributions (model, tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok
