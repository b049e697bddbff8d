"""Generation: deterministic greedy and beam decoding, batched with left padding, settings checked."""

from __future__ import annotations

import pytest

from flatlora.errors import FlatLoraError
from flatlora.generation import DECODING_PRESETS, GenerationSettings, generate_texts

pytest.importorskip("gguf", reason="generation tests use the default LLM's tokenizer (pip install gguf)")

PROMPTS = ["name[Aromi], eatType[pub]", "name[The Eagle]", "name[Zizzi], area[riverside], priceRange[high]"]


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from flatlora.causal_lm import load_causal_lm
    from flatlora.models import LoraOptions

    model, tokenizer = load_causal_lm(tiny_llama_dir, lora=LoraOptions(lora_dropout=0.0))
    return model, tokenizer


def greedy_one_by_one(model, tok, prompt: str, n: int) -> str:
    """Greedy decoding of one prompt without padding or cache: the reference for batched generation."""
    import torch

    from flatlora.data.lm_encode import encode_prompt

    ids = torch.tensor([encode_prompt(tok, prompt)])
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_greedy_is_deterministic_and_independent_of_the_batching(tiny_lm):
    model, tok = tiny_lm
    one = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=1), progress=False)
    three = generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=3), progress=False)
    assert one == three and len(set(one)) >= 2 and all(one)
    assert one == [greedy_one_by_one(model, tok, p, 8) for p in PROMPTS]  # left padding changes nothing
    assert generate_texts(model, tok, PROMPTS, GenerationSettings(max_new_tokens=8), progress=False) == one
    model.train()
    generate_texts(model, tok, PROMPTS[:1], GenerationSettings(max_new_tokens=2), progress=False)
    assert model.training  # the mode is restored


def test_beam_search_and_the_e2e_preset(tiny_lm):
    model, tok = tiny_lm
    e2e = GenerationSettings.preset("e2e", max_new_tokens=6)
    assert (e2e.num_beams, e2e.length_penalty, e2e.no_repeat_ngram_size) == (10, 0.9, 4)
    assert DECODING_PRESETS["e2e"]["max_new_tokens"] == 64
    beams = generate_texts(model, tok, PROMPTS[:2], GenerationSettings.preset("e2e", max_new_tokens=6, num_beams=3))
    assert beams == generate_texts(
        model, tok, PROMPTS[:2], GenerationSettings.preset("e2e", max_new_tokens=6, num_beams=3)
    )
    assert len(beams) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_beams": 0}, "--num-beams must be a whole number >= 1"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"no_repeat_ngram_size": -1}, "--no-repeat-ngram-size"),
        ({"length_penalty": 0.9}, "beam search only"),
        ({"length_penalty": float("nan"), "num_beams": 2}, "finite"),
    ],
)
def test_settings_out_of_range_are_refused(kwargs, match):
    with pytest.raises(FlatLoraError, match=match):
        GenerationSettings(**kwargs)
    with pytest.raises(FlatLoraError, match="unknown --decoding"):
        GenerationSettings.preset("sampling")
