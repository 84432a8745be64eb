"""Seed prompts for self-study (cart/seeds): built-in types, mixes, and custom prompt files."""

from __future__ import annotations

import json
import random
import re

import pytest
from conftest import cloze_parts

from cart.io import CartError
from cart.seeds import (
    SEED_TYPES, CustomSeeds, GenericSeed, SeedMix, SeedPrompt, get_seed_prompts,
)
from cart.seeds.structuring import DATA_FORMATS

FIVE = ["structuring", "summarization", "question", "use_case", "creative"]
DOMAIN_WORDS = ["medical", "patient", "health", "clinical", "financial", "finance", "code",
                "legal", "law", "space", "city", "translat", "language learning"]
ENDING = re.compile(r"Output only (the|that) (message|question|question or request), and "
                    r"nothing else: no preamble, no explanation\.$")
UNKNOWN = ("--seed-prompts: unknown seed-prompt type {!r} (known: mixed, recall, generic, "
           "structuring, summarization, question, use_case, creative, recite, facts, qa, cloze, or a "
           "file)")


def all_builtin_prompts(n: int = 300) -> set[str]:
    """Every distinct text each built-in type gives over ``n`` draws."""
    rng = random.Random(0)
    seeds = [cls() for cls in SEED_TYPES.values()] + [GenericSeed()]
    return {seed.sample(rng) for seed in seeds for _ in range(n)}


def test_registry_holds_the_five_paper_types_in_order():
    assert list(SEED_TYPES) == FIVE
    for name, cls in SEED_TYPES.items():
        assert issubclass(cls, SeedPrompt)
        assert cls.name == name


@pytest.mark.parametrize("name", FIVE)
def test_each_type_returns_nonempty_text(name):
    text = SEED_TYPES[name]().sample(random.Random(0))
    assert isinstance(text, str) and text.strip()


@pytest.mark.parametrize("spec", ["mixed", "generic", "question,summarization", "structuring"])
def test_same_seed_gives_same_prompts(spec):
    mix = get_seed_prompts(spec)
    a, b = random.Random(1234), random.Random(1234)
    assert [mix.sample(a) for _ in range(50)] == [mix.sample(b) for _ in range(50)]


def test_different_seeds_give_different_mixed_sequences():
    mix = get_seed_prompts("mixed")
    a, b = random.Random(1), random.Random(2)
    assert [mix.sample(a) for _ in range(30)] != [mix.sample(b) for _ in range(30)]


def test_recall_is_the_default_and_mixed_draws_all_five_types():
    assert get_seed_prompts().describe() == "recall: recite, facts, qa, cloze"
    mix = get_seed_prompts("mixed")
    assert mix.describe() == "mixed: structuring, summarization, question, use_case, creative"
    rng = random.Random(0)
    drawn = [mix.sample(rng) for _ in range(200)]
    known = all_builtin_prompts()
    assert {name for name, _ in drawn} == set(FIVE)
    for name, text in drawn:
        assert text in known, name


def test_structuring_mentions_every_data_format_across_samples():
    seed = SEED_TYPES["structuring"]()
    rng = random.Random(0)
    texts = [seed.sample(rng) for _ in range(200)]
    assert set(DATA_FORMATS) == {"JSON", "YAML", "TOML", "INI", "XML", "plain text"}
    for fmt in DATA_FORMATS:
        assert any(fmt in t for t in texts), fmt
    for t in texts:  # one format per prompt, used consistently
        assert sum(f" {fmt}" in t for fmt in DATA_FORMATS) == 1, t


@pytest.mark.parametrize("name, at_least", [("summarization", 2), ("question", 3)])
def test_types_with_variants_use_them(name, at_least):
    seed = SEED_TYPES[name]()
    rng = random.Random(0)
    assert len({seed.sample(rng) for _ in range(100)}) >= at_least


def test_builtin_prompts_are_generic_and_end_with_output_only_instruction():
    for text in all_builtin_prompts():
        lowered = text.lower()
        for word in DOMAIN_WORDS:
            assert word not in lowered, (word, text)
        assert "document" in lowered
        assert ENDING.search(text), text


def test_generic_is_a_single_fixed_prompt():
    mix = get_seed_prompts("generic")
    assert mix.describe() == "generic"
    rng = random.Random(0)
    drawn = {mix.sample(rng) for _ in range(50)}
    assert len(drawn) == 1
    (name, text), = drawn
    assert name == "generic" and text == GenericSeed().sample(random.Random(9))
    assert "conversation" in text and "question" in text and "request" in text


def test_comma_list_draws_only_the_named_types():
    mix = get_seed_prompts(" question , summarization,question")
    assert mix.names == ["question", "summarization"]
    assert mix.describe() == "mixed: question, summarization"
    rng = random.Random(0)
    assert {mix.sample(rng)[0] for _ in range(100)} == {"question", "summarization"}
    assert get_seed_prompts("use_case").describe() == "use_case"


@pytest.mark.parametrize("spec, bad", [("xyz", "xyz"), ("question,xyz", "xyz"), ("", ""),
                                       ("question,", ""), ("Question", "Question")])
def test_unknown_type_error_text(spec, bad):
    with pytest.raises(CartError) as e:
        get_seed_prompts(spec)
    assert str(e.value) == UNKNOWN.format(bad)


def test_custom_txt(tmp_path):
    p = tmp_path / "seeds.txt"
    p.write_text("# my prompts\n\nAsk about the first section.\n  Ask about the last table.  \n"
                 "#Ask nothing\n")
    seeds = CustomSeeds.from_file(p)
    assert seeds.name == "custom"
    assert seeds.prompts == ["Ask about the first section.", "Ask about the last table."]
    assert seeds.source == str(p)
    mix = get_seed_prompts(str(p))
    assert mix.describe() == f"custom: {p} (2 prompts)"
    rng = random.Random(0)
    drawn = [mix.sample(rng) for _ in range(100)]
    assert {name for name, _ in drawn} == {"custom"}
    assert {text for _, text in drawn} == set(seeds.prompts)


