"""What training a TA-Tok needs besides the model itself (tarflow.models.tatok.TATok, whose `forward` is the
training pass): the frozen teacher, the text-aligned codebook from an LLM's input embeddings, the initial
student, the reconstruction distance, and codebook-usage bookkeeping. Plain PyTorch; no Ray.

    teacher: SigLIP vision encoder (an HF SiglipModel / SiglipVisionModel folder, or the encoder of a ta_tok.pth),
             frozen, only up to select_layer_id                                    pixels -> (B, g*g, C)
    student: a TATok whose encoder starts as the teacher; the rest (task layers, bottleneck linears, decoder)
             from PyTorch's default init under the run's seed
    codebook `embedding` (K, D): K rows of the LLM's input embeddings (D = its hidden size), frozen;
             `embedding_proj` (D, D) starts as the identity (bias 0), so the codebook starts as exactly the
             normalised LLM rows, and is learned (SimVQ: the whole codebook moves through one linear map, so no
             code is left behind as in a per-row codebook, and the rows stay those of the LLM's tokens)
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tarflow.data import storage
from tarflow.models.tatok import SiglipEncoder, TATok, TATokArgs, VisionConfig, reference_args

ROW_SELECTIONS = ("first", "frequent")


class TrainInitError(ValueError):
    """A teacher or LLM folder that cannot serve: the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Safetensors, read by ranges: an LLM's embedding matrix without loading the model (local or s3://)


def _safetensors_files(folder: str) -> list[str]:
    index = storage.join(folder, "model.safetensors.index.json")
    if storage.exists(index):
        files = sorted(set(json.loads(storage.read_bytes(index))["weight_map"].values()))
        return [storage.join(folder, f) for f in files]
    single = storage.join(folder, "model.safetensors")
    if storage.exists(single):
        return [single]
    raise TrainInitError(f"{folder}: no model.safetensors (nor model.safetensors.index.json); save the model with "
                         "save_pretrained(..., safe_serialization=True)")


