"""The demo model family: every model a job needs, small, random, self-consistent, made once with fixed seeds
under $TARFLOW_HOME/models (what `make demo`, `make run` and the tests use when no checkpoint is given). Built
from tarflow.models; the bundled sample photos and question they are made for: tarflow.data.sample.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

from tarflow.data.sample import DEMO_QUESTION, SAMPLE_PHOTOS
from tarflow.data.storage import tarflow_home

DEFAULT_SEED = 0
RANDOM_TATOK_NAME = f"tatok-RANDOM-UNTRAINED-tiny-seed{DEFAULT_SEED}"


def ensure_random_tatok(home: Path | None = None) -> Path:
    """Path of the default small random-weight TA-Tok checkpoint (reference format), created once."""
    import torch

    from tarflow.data import storage
    from tarflow.models.tatok import random_tatok

    folder = (home or tarflow_home()) / "models" / RANDOM_TATOK_NAME
    path = folder / "ta_tok.pth"
    if not path.exists():
        model, enc_config = random_tatok(DEFAULT_SEED, teacher="encoder")
        (folder / "encoder").mkdir(parents=True, exist_ok=True)
        (folder / "encoder" / "config.json").write_text(json.dumps(enc_config, indent=2))
        (folder / "README.txt").write_text(
            "RANDOM, UNTRAINED TA-Tok for demos and tests (seed %d, created %s).\n"
            "Its codes are deterministic but carry no meaning. Use the released ta_tok.pth for real work.\n"
            % (DEFAULT_SEED, time.strftime("%Y-%m-%d")))
        buf = io.BytesIO()
        torch.save(model.checkpoint_dict(), buf)
        storage.write_bytes_atomic(str(path), buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------------
# The demo model family: every model a job needs, small, random, self-consistent, made once with fixed seeds.
#
#   TA-Tok   ensure_random_tatok()    224 px, 16 x 16 grid (256 / 64 / 25 codes at scales 1 / 2 / 3),
#                                     1,024 codes of width 32, encoder width 96
#   VQ       ensure_demo_vq()         LlamaGen layout, 16x down, 256 codes: 64 tokens at DEMO_VQ_RESOLUTION
#   AR       ensure_demo_ar_detok()   TA-Tok rec features (96 wide, up to 256) -> 64 VQ tokens (256 codes)
#   base     ensure_demo_base()       a tiny Qwen2 (hidden 32) on a small byte-level BPE chat tokenizer
#   Tar      ensure_demo_tar()        the base with Tar's tokens for the TA-Tok's 1,024 codes, image rows =
#                                     the TA-Tok codebook (as the trainer starts from a base)
#   SANA     ensure_demo_sana()       a SANA pipeline (diffusers, the `diffusion` extra): a DC-AE 4x down with
#                                     4 latent channels, a 1-layer transformer on the TA-Tok's rec features
#
# Folder names say RANDOM-UNTRAINED, and each holds a README.txt saying so: their outputs are meaningless.
# They show every job running end to end (`make demo`); real results need the released checkpoints.

DEMO_VQ_RESOLUTION = 128  # the demo AR de-tokenizer's images: 8 x 8 VQ tokens
DEMO_LATENT_RESOLUTION = 64  # the demo SANA's images: its DC-AE makes 4 x 16 x 16 latents of them
DEMO_SYSTEM = "You are a helpful assistant."
# Qwen2.5's chat layout (ChatML with its default system turn), without the tool-calling parts
DEMO_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEMO_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEMO_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_UNTRAINED = ("RANDOM, UNTRAINED {what} for demos and tests (seed %d, created %s).\n"
              "Its outputs are deterministic but carry no meaning. Use the released checkpoints for real work.\n")


def demo_model_folder(kind: str, home: Path | None = None) -> Path:
    return (home or tarflow_home()) / "models" / f"{kind}-RANDOM-UNTRAINED-tiny-seed{DEFAULT_SEED}"


def _build_once(folder: Path, build) -> Path:
    """Run build(tmp_folder) and move the result into place: a folder is there whole or not at all."""
    import shutil
    import tempfile

    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not folder.exists():  # not a lost race with another process building the same folder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _save_torch(obj, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())


def ensure_demo_vq(home: Path | None = None) -> Path:
    """A small random pixel VQ in LlamaGen's checkpoint format (`vq.pt`)."""
    import torch

    from tarflow.models.vqvae import VQVAE, VQConfig

    def build(tmp: Path):
        with torch.random.fork_rng():
            torch.manual_seed(DEFAULT_SEED)
            model = VQVAE(VQConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32,
                                   codebook_size=256, codebook_dim=8))
        _save_torch(model.checkpoint_dict(), tmp / "vq.pt")
        (tmp / "README.txt").write_text(_UNTRAINED.format(what="pixel VQ") % (DEFAULT_SEED, time.strftime("%F")))

    return _build_once(demo_model_folder("vq", home), build) / "vq.pt"


