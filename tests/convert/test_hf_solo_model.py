"""SoloForCausalLM: exactly Mistral without images, the reference's merge with images, generate with a KV cache."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY, random_mistral

from megatron.solo.convert.hf_solo import SoloConfig, SoloForCausalLM
from megatron.solo.convert.name_table import HF_PATCH

PATCH_DIM = 48  # vision_patch_size 4 keeps the tiny model tiny


@pytest.fixture(scope="module")
def models():
    """(Mistral, SOLO) with the same decoder weights; SOLO adds a random patch projection."""
    mistral = random_mistral()
    solo = SoloForCausalLM(SoloConfig(**TINY, vision_patch_size=4, attn_implementation="eager")).eval()
    sd = dict(mistral.state_dict())
    sd[HF_PATCH] = 0.05 * torch.randn(TINY["hidden_size"], PATCH_DIM, generator=torch.Generator().manual_seed(2))
    solo.load_state_dict(sd)
    for model in (mistral, solo):  # no early stop at a random </s>: every run makes all its tokens
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return mistral, solo


def image_prompt(batch=1, seq=10, generator_seed=0):
    """Token ids with a 2x2 'image' per sample: (ids [b,s], indices [b,s], patches [4b, PATCH_DIM]).

    Sample b shows its 4 patches at positions 2b…2b+3 (sample 0 from position 0, as in SOLO's layout where
    the image block opens the prompt); indices are global over the batch."""
    gen = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(3, TINY["vocab_size"], (batch, seq), generator=gen)
    indices = torch.full((batch, seq), -1)
    for b in range(batch):
        indices[b, 2 * b : 2 * b + 4] = torch.arange(4 * b, 4 * b + 4)
    return ids, indices, torch.randn(4 * batch, PATCH_DIM, generator=gen)


def hand_embeds(solo, ids, indices, patches):
    """The reference's merge, written independently: embed_tokens[id] + W·patch at each patch position."""
    emb = solo.model.embed_tokens(ids).clone()
    w = solo.model.embed_vision_patch.weight
    for b, s in (indices >= 0).nonzero().tolist():
        emb[b, s] += w @ patches[indices[b, s]]
    return emb


def test_solo_config_has_its_own_model_type():
    cfg = SoloConfig()
    assert cfg.model_type == "solo" and cfg.vocab_size == 33029 and cfg.patch_dim == 3072


def test_without_images_it_is_exactly_mistral(models):
    mistral, solo = models
    ids, indices, patches = image_prompt(batch=2)
    no_image = torch.full_like(indices, -1)
    with torch.no_grad():
        want = mistral(ids).logits
        assert torch.equal(solo(ids).logits, want)
        assert torch.equal(solo(ids, vision_patch_indices=no_image).logits, want)
        assert torch.equal(solo(ids, vision_patch_indices=no_image, vision_patches=patches).logits, want)
        assert torch.equal(solo(ids, vision_patch_indices=no_image, vision_patches=patches[:0]).logits, want)


def test_with_images_it_adds_the_projected_patch_to_the_token_embedding(models):
    mistral, solo = models
    ids, indices, patches = image_prompt(batch=2)
    labels = ids.clone()
    labels[indices >= 0] = -100
    with torch.no_grad():
        got = solo(ids, vision_patch_indices=indices, vision_patches=patches, labels=labels)
        want = mistral(inputs_embeds=hand_embeds(solo, ids, indices, patches), labels=labels)
        no_image = mistral(ids).logits
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    assert (got.logits - no_image).abs().max() > 1e-3  # the image matters


def test_the_base_model_takes_the_vision_inputs_too(models):
    _, solo = models
    ids, indices, patches = image_prompt(batch=2)
    with torch.no_grad():
        got = solo.model(ids, vision_patch_indices=indices, vision_patches=patches).last_hidden_state
        want = solo.model(inputs_embeds=hand_embeds(solo, ids, indices, patches)).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_images_take_any_float_dtype(models):
    _, solo = models
    ids, indices, patches = image_prompt()
    with torch.no_grad():
        a = solo(ids, vision_patch_indices=indices, vision_patches=patches.double()).logits
        b = solo(ids, vision_patch_indices=indices, vision_patches=patches).logits
    assert torch.equal(a, b)


