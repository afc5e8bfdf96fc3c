"""Generation backends on a tiny real Llama: CTranslate2 gives the same greedy text as transformers."""

from __future__ import annotations

import os

import pytest

from reclm.llm.generation import DecodeParams, make_generator
from reclm.llm.generation.base import finish, stop_token_ids
from reclm.llm.generation.ct2 import (
    CT2Generator,
    common_prefix_length,
    cpu_vendor_and_flags,
    default_quantization,
    int8_tracks_float32,
)
from reclm.llm.generation.hf import TransformersGenerator
from reclm.llm.model import load_tokenizer

GREEDY = DecodeParams(max_new_tokens=12, single_line=False)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return TransformersGenerator(tiny_model, batch_size=2, device="cpu")


def test_ct2_float32_matches_transformers_greedy(tiny_model, reference, prompts):
    expected = reference.generate(prompts, GREEDY)
    assert len(set(expected)) == len(prompts) and all(expected)  # distinct, non-empty: a real comparison
    fast = CT2Generator(tiny_model, quantization="float32", batch_size=3, device="cpu")
    assert fast.generate(prompts, GREEDY) == expected
    fast.static_prefix = False  # the cached shared prefix changes nothing
    assert fast.generate(prompts, GREEDY) == expected
    assert fast.new_tokens > 0 and fast.prompt_tokens > 0
    assert fast.identity != reference.identity and "adapter=none" in fast.identity


def test_ct2_matches_transformers_with_a_merged_adapter(tiny_model, tiny_adapter, reference, prompts):
    tuned = TransformersGenerator(tiny_model, tiny_adapter, batch_size=4, device="cpu")
    expected = tuned.generate(prompts, GREEDY)
    assert expected != reference.generate(prompts, GREEDY)  # the adapter matters
    assert expected[0].startswith("User identity:")  # it learned the toy format
    fast = CT2Generator(tiny_model, tiny_adapter, quantization="float32", batch_size=2, device="cpu")
    assert fast.generate(prompts, GREEDY) == expected
    assert tuned.identity.split("adapter=")[1] == fast.identity.split("adapter=")[1] != "none"


def test_the_cpu_default_precision_stays_close_to_float32_and_outputs_one_line(tiny_model, prompts):
    """int8 where this CPU's int8 kernels track float32 (it keeps at least the first token), else float32."""
    exact = CT2Generator(tiny_model, quantization="float32", device="cpu").generate(prompts, GREEDY)
    fast = make_generator("ct2", tiny_model, batch_size=8)  # the CPU default
    int8 = int8_tracks_float32(*cpu_vendor_and_flags(), os.environ.get("CT2_USE_MKL"))
    expected = "int8" if int8 else "float32"
    assert fast.quantization == expected and fast.identity.startswith(f"ct2-{expected}|")
    approx = fast.generate(prompts, GREEDY)
    tokenizer = load_tokenizer(tiny_model)
    first = [tokenizer(t, add_special_tokens=False)["input_ids"][:1] for t in (*exact, *approx)]
    assert first[: len(prompts)] == first[len(prompts) :]
    if not int8:
        assert approx == exact
    assert all("\n" not in t for t in fast.generate(prompts, DecodeParams(max_new_tokens=12)))


def test_int8_is_the_cpu_default_only_where_its_kernels_track_float32(tmp_path):
    """CTranslate2 runs int8 with MKL on Intel CPUs and with oneDNN elsewhere, whose AVX2 path (no VNNI)
    is far off float32 (measured on an AMD EPYC, Zen 1)."""
    assert int8_tracks_float32("GenuineIntel", {"avx2", "avx512f"})
    assert not int8_tracks_float32("AuthenticAMD", {"avx2", "fma"})
    assert int8_tracks_float32("AuthenticAMD", {"avx2", "avx512_vnni"})
    assert int8_tracks_float32("AuthenticAMD", {"avx2"}, use_mkl="1")
    assert not int8_tracks_float32("GenuineIntel", {"avx2"}, use_mkl="0")  # oneDNN forced, no VNNI
    assert int8_tracks_float32("", set())  # not x86: int8 as before
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2{extra}\n\n"
    cpuinfo.write_text(block.format(n=0, extra="") + block.format(n=1, extra=" avx512_vnni"))
    assert cpu_vendor_and_flags(cpuinfo) == ("AuthenticAMD", {"fpu", "sse", "avx2"})
    assert cpu_vendor_and_flags(tmp_path / "missing") == ("", set())
    assert default_quantization("cuda") == "int8_bfloat16"


