"""Tokenizers, token memmaps, training batches and the unigram baseline.

Token ids are stored as flat numpy memmaps (``train.bin``, ``val.bin``) of
the smallest unsigned dtype that holds the vocabulary; documents are joined
with the end-of-text token. ``meta.json`` records vocab size, dtype, token
counts and the split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .corpus import read_documents
from .io import atomic_path, read_json, write_json

EOT = "<|endoftext|>"


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when ids fit, else uint32; an explicit dtype must hold every id."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dt = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise ValueError(
            f"tokenizer.dtype={requested} cannot hold token ids up to {vocab_size - 1} "
            f"(tokenizer.vocab_size={vocab_size}); use uint32 or 'auto'"
        )
    return dt


def train_bpe(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def pretrained_tokenizer(name: str):
    """The fast tokenizer of a Hugging Face model id (e.g. ``gpt2``); needs the hub or its cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name).backend_tokenizer


def load_tokenizer(path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    return Tokenizer.from_file(str(path))


def encode_documents(tok, docs: list[str], eot_id: int, chunk_chars: int = 1 << 20) -> np.ndarray:
    """Encode documents, each followed by the end-of-text id, as one int64 array."""
    pieces = []
    for doc in docs:
        # long documents (a WikiText split is one document) are encoded in
        # line-aligned chunks so memory stays bounded
        start = 0
        while start < len(doc):
            end = min(len(doc), start + chunk_chars)
            if end < len(doc):
                nl = doc.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            pieces.append(np.asarray(tok.encode(doc[start:end]).ids, dtype=np.int64))
            start = end
        pieces.append(np.array([eot_id], dtype=np.int64))
    return np.concatenate(pieces)


def write_memmap(path, ids: np.ndarray, dtype: np.dtype) -> None:
    with atomic_path(path) as tmp:
        ids.astype(dtype).tofile(tmp)


def build_tokenized_corpus(cfg: dict, train_txt, val_txt, split_json, out_dir) -> dict:
    """Train/load the tokenizer per the ``tokenizer`` config; write bins, tokenizer.json, meta.json."""
    out_dir = Path(out_dir)
    train_docs, val_docs = read_documents(train_txt), read_documents(val_txt)
    if cfg["kind"] == "bpe":
        tok = train_bpe(train_docs, cfg["vocab_size"])
    else:
        tok = pretrained_tokenizer(cfg["name"])
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size, cfg.get("dtype", "auto"))
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"tokenizer '{cfg.get('name', 'bpe')}' has no {EOT} token")
    train_ids = encode_documents(tok, train_docs, eot_id)
    val_ids = encode_documents(tok, val_docs, eot_id)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_memmap(out_dir / "train.bin", train_ids, dtype)
    write_memmap(out_dir / "val.bin", val_ids, dtype)
    meta = dict(
        vocab_size=vocab_size,
        dtype=dtype.name,
        eot_id=eot_id,
        train_tokens=int(train_ids.size),
        val_tokens=int(val_ids.size),
        tokenizer=dict(cfg),
        split=read_json(split_json),
    )
    write_json(out_dir / "meta.json", meta)
    return meta


def open_tokens(path, meta: dict) -> np.memmap:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token file not found")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


class BatchSampler:
    """Random (x, y) windows from a token memmap, reproducible from its generator state.

    ``x[b] = tokens[o_b : o_b + T]``, ``y[b] = tokens[o_b + 1 : o_b + T + 1]``
    with offsets ``o_b`` drawn uniformly by a seeded ``torch.Generator``; the
    generator state is part of a training checkpoint so a resumed run draws
    the same batches as an uninterrupted one.

    Data-parallel ranks share the seed: each draws the offsets of the whole
    ``world_size · batch_size`` batch and keeps its own slice, so all ranks'
    generators stay equal (one checkpoint serves them all) and ``n`` ranks
    see exactly the batches one process at ``n · batch_size`` would.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of model.block_size={block_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._window = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(
            len(self.tokens) - self.block_size - 1, (self.world_size * self.batch_size,), generator=self.generator
        ).numpy()
        offsets = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        xy = torch.from_numpy(self.tokens[offsets[:, None] + self._window].astype(np.int64))
        if self.device.startswith("cuda"):
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int, max_tokens: int | None) -> np.ndarray:
    """Non-overlapping [N, T+1] windows covering the first ``max_tokens`` tokens (fixed, no RNG)."""
    n = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
    n_windows = n // block_size
    if n_windows == 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one window")
    idx = np.arange(n_windows)[:, None] * block_size + np.arange(block_size + 1)
    return np.asarray(tokens[idx], dtype=np.int64)


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """exp of the cross-entropy of ``targets`` under add-one-smoothed train-split unigram frequencies."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(targets).ravel()].mean()))
