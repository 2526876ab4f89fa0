"""Prompt conditioning: tokenise captions and turn them into the UNet's cross-attention inputs.

Two kohya options change it (``TextEncoding``):
- ``clip_skip`` N (SD 1.x/2.x): the hidden states of the N-th last layer, passed through the encoder's
  final layer norm (1: the last layer, what diffusers' pipelines use). SDXL always conditions on the
  penultimate layer of both encoders (kohya ignores clip_skip there; it is refused here).
- ``max_token_length`` 75/150/225: a caption is tokenised to that many tokens and encoded as 1/2/3
  chunks of 77 (BOS + 75 tokens + EOS/padding); the chunks' hidden states are joined as kohya and
  AUTOMATIC1111 do: the first chunk's BOS, every chunk's 75 inner tokens, the last chunk's final token
  (2 + 75 x chunks tokens in all). SDXL's pooled embedding is the first chunk's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CHUNK_TOKENS = 75  # a CLIP window of 77 less BOS and EOS
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextEncoding:
    clip_skip: int = 1
    max_token_length: int = 75

    @property
    def chunks(self) -> int:
        return self.max_token_length // CHUNK_TOKENS


DEFAULT_TEXT_ENCODING = TextEncoding()  # the pipelines' own: last layer (SDXL: penultimate), 77 tokens


def _chunked_ids(tok: Any, captions: Sequence[str], length: int) -> torch.Tensor:
    """kohya's get_input_ids: ``length`` tokens (+ BOS/EOS) cut into windows of 77, each BOS + 75 tokens +
    the sequence's last token; with a pad token other than EOS (SD 2.x, SDXL's second tokenizer) a window
    ending inside the text ends in EOS, and one starting on padding starts BOS EOS."""
    window = tok.model_max_length
    ids = tok(list(captions), padding="max_length", max_length=length + 2, truncation=True,
              return_tensors="pt").input_ids
    rows = []
    for row in ids:
        chunks = []
        for start in range(1, length - window + 4, window - 2):
            chunk = torch.cat([row[:1], row[start:start + window - 2], row[-1:]])
            if tok.pad_token_id != tok.eos_token_id:
                if int(chunk[-2]) not in (tok.eos_token_id, tok.pad_token_id):
                    chunk[-1] = tok.eos_token_id
                if int(chunk[1]) == tok.pad_token_id:
                    chunk[1] = tok.eos_token_id
            chunks.append(chunk)
        rows.append(torch.stack(chunks))
    return torch.stack(rows)


def tokenize(tokenizers: Sequence[Any], captions: Sequence[str],
             encoding: TextEncoding = DEFAULT_TEXT_ENCODING) -> list[torch.Tensor]:
    """One id tensor per tokenizer: ``[batch, 77]``, padded and truncated like the pipelines, or with
    ``max_token_length`` above 75 ``[batch, chunks, 77]``."""
    if encoding.chunks == 1:
        return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]
    return [_chunked_ids(tok, captions, encoding.max_token_length) for tok in tokenizers]


def _join_chunks(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch x chunks, 77, D] -> [batch, 2 + 75 x chunks, D]: BOS, each chunk's inner 75, the last token."""
    per_sample = hidden.reshape(batch, -1, hidden.shape[-1])
    window = hidden.shape[1]
    if per_sample.shape[1] == window:
        return per_sample
    parts = [per_sample[:, :1]]
    parts += [per_sample[:, start:start + window - 2] for start in range(1, per_sample.shape[1], window)]
    parts.append(per_sample[:, -1:])
    return torch.cat(parts, dim=1)


def _flat(ids: torch.Tensor) -> torch.Tensor:
    return ids.reshape(-1, ids.shape[-1])


def encode_prompts(text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor], family: str,
                   encoding: TextEncoding = DEFAULT_TEXT_ENCODING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states for cross-attention, and for SDXL the pooled projection of the second encoder.

    SD 1.x/2.x: the last hidden state (as diffusers' pipelines), or with clip_skip N the N-th last
    layer's through the final layer norm. SDXL: the penultimate hidden states of both encoders
    concatenated on the feature axis, as the SDXL pipeline builds them.
    """
    batch = input_ids[0].shape[0]
    if family != "sdxl":
        encoder = text_encoders[0]
        ids = _flat(input_ids[0]).to(next(encoder.parameters()).device)
        if encoding.clip_skip == 1:
            hidden = encoder(ids)[0]
        else:
            states = encoder(ids, output_hidden_states=True).hidden_states[-encoding.clip_skip]
            model = getattr(encoder, "text_model", encoder)  # transformers >= 5.6 dropped the text_model level
            hidden = model.final_layer_norm(states)
        return _join_chunks(hidden, batch), None
    hidden_states: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        # Token ids come from the host: copied without making the host wait for the device.
        out = encoder(_flat(ids).to(next(encoder.parameters()).device, non_blocking=True), output_hidden_states=True)
        hidden_states.append(_join_chunks(out.hidden_states[-2], batch))
        pooled = out[0]  # after the loop: the second encoder's projected pooled output
    assert pooled is not None
    return torch.cat(hidden_states, dim=-1), pooled[::encoding.chunks]