def _header(path: str) -> tuple[dict, int]:
    fs, p = storage.filesystem(storage.model_file(path))
    with fs.open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_tensor(path: str, entry: dict, start: int) -> torch.Tensor:
    """One tensor of a safetensors file, reading only its byte range."""
    fs, p = storage.filesystem(storage.model_file(path))
    b, e = entry["data_offsets"]
    with fs.open(p, "rb") as f:
        f.seek(start + b)
        data = bytearray(f.read(e - b))
    return torch.frombuffer(data, dtype=_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"]).clone()


def find_tensors(folder: str, want) -> dict[str, tuple[str, dict, int]]:
    """{name: (file, header entry, data start)} of the tensors whose name satisfies `want`."""
    out = {}
    for path in _safetensors_files(folder):
        header, start = _header(path)
        out.update({k: (path, v, start) for k, v in header.items() if k != "__metadata__" and want(k)})
    return out


# ----------------------------------------------------------------------------------------------------------
# Teacher


def read_config(folder: str) -> dict:
    path = storage.join(folder, "config.json")
    if not storage.exists(path):
        raise TrainInitError(f"{folder}: no config.json; give a transformers model folder (save_pretrained)")
    return json.loads(storage.read_bytes(path))


def load_siglip_folder(folder: str) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(vision config, vision tower state dict named as TATok.encoder's) of an HF SiglipModel or
    SiglipVisionModel folder (google/siglip2-so400m-patch14-384 is one: model_type "siglip")."""
    cfg = read_config(folder)
    if cfg.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise TrainInitError(f"{folder}: model_type {cfg.get('model_type')!r} is not a SigLIP vision encoder; give a "
                             "SiglipModel folder (e.g. google/siglip2-so400m-patch14-384)")
    tensors = find_tensors(folder, lambda k: k.startswith("vision_model."))
    if not tensors:
        raise TrainInitError(f"{folder}: no vision_model.* weights in its safetensors")
    sd = {k.removeprefix("vision_model."): read_tensor(*v) for k, v in tensors.items()}
    return VisionConfig.from_json(cfg), sd


def frozen_teacher(encoder: SiglipEncoder, n_layers: int) -> SiglipEncoder:
    """A frozen copy of `encoder` that keeps only what hidden_states[select_layer_id] needs."""
    t = copy.deepcopy(encoder)
    t.encoder.layers = t.encoder.layers[:n_layers]
    for name in ("post_layernorm", "head"):
        if hasattr(t, name):
            delattr(t, name)
    return t.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------
# Codebook rows from an LLM


def llm_hidden_size(folder: str) -> int:
    cfg = read_config(folder)
    cfg = cfg.get("text_config", cfg)
    if "hidden_size" not in cfg:
        raise TrainInitError(f"{folder}: config.json has no hidden_size; give a Qwen2 (causal LM) folder")
    return int(cfg["hidden_size"])


def load_tokenizer(folder: str):
    """The LLM's tokenizer; from S3 only its small top-level files are copied (cached), never the weights."""
    from transformers import AutoTokenizer

    from tarflow.models.mllm import default_cache_dir

    local = folder
    if storage.is_remote(folder):
        weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
        local = str(storage.cached_folder_copy(folder, default_cache_dir(), maxdepth=1, keep=lambda rel: "/" not in rel
                                               and not rel.endswith(weights)))
    return AutoTokenizer.from_pretrained(local, local_files_only=True)


def select_rows(tokenizer, num_rows: int, k: int, how: str = "first", text: str | None = None) -> list[int]:
    """The K token ids whose embedding rows become the codebook, in code order.

    first:    the first K ids of the vocabulary that are not special or added tokens (Qwen2's special tokens
              sit at the end, so these are its first K byte-level BPE tokens);
    frequent: the K ids most frequent in `text` (tokenized by the LLM's tokenizer; ties by id), then `first`
              order for the rest when the text has fewer than K distinct tokens.
    """
    if how not in ROW_SELECTIONS:
        raise ValueError(f"row selection {how!r}: choose one of {ROW_SELECTIONS}")
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    eligible = [i for i in range(num_rows) if i not in special and i < len(tokenizer)]
    if len(eligible) < k:
        raise TrainInitError(f"only {len(eligible)} non-special tokens, fewer than the {k} codes asked for; lower "
                             "--codebook-size")
    if how == "first":
        return eligible[:k]
    counts = Counter(i for line in (text or "").splitlines() if line.strip()
                     for i in tokenizer(line, add_special_tokens=False)["input_ids"] if i not in special)
    picked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:k]
    seen = set(picked)
    return picked + [i for i in eligible if i not in seen][: k - len(picked)]


def embedding_rows(folder: str, ids: list[int]) -> torch.Tensor:
    """(K, D) float32: rows `ids` of the LLM's input embedding matrix (`*embed_tokens.weight`)."""
    found = find_tensors(folder, lambda k: k.endswith("embed_tokens.weight"))
    if len(found) != 1:
        raise TrainInitError(f"{folder}: expected one *embed_tokens.weight tensor, found {sorted(found) or 'none'}; "
                             "give a Qwen2 causal-LM folder")
    (path, entry, start), = found.values()
    table = read_tensor(path, entry, start)
    return table[torch.tensor(ids, dtype=torch.long)].float()


# ----------------------------------------------------------------------------------------------------------
# The initial student


def new_tatok(enc: VisionConfig, encoder_sd: dict, codebook_rows: torch.Tensor, *, teacher: str,
              decoder_depth: int = 3, select_layer_id: int = -2, stochastic_temperature: float = 0.03) -> TATok:
    """A TATok to train: encoder = the teacher's weights, codebook `embedding` = `codebook_rows` (K, D),
    `embedding_proj` = identity, everything else PyTorch's default init (under the caller's seed)."""
    K, D = codebook_rows.shape
    raw = reference_args(enc, teacher=teacher, bottleneck_dim=D, codebook_size=K, decoder_depth=decoder_depth,
                         select_layer_id=select_layer_id, stochastic_temperature=stochastic_temperature)
    model = TATok(TATokArgs.from_ckpt_args(raw), enc)
    missing, unexpected = model.encoder.load_state_dict(encoder_sd, strict=False)
    if missing or unexpected:
        raise TrainInitError(f"teacher {teacher}: its vision weights do not fit its config (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        reg = model.bottleneck.regularizer
        reg.embedding.weight.copy_(codebook_rows)
        reg.embedding_proj.weight.copy_(torch.eye(D))
        reg.embedding_proj.bias.zero_()
    return model


# ----------------------------------------------------------------------------------------------------------
# Objective and metrics

REC_DISTANCES = ("cosine", "mse", "both")


def rec_distances(rec: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - cosine similarity, relative MSE), each a mean over tokens, in float32.

    Cosine judges each token's direction whatever its norm; SigLIP's hidden states carry a few channels with
    very large magnitudes, which a raw MSE would be all about. The relative MSE (|rec - t|^2 / |t|^2 per batch)
    pins the magnitudes too, which the de-tokenizers see through their linear condition projections, and is
    O(1) whatever the teacher's scale, so the two add without a tuned weight."""
    rec, target = rec.float(), target.float()
    cos = 1.0 - F.cosine_similarity(rec, target, dim=-1).mean()
    mse = (rec - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
    return cos, mse


@dataclass
class Usage:
    used: int  # codes used at least once in the window
    perplexity: float  # exp(entropy) of the window's code distribution: K when uniform, 1 when one code
    dead: int  # K - used


class UsageWindow:
    """Code counts over the last `window` steps (a running sum plus each step's sparse counts)."""

    def __init__(self, codebook_size: int, window: int):
        self.K, self.window = codebook_size, window
        self.steps: deque = deque()
        self.counts = np.zeros(codebook_size, dtype=np.int64)

    def push(self, hist: np.ndarray) -> None:  # (K,) counts of one step
        nz = np.flatnonzero(hist)
        self.steps.append((nz, hist[nz].astype(np.int64)))
        self.counts[nz] += hist[nz].astype(np.int64)
        while len(self.steps) > self.window:
            idx, c = self.steps.popleft()
            self.counts[idx] -= c

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.window

    def usage(self) -> Usage:
        total = self.counts.sum()
        used = int((self.counts > 0).sum())
        if not total:
            return Usage(0, 0.0, self.K)
        p = self.counts[self.counts > 0] / total
        return Usage(used, float(math.exp(-(p * np.log(p)).sum())), self.K - used)

    def dead_codes(self) -> np.ndarray:
        return np.flatnonzero(self.counts == 0)

    def reset(self) -> None:
        self.steps.clear()
        self.counts[:] = 0


@torch.no_grad()
def restart_codes(model: TATok, dead: torch.Tensor, targets: torch.Tensor) -> None:
    """Move dead codes onto encoder outputs: row k of `embedding` becomes the e with embedding_proj(e) = z_k
    (least squares through the current projection), so code k's normalised entry is z_k's direction. Such a
    row is no longer the LLM's token: restarts trade text alignment for usage, hence off by default."""
    reg = model.bottleneck.regularizer
    W, b = reg.embedding_proj.weight.float(), reg.embedding_proj.bias.float()  # proj(e) = W e + b
    rows = torch.linalg.lstsq(W, (targets.float().to(W.device) - b).t()).solution.t()  # (n, D)
    reg.embedding.weight[dead.to(W.device)] = rows.to(reg.embedding.weight.dtype)
