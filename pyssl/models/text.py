"""The text tower of CLIP: a small causal transformer over token rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextTransformer(nn.Module):
    """Token and position embeddings, a pre-LayerNorm transformer with a causal mask, a final
    LayerNorm; the text's feature is the output at its end-of-text token (Radford et al., 2021).

    The mask is causal so that the feature at ``<eot>`` depends on the text alone, never on
    the padding after it: the same caption padded to any length gets the same feature.

    Args:
        vocab_size: number of token ids.
        eot_token: the id marking the end of each text (every row must contain it).
        context_length: the longest token row accepted.
        width, layers, heads: transformer size (``width`` divisible by ``heads``).

    Shape: tokens int64 ``(B, L)`` with ``L <= context_length`` -> features ``(B, width)``.
    """

    def __init__(
        self,
        vocab_size: int,
        eot_token: int,
        context_length: int = 16,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"TextTransformer: width {width} is not divisible by heads {heads}")
        self.vocab_size, self.eot_token, self.context_length = vocab_size, eot_token, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.out_dim = width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(
                f"texts must be int64 token rows (B, L), got "
                f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
            )
        if not 0 < tokens.shape[1] <= self.context_length:
            raise ValueError(f"texts: rows of {tokens.shape[1]} tokens, expected 1..{self.context_length}")
        # One device synchronisation: an out-of-range id would otherwise be a device-side assert on CUDA.
        bad_id = ((tokens < 0) | (tokens >= self.vocab_size)).any()
        no_eot = ~(tokens == self.eot_token).any(1).all()
        if bool(bad_id | no_eot):
            if bool(bad_id):
                raise ValueError(
                    f"texts: token ids must be in [0, {self.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}"
                )
            raise ValueError(f"texts: every row must contain the end-of-text token {self.eot_token}")

    def forward(self, tokens: Tensor, *, check: bool = True) -> Tensor:
        """``check=False`` skips :meth:`check_tokens` (and its device synchronisation) for tokens
        the caller has already checked."""
        if check:
            self.check_tokens(tokens)
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        x = self.ln_final(self.transformer(x, mask=mask, is_causal=True))
        eot = (tokens == self.eot_token).int().argmax(dim=1)  # the first <eot> of each row
        return x[torch.arange(x.shape[0], device=x.device), eot]
