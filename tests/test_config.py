import pytest

from cart.chunk import ChunkConfig
from cart.config import resolve
from cart.io import CartError


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "cart.toml"
    cfg_file.write_text("[chunk]\nmin-tokens = 100\nmax_tokens = 200\nseed = 7\n"
                        "[synth]\nturns = 2\n")
    cfg = resolve(ChunkConfig, cfg_file, "chunk", seed=3, mode=None)
    assert (cfg.min_tokens, cfg.max_tokens, cfg.seed, cfg.mode) == (100, 200, 3, "random")


def test_top_level_keys_and_json_files(tmp_path):
    cfg_file = tmp_path / "chunk.json"
    cfg_file.write_text('{"mode": "sequential", "overlap": 5}')
    cfg = resolve(ChunkConfig, cfg_file, "chunk")
    assert (cfg.mode, cfg.overlap) == ("sequential", 5)


def test_unknown_key_is_named(tmp_path):
    cfg_file = tmp_path / "cart.toml"
    cfg_file.write_text("[chunk]\nmin_tokenz = 1\n")
    with pytest.raises(CartError, match=r"unknown setting 'min_tokenz' for chunk"):
        resolve(ChunkConfig, cfg_file, "chunk")


def test_wrong_type_in_file_names_the_setting(tmp_path):
    cfg_file = tmp_path / "cart.toml"
    cfg_file.write_text('[chunk]\nmin_tokens = "many"\n')
    with pytest.raises(CartError, match=r"^--min-tokens must be int, got 'many'$"):
        resolve(ChunkConfig, cfg_file, "chunk")


@pytest.mark.parametrize("kwargs, message", [
    ({"min_tokens": 600, "max_tokens": 500}, "--min-tokens 600 is larger than --max-tokens 500"),
    ({"min_tokens": 0}, "--min-tokens must be at least 1, got 0"),
    ({"num_chunks": 0}, "-n/--num-chunks must be at least 1, got 0"),
    ({"mode": "spiral"}, "--mode must be one of random, sequential, got 'spiral'"),
    ({"overlap": 4096}, "--overlap must be in [0, --max-tokens), got 4096"),
])
def test_chunk_config_validation(kwargs, message):
    with pytest.raises(CartError) as e:
        ChunkConfig(**kwargs)
    assert str(e.value) == message


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(CartError, match="config file not found"):
        resolve(ChunkConfig, tmp_path / "none.toml", "chunk")
    bad = tmp_path / "bad.toml"
    bad.write_text("[chunk\n")
    with pytest.raises(CartError, match=r"bad.toml: invalid config file"):
        resolve(ChunkConfig, bad, "chunk")


@pytest.mark.parametrize("name, text", [
    ("cart.toml", "[chunk]\nmin_tokens = 8\n[eval]\ntemperature = nan\n"),
    ("cart.toml", "temperature = -inf\n"),
    ("cart.json", '{"temperature": Infinity}'),
    ("cart.json", '{"eval": {"temperature": NaN}}'),
])
def test_config_files_refuse_non_finite_numbers(tmp_path, name, text):
    from cart.eval import EvalConfig

    cfg_file = tmp_path / name
    cfg_file.write_text(text)
    with pytest.raises(CartError, match=rf"^{cfg_file}: setting 'temperature' must be a finite "
                                        r"number, got -?(nan|inf)$"):
        resolve(EvalConfig, cfg_file, "eval")


def test_flags_and_fields_refuse_non_finite_numbers():
    from cart.eval import EvalConfig

    with pytest.raises(CartError, match=r"^--temperature must be a finite number, got nan$"):
        resolve(EvalConfig, None, "eval", temperature=float("nan"))
    with pytest.raises(CartError, match=r"^--temperature must be a finite number, got inf$"):
        EvalConfig(temperature=float("inf"))  # built directly, past resolve


@pytest.mark.parametrize("kwargs, message", [
    ({"num_chunks": 1_000_001}, "-n/--num-chunks must be at most 1000000, got 1000001"),
    ({"num_chunks": 1_000_000}, None),
])
def test_counts_are_bounded(kwargs, message):
    if message is None:
        ChunkConfig(**kwargs)
        return
    with pytest.raises(CartError) as e:
        ChunkConfig(**kwargs)
    assert str(e.value) == message
