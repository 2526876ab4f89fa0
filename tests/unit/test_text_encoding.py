"""kohya's clip_skip and long prompts (max_token_length), against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_lora.models.text import TextEncoding, encode_prompts, tokenize
from dist_lora.models.tiny import build_sd15, build_sdxl

# About 200 tokens with the tiny tokenizer (mostly one token per letter).
LONG = ", ".join(f"tag{i} red square" for i in range(15))


@pytest.fixture(scope="module")
def sd15():  # type: ignore[no-untyped-def]
    return build_sd15()


@pytest.fixture(scope="module")
def sdxl():  # type: ignore[no-untyped-def]
    return build_sdxl()


def _truncated(encoder: torch.nn.Module, skip: int) -> torch.nn.Module:
    """The same encoder with its last ``skip - 1`` layers removed: its last_hidden_state (through the final
    layer norm) is what clip_skip = skip means."""
    short = copy.deepcopy(encoder)
    model = getattr(short, "text_model", short)
    model.encoder.layers = model.encoder.layers[:len(model.encoder.layers) - (skip - 1)]
    return short


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_clip_skip_is_the_nth_last_layer_through_the_final_norm(sd15, skip: int) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize([sd15.tokenizer], ["dlsks, red circle", "a blue square"])
    with torch.no_grad():
        ours, _ = encode_prompts([sd15.text_encoder], ids, "sd1", TextEncoding(clip_skip=skip))
        expected = _truncated(sd15.text_encoder, skip)(ids[0]).last_hidden_state
        last = sd15.text_encoder(ids[0]).last_hidden_state
    torch.testing.assert_close(ours, expected)
    assert (skip == 1) == torch.equal(ours, last)


def _by_hand(tokenizer, encoder, prompt: str, windows: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A1111's long prompt: the prompt's tokens in pieces of 75, each encoded as BOS + piece + padding (pad
    token, here EOS) to 77; the hidden states joined as the first BOS, each window's 75, the last token."""
    tokens = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids[:75 * windows]
    states = []
    for w in range(windows):
        piece = tokens[75 * w:75 * (w + 1)]
        ids = [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id]
        ids += [tokenizer.pad_token_id] * (77 - len(ids))
        states.append(encoder(torch.tensor([ids])).last_hidden_state[0])
    return torch.cat([states[0][:1], *[s[1:76] for s in states], states[-1][76:]])


def test_a_200_token_prompt_in_three_windows(sd15) -> None:  # type: ignore[no-untyped-def]
    tokenizer = sd15.tokenizer
    assert 180 < len(tokenizer(LONG, add_special_tokens=False).input_ids) < 225
    encoding = TextEncoding(max_token_length=225)
    ids = tokenize([tokenizer], [LONG, "short"], encoding)
    assert ids[0].shape == (2, 3, 77)
    with torch.no_grad():
        hidden, _ = encode_prompts([sd15.text_encoder], ids, "sd1", encoding)
        assert hidden.shape[:2] == (2, 227)
        torch.testing.assert_close(hidden[0], _by_hand(tokenizer, sd15.text_encoder, LONG, 3))
        torch.testing.assert_close(hidden[1], _by_hand(tokenizer, sd15.text_encoder, "short", 3))
        # 75 tokens is the pipelines' encoding.
        plain, _ = encode_prompts([sd15.text_encoder], tokenize([tokenizer], [LONG]), "sd1")
        torch.testing.assert_close(plain[0], _by_hand(tokenizer, sd15.text_encoder, LONG, 1))


def test_windows_of_a_tokenizer_that_pads_with_another_token(sdxl) -> None:  # type: ignore[no-untyped-def]
    """SD 2.x / SDXL's second tokenizer pads with "!": a window cut inside the text ends in EOS, one that
    starts on padding starts BOS EOS (kohya's get_input_ids)."""
    tok = sdxl.tokenizer_2
    assert tok.pad_token_id != tok.eos_token_id
    text = ", ".join(f"tag{i}" for i in range(20))  # between 75 and 150 tokens
    count = len(tok(text, add_special_tokens=False).input_ids)
    assert 75 < count < 150
    ids = tokenize([tok], [text], TextEncoding(max_token_length=225))[0][0]
    tokens = tok(text, add_special_tokens=False).input_ids
    first, second, third = ids.tolist()
    assert first == [tok.bos_token_id, *tokens[:75], tok.eos_token_id]
    rest = tokens[75:]
    assert second[:len(rest) + 2] == [tok.bos_token_id, *rest, tok.eos_token_id]
    assert third[:2] == [tok.bos_token_id, tok.eos_token_id] and set(third[2:]) == {tok.pad_token_id}


def test_sdxl_joins_both_encoders_and_pools_the_first_window(sdxl) -> None:  # type: ignore[no-untyped-def]
    encoding = TextEncoding(max_token_length=150)
    encoders = [sdxl.text_encoder, sdxl.text_encoder_2]
    ids = tokenize([sdxl.tokenizer, sdxl.tokenizer_2], [LONG, "short"], encoding)
    with torch.no_grad():
        hidden, pooled = encode_prompts(encoders, ids, "sdxl", encoding)
        assert hidden.shape[:2] == (2, 152) and pooled is not None and pooled.shape[0] == 2
        first_window = [i[:, 0] for i in ids]
        _, first_pooled = encode_prompts(encoders, first_window, "sdxl")
        torch.testing.assert_close(pooled, first_pooled)
        # Each encoder's part: its penultimate layer, window by window, joined.
        for index, (encoder, part) in enumerate(zip(encoders, (hidden[..., :32], hidden[..., 32:]), strict=True)):
            windows = [encoder(ids[index][:, w], output_hidden_states=True).hidden_states[-2] for w in range(2)]
            expected = torch.cat([windows[0][:, :1], windows[0][:, 1:76], windows[1][:, 1:76], windows[1][:, 76:]], 1)
            torch.testing.assert_close(part, expected)


def test_sample_grids_encode_prompts_as_the_adapter_was_trained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from dist_lora.sampling.grid_cli import trained_text_encoding

    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_clip_skip": "2", "ss_max_token_length": "225"})
    assert trained_text_encoding(path, "sd1") == TextEncoding(2, 225)
    assert trained_text_encoding(path, "sdxl") == TextEncoding(1, 225)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_clip_skip": "None"})  # kohya without clip_skip
    assert trained_text_encoding(path, "sd1") == TextEncoding()
