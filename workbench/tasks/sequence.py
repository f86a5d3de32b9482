"""Sequence: a tiny decoder-only transformer pre-trained to copy a sequence, adapted to reverse it.

An example is n = 8 random symbols from {0, ..., 15}, a separator and an answer::

    copy (pre-training):   x1 ... xn SEP x1 ... xn
    reverse (adaptation):  x1 ... xn SEP xn ... x1

The model reads the example without its last token, (2n,), and predicts every next token; only
the n answer tokens are scored, the other targets are ``IGNORE_INDEX``. Both tasks are one
attention pattern over positions: the k-th answer token is source token k (copy) or n + 1 - k
(reverse). So the frozen base is at chance on reversing (1/16), and adapters on the attention
projections can learn the new pattern. The symbols are synthetic, drawn from the seed.

The transformer reads top to bottom like nanoGPT, with Llama's module names (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``; ``gate_proj``, ``up_proj``, ``down_proj``), pre-norm RMSNorm
blocks, a SwiGLU MLP, learned absolute positions and no biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .base import IGNORE_INDEX, SPLITS, Task, classification_loss
from .cache import cached_model

VERSION = 2  # 2: pre-trained on one thread, whatever the caller's thread count
SYMBOLS = 16
SEPARATOR = SYMBOLS
LENGTH = 8
SPLIT_SIZES = (2400, 800, 800)
PRETRAIN_STEPS = 400
PRETRAIN_SEED = 1234
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TransformerConfig:
    """The transformer's sizes; the defaults are the task's model (about 0.1 M parameters)."""

    vocab_size: int = SYMBOLS + 1  # the symbols and the separator
    block_size: int = 2 * LENGTH  # the longest input
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_hidden: int = 128


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: softmax(Q K^T / sqrt(d_head) + mask) V, then ``o_proj``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); position t attends to positions <= t only."""
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, heads, T, d_head)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU, as in Llama: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_hidden, bias=False)
        self.down_proj = nn.Linear(config.d_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """A pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.d_model)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A decoder-only transformer: token and position embeddings, ``n_layer`` blocks, RMSNorm, ``lm_head``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.block_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T) int64 -> next-token logits (B, T, vocab_size).

        Raises:
            ValueError: T is longer than ``config.block_size``.
        """
        T = tokens.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"the input has {T} tokens; the model reads at most block_size = {self.config.block_size}")
        x = self.embed_tokens(tokens) + self.embed_positions(torch.arange(T, device=tokens.device))  # (B, T, C)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def distinct_sources(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, LENGTH) int64: distinct random symbol sequences, in random order.

    Each sequence is drawn as its base-16 code c in [0, 16^n); keeping only each code's first
    draw makes the rows distinct, so no sequence is in two splits.
    """
    codes = torch.randint(SYMBOLS**LENGTH, (2 * count,), generator=generator)
    unique, inverse = torch.unique(codes, return_inverse=True)
    first = torch.full_like(unique, len(codes)).scatter_reduce(0, inverse, torch.arange(len(codes)), "amin")
    codes = codes[first.sort().values[:count]]
    return codes[:, None] // SYMBOLS ** torch.arange(LENGTH) % SYMBOLS  # digit k of c: c // 16^k mod 16


def examples(sources: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources (N, n) -> inputs (N, 2n) and targets (N, 2n), the next tokens with all but the answer ignored.

    The full sequence is s = x1 .. xn SEP answer; inputs = s[:-1], targets = s[1:] with the first
    n targets (x2 .. xn, random, and SEP, always in the same place) set to ``IGNORE_INDEX``.
    """
    answer = sources.flip(-1) if reverse else sources
    sequences = torch.cat([sources, torch.full_like(sources[:, :1], SEPARATOR), answer], dim=1)  # (N, 2n + 1)
    targets = sequences[:, 1:].clone()
    targets[:, : sources.shape[1]] = IGNORE_INDEX
    return sequences[:, :-1], targets


def build_transformer() -> Transformer:
    """The task's transformer, untrained."""
    return Transformer(TransformerConfig())


def pretrain_copying(model: nn.Module) -> None:
    """400 AdamW steps (lr 3e-3) of next-token cross-entropy on fresh batches of 64 copy examples."""
    generator = torch.Generator().manual_seed(PRETRAIN_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(PRETRAIN_STEPS):
        inputs, targets = examples(torch.randint(SYMBOLS, (64, LENGTH), generator=generator), reverse=False)
        loss = classification_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def base_model() -> nn.Module:
    """The transformer pre-trained on copying, from the cache (pre-trained there on first use, in a few seconds)."""
    return cached_model("sequence-copy", VERSION, build_transformer, pretrain_copying)


def datasets(seed: int) -> dict[str, TensorDataset]:
    """Reversal examples from ``seed``: 2,400 / 800 / 800 distinct sources; items (inputs (16,), targets (16,))."""
    sources = distinct_sources(sum(SPLIT_SIZES), torch.Generator().manual_seed(seed))
    return {split: TensorDataset(*examples(part, reverse=True))
            for split, part in zip(SPLITS, sources.split(SPLIT_SIZES), strict=True)}


def sequence() -> Task:
    """Adapt the transformer pre-trained on copying to reversing; every projection in the blocks is a default target.

    Accuracy is per answer token; the frozen base gets about 1/16 of them right.
    """
    return Task(name="sequence", base_model=base_model, datasets=datasets, default_targets=LINEAR_NAMES,
                batch_size=64)