def test_seeded_sampling_is_reproducible(tiny_model, reference, prompts):
    params = DecodeParams(max_new_tokens=10, temperature=1.0, seed=7, single_line=False)
    first = reference.generate(prompts, params)
    assert reference.generate(prompts, params) == first
    other = reference.generate(prompts, DecodeParams(max_new_tokens=10, temperature=1.0, seed=8, single_line=False))
    assert other != first
    fast = CT2Generator(tiny_model, quantization="float32", device="cpu")
    assert fast.generate(prompts, params) == fast.generate(prompts, params)


def test_decode_params_and_helpers():
    assert DecodeParams(temperature=0, seed=1).key() == DecodeParams(temperature=0, seed=2).key()  # greedy
    assert DecodeParams(temperature=1, seed=1).key() != DecodeParams(temperature=1, seed=2).key()
    with pytest.raises(ValueError):
        DecodeParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        DecodeParams(top_p=0)
    assert finish(" User identity: A; User interests: B.\nMore chatter", DecodeParams()) == (
        "User identity: A; User interests: B."
    )
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    tokenizer = load_tokenizer()
    stops = stop_token_ids(tokenizer, single_line=True)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer("\n", add_special_tokens=False)["input_ids"][0] in stops
    assert tokenizer("User", add_special_tokens=False)["input_ids"][0] not in stops
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("llamacpp")


def test_cache_identity_is_the_identity_the_loaded_generator_files_its_outputs_under(tiny_model, tiny_adapter):
    """The dry run counts cached profiles under ``cache_identity`` without loading a model: it must be the
    string the generator itself uses, for each local backend, precision and adapter."""
    from reclm.llm.generation import cache_identity

    for backend, options in (("ct2", {}), ("ct2", {"quantization": "float32"}), ("transformers", {})):
        for adapter in (None, tiny_adapter):
            with make_generator(backend, tiny_model, adapter, threads=1, **options) as generator:
                assert cache_identity(backend, tiny_model, adapter, **options) == generator.identity
    assert cache_identity("ctranslate2", tiny_model) == cache_identity("ct2", tiny_model)
    assert cache_identity("ct2", tiny_model, tiny_adapter) != cache_identity("ct2", tiny_model)
    assert cache_identity("openai", "served-model") is None  # reclm cannot fingerprint a served model


def test_a_repetition_penalty_changes_greedy_text_alike_in_both_backends(tiny_model, reference, prompts):
    """A random tiny model's greedy text loops; the penalty breaks the loops, and CTranslate2 applies it as
    transformers does (same texts)."""
    long = DecodeParams(max_new_tokens=24, single_line=False)
    penalised = DecodeParams(max_new_tokens=24, single_line=False, repetition_penalty=1.5)
    plain, expected = reference.generate(prompts, long), reference.generate(prompts, penalised)
    assert expected != plain

    def repeats(text: str) -> int:  # tokens that occurred before in the text
        ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) - len(set(ids))

    assert sum(map(repeats, expected)) < sum(map(repeats, plain))
    fast = CT2Generator(tiny_model, quantization="float32", batch_size=3, device="cpu")
    assert fast.generate(prompts, penalised) == expected


def test_the_repetition_penalty_is_in_the_cache_key_only_when_on():
    assert DecodeParams().key() == (
        '{"max_new_tokens": 48, "seed": 0, "single_line": true, "temperature": 0.0, "top_k": 0, "top_p": 1.0}'
    )  # the key profiles were cached under before the setting existed
    assert '"repetition_penalty": 1.05' in DecodeParams(repetition_penalty=1.05).key()
    with pytest.raises(ValueError, match="repetition_penalty"):
        DecodeParams(repetition_penalty=0)
