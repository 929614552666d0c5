"""Text encoders vs the official `text_encoding` fixtures (tokens, embeddings, mask, pooled), CFG batch, cache."""
from __future__ import annotations

import warnings

import pytest
import torch

from pyramid_core.text import (
    DEFAULT_NEGATIVE_PROMPT,
    PROMPT_SUFFIX,
    PyramidTextEncoder,
    TextEmbeddingCache,
    TextEmbeddings,
    guidance_prompts,
    text_encoder_identity,
)
from tests.reference import assert_matches, case, case_ids, model_dir, tensors

CASES = case_ids("text_encoding")
FAMILY = {"miniflux_tiny": "flux", "sd3_tiny": "mmdit"}
# fixture sub-model name -> key of PyramidTextEncoder.tokenize(), per family
TOKEN_KEYS = {
    "flux": {"text_encoder": "clip_0", "text_encoder_2": "t5"},
    "mmdit": {"text_encoder": "clip_0", "text_encoder_2": "clip_1", "text_encoder_3": "t5"},
}
OUTPUTS = (("prompt_embeds", "prompt_embeds"), ("attention_mask", "prompt_attention_mask"), ("pooled", "pooled_prompt_embeds"))
_ENCODERS: dict[str, PyramidTextEncoder] = {}


def encoder_for(case_id: str) -> PyramidTextEncoder:
    """fp32 encoder of the case's model folder, loaded once per session (loading is the slow part)."""
    model = case(case_id)["model"]
    if model not in _ENCODERS:
        _ENCODERS[model] = PyramidTextEncoder.from_folder(model_dir(model), FAMILY[model], dtype=torch.float32)
    return _ENCODERS[model]


def expected(case_id: str, which: str) -> TextEmbeddings:
    t = tensors(case_id)
    return TextEmbeddings(*(t[f"{which}.{name}"] for _, name in OUTPUTS))