def test_custom_jsonl(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text(json.dumps({"prompt": "First prompt.", "type": "question"}) + "\n\n"
                 + json.dumps({"prompt": "Second\nprompt."}) + "\n")
    seeds = CustomSeeds.from_file(str(p))
    assert seeds.prompts == ["First prompt.", "Second\nprompt."]
    assert get_seed_prompts(str(p)).describe() == f"custom: {p} (2 prompts)"


def test_custom_uniform_and_deterministic():
    seeds = CustomSeeds(["a", "b", "c"], source="inline")
    assert CustomSeeds(["x"], "one").sample(random.Random(0)) == "x"
    rng = random.Random(5)
    counts = {k: 0 for k in "abc"}
    for _ in range(3000):
        counts[seeds.sample(rng)] += 1
    assert all(800 < c < 1200 for c in counts.values()), counts
    assert [seeds.sample(random.Random(3)) for _ in range(5)] == \
        [seeds.sample(random.Random(3)) for _ in range(5)]


def test_existing_file_without_slash_or_suffix_is_custom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myprompts").write_text("Only prompt.\n")
    mix = get_seed_prompts("myprompts")
    assert mix.describe() == "custom: myprompts (1 prompt)"
    assert mix.sample(random.Random(0)) == ("custom", "Only prompt.")


@pytest.mark.parametrize("name, content, message", [
    ("s.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', "{p}:2: missing field 'prompt'"),
    ("s.jsonl", '{"prompt": "ok"}\n\n{"prompt": \n', "{p}:3: invalid JSON"),
    ("s.jsonl", '["prompt"]\n', "{p}:1: expected a JSON object, got list"),
    ("s.jsonl", '{"prompt": 3}\n', "{p}:1: field 'prompt' must be a string, got int"),
    ("s.jsonl", '{"prompt": "  "}\n', "{p}:1: field 'prompt' is empty"),
    ("s.jsonl", "\n\n", "{p}: no seed prompts found"),
    ("s.txt", "# only a comment\n\n   \n", "{p}: no seed prompts found"),
    ("s.txt", "", "{p}: no seed prompts found"),
])
def test_custom_file_errors_are_exact(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    for load in (CustomSeeds.from_file, get_seed_prompts):
        with pytest.raises(CartError) as e:
            load(str(p))
        assert str(e.value) == message.format(p=p)


def test_custom_missing_file(tmp_path):
    for spec in (str(tmp_path / "nope.txt"), str(tmp_path / "nope.jsonl"), "nope.txt",
                 "dir/nope"):
        with pytest.raises(CartError) as e:
            get_seed_prompts(spec)
        assert str(e.value) == f"{spec}: no such file"


def test_custom_directory_and_non_utf8(tmp_path):
    with pytest.raises(CartError) as e:
        CustomSeeds.from_file(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a directory, expected a file of seed prompts"
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xff\xfe\xfa prompt\n")
    with pytest.raises(CartError) as e:
        CustomSeeds.from_file(p)
    assert str(e.value) == f"{p}: not UTF-8 text"


def test_custom_seeds_refuses_an_empty_list():
    with pytest.raises(CartError) as e:
        CustomSeeds([], source="x.txt")
    assert str(e.value) == "x.txt: no seed prompts found"


def test_seed_mix_sample_draws_type_then_prompt():
    """The draw order is part of reproducibility: one choice for the type, then the type's own."""
    mix = get_seed_prompts("mixed")
    rng, ref = random.Random(42), random.Random(42)
    for _ in range(50):
        name, text = mix.sample(rng)
        seed = ref.choice(mix.seeds)
        assert name == seed.name and text == seed.sample(ref)
    assert isinstance(mix, SeedMix)


def test_cloze_quotes_the_start_of_a_sentence_of_its_chunk():
    """A cloze prompt quotes between a third and two thirds of one sentence of the chunk (of
    at least MIN_WORDS words), so the answer the teacher copies holds the rest of it."""
    from cart.seeds.cloze import MIN_WORDS, VARIANTS, ClozeSeed

    chunk = ("# Heading\n\nThe harbour light was first lit on 3 March 1911 by the keeper. "
             "Short one. Ferries leave the north quay every forty minutes in summer.\n| a | b |")
    sentences = ["The harbour light was first lit on 3 March 1911 by the keeper.",
                 "Ferries leave the north quay every forty minutes in summer."]
    seed, rng, seen = ClozeSeed(), random.Random(0), set()
    for _ in range(200):
        template, cue = cloze_parts(seed.sample(rng, chunk))
        whole = next(s for s in sentences if s.startswith(cue + " "))
        n, k = len(whole.split()), len(cue.split())
        assert n >= MIN_WORDS and max(3, n // 3) <= k <= 2 * n // 3
        seen.add((template, whole))
    assert len(seen) == len(VARIANTS) * len(sentences)
    assert seed.sample(random.Random(4), chunk) == seed.sample(random.Random(4), chunk)


def test_cloze_without_a_long_sentence_quotes_the_chunks_first_words():
    from cart.seeds.cloze import ClozeSeed

    assert cloze_parts(ClozeSeed().sample(random.Random(0), "| id | value |\n| 1 | 2 |"))[1] \
        in ("| id |", "| id | value", "| id | value |")
    assert cloze_parts(ClozeSeed().sample(random.Random(0), ""))[1] in ("The document",
                                                                          "The document begins")
