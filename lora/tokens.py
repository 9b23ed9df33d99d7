"""Concept tokens ([v], [u], [v2], ...): their ids in the tokenizer, their rows in the T5 input table.

Training and sampling share these rules:
    tokenizer  tokens the base already knows keep their ids; new ones follow them, or, when the base
               knows none, take fresh rows after the T5 table (model.tokenizer.base_tokenizer)
    T5 table   grown to cover every added id (`add_token_rows`); a trained token's embedding is
               written into its row (`write_token_rows`)
While training, the embeddings live apart from the table (`AddedTokens`), so only they train.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from model.tokenizer import Tokenizer

# A word in square brackets, the shape of a concept token ([v], [u], [v2], ...).
TOKEN_LIKE = re.compile(r"\[[^\[\]\s]+\]")


def add_token_rows(t5: nn.Module, tokenizer: Tokenizer, tokens: list[str]) -> list[int]:
    """Add the tokens to the tokenizer and grow the T5 input table to cover their ids; returns the ids."""
    ids = tokenizer.add_tokens(tokens)
    if tokenizer.vocab_size > t5.token_embedding.weight.shape[0]:
        t5.resize_token_embeddings(tokenizer.vocab_size)
    return ids


@torch.no_grad()
def write_token_rows(t5: nn.Module, rows: dict[int, Tensor]) -> None:
    """Write each embedding into the T5 input table at its id."""
    table = t5.token_embedding.weight
    for i, emb in rows.items():
        if emb.shape != table.shape[1:]:
            raise ValueError(f"token embedding of width {emb.shape[-1]} does not fit the T5 table of width "
                             f"{table.shape[1]}: the concept belongs to another text encoder")
        table[i] = emb.to(table.dtype)


class AddedTokens(nn.Module):
    """Input embeddings of the concept tokens, kept apart from the T5 table so that only they train
    (AdamW state for a 256k-row table would not fit, and weight decay would touch every row).

    A forward hook on `t5.token_embedding` writes them over the table's output wherever an added
    id occurs; they start at zero (paper §3.2).
    """

    def __init__(self, ids: dict[str, int], dim: int, device: torch.device | str):
        super().__init__()
        self.ids = dict(ids)
        self.embeds = nn.ParameterList([nn.Parameter(torch.zeros(dim, device=device)) for _ in ids])

    def embedding(self, token: str) -> nn.Parameter:
        return self.embeds[list(self.ids).index(token)]

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        ids = inputs[0]  # (B, L)
        for (_, i), emb in zip(self.ids.items(), self.embeds, strict=True):
            output = torch.where((ids == i)[..., None], emb.to(output.dtype), output)
        return output

    def state(self) -> dict[str, Tensor]:
        return {tok: emb.detach() for tok, emb in zip(self.ids, self.embeds, strict=True)}

    def rows(self) -> dict[int, Tensor]:
        """id -> embedding, for `write_token_rows`."""
        return {self.ids[tok]: emb for tok, emb in self.state().items()}

    @torch.no_grad()
    def load(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.ids):
            raise ValueError(f"token embeddings {sorted(state)} != tokens {sorted(self.ids)}")
        for tok, emb in zip(self.ids, self.embeds, strict=True):
            emb.copy_(state[tok])


def add_tokens(t5: nn.Module, tokenizer: Tokenizer, tokens: list[str]) -> AddedTokens:
    """Concept tokens added to the tokenizer and the T5 table, with zero embeddings to train."""
    ids = add_token_rows(t5, tokenizer, tokens)
    weight = t5.token_embedding.weight
    return AddedTokens(dict(zip(tokens, ids, strict=True)), weight.shape[1], weight.device)


__all__ = ["TOKEN_LIKE", "add_token_rows", "write_token_rows", "AddedTokens", "add_tokens"]
