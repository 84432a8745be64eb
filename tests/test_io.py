import pytest

from cart.io import CartError, atomic_output, check_schema, read_jsonl, write_jsonl


def test_read_jsonl_names_file_and_line_of_malformed_record(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"schema": "cart.chunk/1"}\n\n{"schema": "cart.chunk/1",\n')
    lines = read_jsonl(p, kind="chunk")
    first = next(lines)
    assert first.where == f"{p}:1"
    with pytest.raises(CartError, match=rf"^{p}:3: invalid JSON"):
        next(lines)


@pytest.mark.parametrize("record, message", [
    ({}, "x:1: missing field 'schema' (expected cart.chunk/1)"),
    ({"schema": "cart.convo/1"}, "x:1: expected a cart.chunk/1 record, got cart.convo/1"),
    ({"schema": "cart.chunk/2"},
     "x:1: unsupported schema version cart.chunk/2 (this cart reads cart.chunk/1; "
     "upgrade cart or regenerate the file)"),
    ({"schema": "chunk"}, "x:1: field 'schema' is 'chunk', expected cart.chunk/1"),
    ([1, 2], "x:1: expected a JSON object, got list"),
])
def test_check_schema_refuses_with_exact_messages(record, message):
    with pytest.raises(CartError) as e:
        check_schema(record, "chunk", "x:1")
    assert str(e.value) == message


def test_check_schema_accepts_newer_minor_version():
    check_schema({"schema": "cart.chunk/1.3"}, "chunk", "x:1")


def test_atomic_output_keeps_existing_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("precious\n")

    def records():
        yield {"a": 1}
        raise CartError("boom")

    with pytest.raises(CartError):
        write_jsonl(records(), target)
    assert target.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_atomic_output_replaces_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_write_jsonl_roundtrip(tmp_path):
    target = tmp_path / "r.jsonl"
    assert write_jsonl([{"schema": "cart.chunk/1", "i": i} for i in range(3)], target) == 3
    assert [line.record["i"] for line in read_jsonl(target, kind="chunk")] == [0, 1, 2]


def test_atomic_output_refuses_missing_directory(tmp_path):
    with pytest.raises(CartError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "x.jsonl"):
            pass