def greedy_by_full_forwards(solo, ids, indices, patches, new_tokens):
    """Reference decoding: a full forward over the whole sequence for every token, no cache."""
    for _ in range(new_tokens):
        padded = F.pad(indices, (0, ids.shape[1] - indices.shape[1]), value=-1)
        with torch.no_grad():
            logits = solo(ids, vision_patch_indices=padded, vision_patches=patches, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize(
    "batch,extra,patches_passed",
    [
        (1, {}, [True] + [False] * 5),  # prefill, then 5 cached steps
        (2, {}, [True] + [False] * 5),
        (1, {"prefill_chunk_size": 4}, [True, False, False] + [False] * 5),  # only chunk [0,4) shows patches
        (1, {"use_cache": False}, [True] * 6),  # every step re-reads the whole prompt
    ],
)
def test_generate_with_an_image_equals_greedy_full_forwards(models, monkeypatch, batch, extra, patches_passed):
    _, solo = models
    ids, indices, patches = image_prompt(batch=batch, generator_seed=batch)
    passed = []
    prepare = solo.prepare_inputs_for_generation

    def spy(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        passed.append("vision_patches" in inputs)
        return inputs

    monkeypatch.setattr(solo, "prepare_inputs_for_generation", spy)
    got = solo.generate(
        ids, vision_patch_indices=indices, vision_patches=patches, max_new_tokens=6, do_sample=False, **extra
    )
    assert torch.equal(got, greedy_by_full_forwards(solo, ids, indices, patches, 6))
    assert passed == patches_passed


def test_text_only_generate_is_mistral_generate(models):
    mistral, solo = models
    ids, _, _ = image_prompt()
    got = solo.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, mistral.generate(ids, max_new_tokens=5, do_sample=False))
    assert got.shape == (1, ids.shape[1] + 5)


def test_text_only_generate_from_inputs_embeds_still_works(models):
    mistral, solo = models
    ids, _, _ = image_prompt()
    embeds = solo.model.embed_tokens(ids).detach()
    got = solo.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, mistral.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False))


def test_bad_vision_inputs_are_explained(models):
    _, solo = models
    ids, indices, patches = image_prompt()
    with pytest.raises(ValueError, match="must be -1 \\(text\\) or in 0..3"):
        solo(ids, vision_patch_indices=indices + 1, vision_patches=patches)
    with pytest.raises(ValueError, match="expected \\[batch, seq\\]"):
        solo(ids, vision_patch_indices=indices[:, :5], vision_patches=patches)
    with pytest.raises(ValueError, match="expected \\[N, 48\\]"):
        solo(ids, vision_patch_indices=indices, vision_patches=patches.reshape(4, 3, 16))
    with pytest.raises(ValueError, match="without vision_patch_indices"):
        solo(ids, vision_patches=patches)
    with pytest.raises(ValueError, match="0..-1"):
        solo(ids, vision_patch_indices=indices)  # patch positions but no patches


def test_beam_search_keeps_the_batch_wide_patch_tensor(models, monkeypatch):
    """generate() repeats per-sample inputs per beam; vision_patches is batch-wide and must stay as given."""
    _, solo = models
    ids, indices, patches = image_prompt(batch=2)
    seen = []
    original = type(solo.model).embed_inputs

    def spy(self, input_ids=None, inputs_embeds=None, vision_patch_indices=None, vision_patches=None):
        if vision_patches is not None:
            seen.append((vision_patch_indices.clone(), vision_patches.clone()))
        return original(self, input_ids, inputs_embeds, vision_patch_indices, vision_patches)

    monkeypatch.setattr(type(solo.model), "embed_inputs", spy)
    with torch.no_grad():
        solo.generate(
            ids, vision_patch_indices=indices, vision_patches=patches, max_new_tokens=2, num_beams=2, do_sample=False
        )
    step_indices, step_patches = seen[0]
    assert torch.equal(step_patches, patches)
    assert torch.equal(step_indices, indices.repeat_interleave(2, dim=0))  # each beam points at its sample's


def test_generate_hands_the_kv_cache_on_under_the_installed_name(models, recwarn):
    """transformers 5.24 renamed past_key_values → cache; generate must not trip the deprecation shim."""
    _, solo = models
    ids, indices, patches = image_prompt()
    solo.generate(ids, vision_patch_indices=indices, vision_patches=patches, max_new_tokens=3, do_sample=False)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