def assert_embeddings_match(actual: TextEmbeddings, want: TextEmbeddings, tolerance: dict, label: str) -> dict:
    assert actual.attention_mask.dtype == torch.int64
    errors = {}
    for attr, _ in OUTPUTS:
        errors[attr] = assert_matches(getattr(actual, attr), getattr(want, attr), tolerance, f"{label}.{attr}")
    return errors


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("which", ["prompt", "negative"])
def test_token_ids_match_official(case_id, which):
    c = case(case_id)
    enc = encoder_for(case_id)
    stored = tensors(case_id)
    text = c["inputs"][f"{which}_string_seen_by_text_encoder"]
    tokens = enc.tokenize([text])
    checked = 0
    for entry in c["intermediate_token_ids"]:
        if entry["for"] != which:
            continue
        key = TOKEN_KEYS[enc.family][entry["model"]]
        assert torch.equal(tokens[key], stored[entry["input_ids"]]), f"{case_id} {which} {entry['model']} ids differ"
        if "attention_mask" in entry:
            assert torch.equal(tokens["t5_mask"], stored[entry["attention_mask"]]), f"{case_id} {which} T5 mask differs"
        checked += 1
    assert checked == len(TOKEN_KEYS[enc.family])


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("which", ["prompt", "negative"])
def test_encode_matches_official(case_id, which):
    c = case(case_id)
    text = c["inputs"][f"{which}_string_seen_by_text_encoder"]
    out = encoder_for(case_id).encode([text])
    errors = assert_embeddings_match(out, expected(case_id, which), c["tolerance"], f"{case_id}:{which}")
    print(f"{case_id} {which} max rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))


@pytest.mark.parametrize("case_id", CASES)
def test_guidance_batch_is_negative_then_suffixed_positive(case_id):
    c = case(case_id)
    enc = encoder_for(case_id)
    assert c["inputs"]["negative_prompt_given_to_generate"] is None  # generate() then used its default negative
    batch = enc.encode_for_guidance(c["inputs"]["prompt_given_to_generate"])
    assert batch.batch_size == 2
    negative, positive = batch.chunk_cfg()
    assert_embeddings_match(negative, expected(case_id, "negative"), c["tolerance"], f"{case_id}:cfg[0]")
    assert_embeddings_match(positive, expected(case_id, "prompt"), c["tolerance"], f"{case_id}:cfg[1]")

    no_cfg = enc.encode_for_guidance(c["inputs"]["prompt_given_to_generate"], do_cfg=False)
    assert no_cfg.batch_size == 1
    assert torch.equal(no_cfg.prompt_embeds, positive.prompt_embeds)
    assert torch.equal(no_cfg.pooled, positive.pooled)


def test_suffix_goes_to_positive_prompts_only():
    c = case(CASES[0])["inputs"]
    pos, neg = guidance_prompts(c["prompt_given_to_generate"])
    assert pos == [c["prompt_string_seen_by_text_encoder"]]
    assert neg == [c["negative_string_seen_by_text_encoder"]] == [DEFAULT_NEGATIVE_PROMPT]
    pos, neg = guidance_prompts(["a", "b"], "bad", add_suffix=True)
    assert pos == ["a" + PROMPT_SUFFIX, "b" + PROMPT_SUFFIX] and neg == ["bad", "bad"]
    assert guidance_prompts("a", None, add_suffix=False) == (["a"], [""])
    with pytest.raises(ValueError, match="negative"):
        guidance_prompts(["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="at least one prompt"):
        guidance_prompts([])


def test_none_negative_encodes_empty_string():
    enc = encoder_for(CASES[0])
    batch = enc.encode_for_guidance("a cat", None, add_suffix=False)
    empty = enc.encode([""])
    cat = enc.encode(["a cat"])
    assert torch.equal(batch.prompt_embeds, torch.cat([empty.prompt_embeds, cat.prompt_embeds]))
    assert torch.equal(batch.pooled, torch.cat([empty.pooled, cat.pooled]))
    assert batch.attention_mask[0].sum().item() == 1  # "" is just the T5 EOS token
    assert not torch.equal(batch.prompt_embeds[0], batch.prompt_embeds[1])


def test_cache_reuses_embeddings_without_encoder(monkeypatch):
    case_id = CASES[0]
    enc = encoder_for(case_id)
    calls = []
    real_encode = enc.encode
    monkeypatch.setattr(
        enc, "encode", lambda prompts, **kwargs: calls.append(list(prompts)) or real_encode(prompts, **kwargs)
    )
    prompt = case(case_id)["inputs"]["prompt_given_to_generate"]

    cache = TextEmbeddingCache(max_entries=2)
    first = cache.encode_for_guidance(enc, prompt)
    assert len(calls) == 2 and len(cache) == 1  # positive and negative encoded once each
    second = cache.encode_for_guidance(enc, prompt)
    assert len(calls) == 2, "cache hit must not call the text encoder"
    assert (cache.hits, cache.misses) == (1, 1)
    for attr, _ in OUTPUTS:
        assert torch.equal(getattr(first, attr), getattr(second, attr))
        assert getattr(second, attr).device.type == "cpu"
    assert_embeddings_match(second[0], expected(case_id, "negative"), case(case_id)["tolerance"], "cached[0]")

    # the caller can look up without an encoder, using the identity from_folder would give
    key = TextEmbeddingCache.key(text_encoder_identity(model_dir("miniflux_tiny"), "flux", "fp32"), prompt)
    assert enc.identity == key[0] and cache.lookup(key) is not None

    cache.encode_for_guidance(enc, prompt, add_suffix=False)  # different key: encodes again
    cache.lookup(key)  # now the most recently used
    cache.encode_for_guidance(enc, prompt, "other negative")  # full: evicts the add_suffix=False entry
    assert len(calls) == 6 and len(cache) == 2
    assert key in cache and TextEmbeddingCache.key(enc.identity, prompt, add_suffix=False) not in cache


def test_loads_in_target_dtype_and_casts_outputs():
    root = model_dir("sd3_tiny")
    enc = PyramidTextEncoder.from_folder(root, "sd3", dtype=torch.bfloat16)
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    assert enc.family == "mmdit" and enc.pooled_dim == 144 and enc.embed_dim == 64
    out = enc.encode_for_guidance("a cat walking on the beach at sunset")
    assert out.prompt_embeds.dtype == out.pooled.dtype == torch.bfloat16
    assert out.attention_mask.dtype == torch.int64
    assert tuple(out.prompt_embeds.shape) == (2, 128, 64) and tuple(out.pooled.shape) == (2, 144)
    # bf16 weights stay close to the fp32 reference (loose bound: bf16 has an 8-bit mantissa)
    want = expected("sd3_tiny/text_encoding", "prompt")
    assert_matches(out[1].pooled, want.pooled, {"rtol": 5e-2, "atol": 0.0}, "bf16 pooled")
    assert_matches(out[1].prompt_embeds, want.prompt_embeds, {"rtol": 5e-2, "atol": 0.0}, "bf16 embeds")

    moved = out.to("cpu", torch.float32)
    assert moved.prompt_embeds.dtype == moved.pooled.dtype == torch.float32
    assert moved.attention_mask.dtype == torch.int64


def _partial_folder(tmp_path, model: str, missing: str):
    """A model root that links every text subfolder of the fixture except ``missing``."""
    src = model_dir(model)
    root = tmp_path / model
    root.mkdir()
    for sub in src.iterdir():
        if sub.is_dir() and sub.name.startswith(("text_encoder", "tokenizer")) and sub.name != missing:
            (root / sub.name).symlink_to(sub, target_is_directory=True)
    return root


@pytest.mark.parametrize(
    "model, missing, what",
    [("miniflux_tiny", "text_encoder_2", "T5"), ("sd3_tiny", "text_encoder_2", "CLIP-G"), ("sd3_tiny", "tokenizer_3", "T5")],
)
def test_missing_subfolder_is_named(tmp_path, model, missing, what):
    root = _partial_folder(tmp_path, model, missing)
    with pytest.raises(FileNotFoundError, match=rf"'{missing}/'.*{what}"):
        PyramidTextEncoder.from_folder(root, FAMILY[model], dtype=torch.float32)


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model family 'sdxl'; use one of flux, .*mmdit, sd3"):
        PyramidTextEncoder.from_folder(model_dir("miniflux_tiny"), "sdxl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PyramidTextEncoder.from_folder(tmp_path / "nope", "flux")
    with pytest.raises(ValueError, match=r"dtype must be one of bf16, fp16, fp32 .*got 'int8'$"):
        PyramidTextEncoder.from_folder(model_dir("miniflux_tiny"), "flux", dtype="int8")
    for fp8 in ("fp8", "fp8_e5m2", torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=r"must be one of bf16, fp16, fp32.*fp8 weight storage applies to the DiT only"):
            PyramidTextEncoder.from_folder(model_dir("miniflux_tiny"), "flux", dtype=fp8)


@pytest.mark.parametrize(
    "family, dtype, want",
    [("sd3", "torch.float16", "mmdit|{root}|torch.float16"), ("miniflux", "BFloat16", "flux|{root}|torch.bfloat16"),
     ("pyramid_flux", torch.float32, "flux|{root}|torch.float32"), ("SD3", "half", "mmdit|{root}|torch.float16")],
)
def test_family_and_dtype_spellings_come_from_settings(tmp_path, family, dtype, want):
    assert text_encoder_identity(tmp_path, family, dtype) == want.format(root=tmp_path.resolve())


# ------------------------------------------------------------------------------------- prompt truncation


def _words(count: int) -> str:
    """A prompt of `count` T5 tokens plus the end-of-sequence token ("a" is one token in the fixture tokenizer)."""
    return " ".join(["a"] * count)


def _recorded(action) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return caught


def test_long_prompt_warns_once_with_the_dropped_count():
    enc = encoder_for(CASES[0])
    phrase = "a cat walking on the beach at sunset"
    prompt = " ".join([phrase] * 20)
    full_ids = enc.t5_tokenizer(prompt, truncation=False, verbose=False).input_ids
    assert len(full_ids) == 20 * len(enc.t5_tokenizer.tokenize(phrase)) + 1 == 401  # 20 tokens per phrase + EOS
    assert enc.t5_token_counts([prompt, "a cat"]) == [401, 5]

    caught = _recorded(lambda: enc.encode([prompt]))
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert str(caught[0].message) == (
        "prompt is 401 T5 tokens; the last 273 are dropped (T5 reads 128), shorten it to keep them"
    )
    assert caught[0].filename == __file__  # attributed to the caller, not to text.py or torch
    # the warning tells the truth: T5 sees the first 127 tokens and its end-of-sequence token
    ids = enc.tokenize([prompt])
    assert ids["t5"][0].tolist() == full_ids[:127] + [full_ids[-1]] and int(ids["t5_mask"].sum()) == 128


def test_t5_cut_is_reported_at_the_exact_boundary():
    enc = encoder_for(CASES[0])
    assert enc.t5_token_counts([_words(127), _words(128)]) == [128, 129]
    assert enc.truncation_message([_words(127)]) is None
    assert _recorded(lambda: enc.encode([_words(127)])) == []
    caught = _recorded(lambda: enc.encode([_words(127), _words(128)]))
    assert [str(w.message) for w in caught] == [
        "prompt 2 of 2 is 129 T5 tokens; the last 1 are dropped (T5 reads 128), shorten it to keep them"
    ]


@pytest.mark.parametrize("case_id", CASES)
def test_short_prompts_do_not_warn(case_id):
    enc = encoder_for(case_id)
    prompt = case(case_id)["inputs"]["prompt_given_to_generate"]
    caught = _recorded(lambda: (enc.encode_for_guidance(prompt), enc.encode_for_guidance("a cat", None), enc.encode([""])))
    assert caught == []
    # a CLIP-only cut (over 77 CLIP tokens, within T5's 128) is the official behaviour: no warning
    long_for_clip = _words(100)
    assert len(enc.clip_tokenizers[0](long_for_clip, truncation=False, verbose=False).input_ids) == 102
    assert _recorded(lambda: enc.encode([long_for_clip])) == []


def test_guidance_batch_reports_prompt_and_negative_in_one_warning():
    enc = encoder_for(CASES[0])
    # 120 words + the suffix's 18 tokens + EOS = 139: the words alone fit, so the quality suffix is what gets cut
    assert enc.t5_token_counts([_words(120) + PROMPT_SUFFIX, _words(120)]) == [139, 121]
    caught = _recorded(lambda: enc.encode_for_guidance(_words(120), _words(130)))
    assert [str(w.message) for w in caught] == [
        "prompt is 139 T5 tokens; the last 11 are dropped (T5 reads 128; the quality suffix at its end goes first), "
        "shorten it to keep them. "
        "negative prompt is 131 T5 tokens; the last 3 are dropped (T5 reads 128), shorten it to keep them"
    ]
    assert caught[0].filename == __file__
    # without CFG the negative is not encoded, so it is not reported; without the suffix the prompt fits
    assert _recorded(lambda: enc.encode_for_guidance(_words(120), _words(130), add_suffix=False, do_cfg=False)) == []
    caught = _recorded(lambda: enc.encode_for_guidance(_words(120), _words(130), do_cfg=False))
    assert [str(w.message).split(";")[0] for w in caught] == ["prompt is 139 T5 tokens"]


def test_text_embeddings_batch_helpers():
    a = TextEmbeddings(torch.zeros(1, 128, 4), torch.ones(1, 128, dtype=torch.int64), torch.zeros(1, 3))
    b = TextEmbeddings(torch.ones(2, 128, 4), torch.zeros(2, 128, dtype=torch.int64), torch.ones(2, 3))
    both = TextEmbeddings.cat([a, b])
    assert both.batch_size == 3 and torch.equal(both[0].prompt_embeds, a.prompt_embeds)
    assert torch.equal(both[-1].pooled, b.pooled[-1:])
    with pytest.raises(ValueError, match="even"):
        both.chunk_cfg()
    neg, pos = TextEmbeddings.cat([a, a]).chunk_cfg()
    assert neg.batch_size == pos.batch_size == 1