def ensure_demo_ar_detok(home: Path | None = None) -> Path:
    """A small random AR de-tokenizer matching the demo TA-Tok (condition) and demo VQ (vocabulary, 64 tokens)."""
    import torch

    from tarflow.models.ar_detok import ARArgs, ARDetokenizer
    from tarflow.models.tatok import TATok

    tatok = TATok.from_checkpoint(str(ensure_random_tatok(home)))

    def build(tmp: Path):
        args = ARArgs(dim=64, n_layer=2, n_head=4, multiple_of=32, model_type="clip_cond",
                      cond_dim=tatok.encoder_cfg.hidden_size, vocab_size=256, cls_token_num=tatok.num_tokens(1),
                      max_seq_len=(DEMO_VQ_RESOLUTION // 16) ** 2)
        with torch.random.fork_rng():
            torch.manual_seed(DEFAULT_SEED)
            model = ARDetokenizer(args)
        model.name = "llama-abs-demo"
        _save_torch(model.checkpoint_dict(), tmp / "ar_dtok.pth")
        (tmp / "README.txt").write_text(_UNTRAINED.format(what="AR de-tokenizer") % (DEFAULT_SEED,
                                                                                     time.strftime("%F")))

    return _build_once(demo_model_folder("ar-detok", home), build) / "ar_dtok.pth"


def demo_tokenizer():
    """A small Qwen2-style chat tokenizer (byte-level BPE, ~500 tokens, learnt from the sample's captions and
    the prompts' words), with Qwen2.5's chat markers and layout. Built from the runtime dependencies alone.

    The self-reflection question and its answers are in the corpus so that, as in Qwen2's vocabulary, "Yes",
    " yes", "No", " no", ... are single tokens: reflect (generate --reflect) scores P(yes) against P(no) at one
    position, which is only defined for single-token answers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    from tarflow.models.reflect import AFFIRMATIVE_WORDS, DEFAULT_QUESTION, NEGATIVE_WORDS

    corpus = [c for _, c in SAMPLE_PHOTOS] + [DEMO_SYSTEM, DEMO_QUESTION, "user\n", "assistant\n", "system\n",
                                              "A photo of a cat, a dog, a car, a house, a tree and a person.",
                                              DEFAULT_QUESTION, *AFFIRMATIVE_WORDS, *NEGATIVE_WORDS]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_tokens([AddedToken(t, normalized=False, special=True) for t in DEMO_SPECIAL_TOKENS])
    return Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>"],
                              model_max_length=4096, clean_up_tokenization_spaces=False,
                              chat_template=DEMO_CHAT_TEMPLATE)


def ensure_demo_base(home: Path | None = None) -> Path:
    """A tiny random Qwen2 'base' folder (no Tar tokens yet) with the demo tokenizer: what train_mllm's --base
    takes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(tmp: Path):
        tok = demo_tokenizer()
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                          bos_token_id=None)
        with torch.random.fork_rng():
            torch.manual_seed(DEFAULT_SEED)
            model = Qwen2ForCausalLM(cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.txt").write_text(_UNTRAINED.format(what="Qwen2 base") % (DEFAULT_SEED, time.strftime("%F")))

    return _build_once(demo_model_folder("qwen2-base", home), build)


def ensure_demo_tar(home: Path | None = None) -> Path:
    """The demo base with Tar's tokens for the demo TA-Tok's codes (image rows = its codebook): what caption's
    --model and generate's --mllm take. Untrained: its captions and images are noise (`make demo` trains one)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tarflow.models.mllm import add_tar_tokens, new_tar_model
    from tarflow.models.tatok import TATok

    base = ensure_demo_base(home)
    tatok = TATok.from_checkpoint(str(ensure_random_tatok(home)))

    def build(tmp: Path):
        tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
        add_tar_tokens(tok, num_image_tokens=tatok.codebook_size)
        model = Qwen2ForCausalLM.from_pretrained(base, local_files_only=True)
        with torch.no_grad():
            new_tar_model(model, tok, tatok.bottleneck.regularizer.codebook().detach())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.txt").write_text(_UNTRAINED.format(what="Tar MLLM") % (DEFAULT_SEED, time.strftime("%F")))

    return _build_once(demo_model_folder("tar", home), build)


def ensure_demo_sana(home: Path | None = None) -> Path:
    """A tiny random SANA pipeline folder (transformer/, vae/, scheduler/, model_index.json, as Tar's SANA
    de-tokenizer folders) conditioned on the demo TA-Tok's rec features: what the tokenize job's --latents, the
    diffusion trainer's --init and generate's --diffusion-detok take. Images of DEMO_LATENT_RESOLUTION px.
    Needs diffusers (`pip install 'tarflow[diffusion]'`)."""
    import torch

    from tarflow.models.diffusion_detok import _import_diffusers
    from tarflow.models.tatok import TATok

    diffusers = _import_diffusers()
    tatok = TATok.from_checkpoint(str(ensure_random_tatok(home)))

    def build(tmp: Path):
        heads, head_dim = 2, 16
        with torch.random.fork_rng():
            torch.manual_seed(DEFAULT_SEED)
            vae = diffusers.AutoencoderDC(  # three blocks: 4x down; SANA's DC-AE f32c32 scaling factor
                in_channels=3, latent_channels=4, attention_head_dim=4,
                encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
                encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407)
            transformer = diffusers.SanaTransformer2DModel(
                in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=1,
                num_cross_attention_heads=heads, cross_attention_head_dim=head_dim,
                cross_attention_dim=heads * head_dim, caption_channels=tatok.encoder_cfg.hidden_size,
                sample_size=DEMO_LATENT_RESOLUTION // 4, patch_size=1, mlp_ratio=2.0)
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                          use_flow_sigmas=True, flow_shift=3.0)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # not "text_encoder=None cannot be saved": none is meant
        try:
            diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=scheduler).save_pretrained(tmp)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        (tmp / "README.txt").write_text(_UNTRAINED.format(what="SANA de-tokenizer") % (DEFAULT_SEED,
                                                                                       time.strftime("%F")))

    return _build_once(demo_model_folder("sana", home), build)


def demo_warning(what: str, path) -> str:
    return (f"no {what}: using the RANDOM, UNTRAINED demo model {path}: its outputs are meaningless (real results "
            "need the released checkpoints; see the README)")
