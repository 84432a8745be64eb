import os
import stat
import threading

import pytest

from cart.io import (CartError, atomic_output, atomic_write_bytes, check_outputs, check_schema,
                     check_stdin_once, intact_records, output_destination, read_input_bytes,
                     read_jsonl, write_jsonl)


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


def test_atomic_output_writes_into_a_fifo_without_replacing_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_jsonl([{"a": 1}], fifo)
    reader.join(timeout=30)
    assert got == [b'{"a":1}\n']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert output_destination(fifo) == (fifo, False)


def test_atomic_output_follows_a_symlink_and_keeps_permissions(tmp_path):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    target.chmod(0o640)
    link.symlink_to(target)
    assert output_destination(link) == (target, True)
    atomic_write_bytes(link, b"new\n")
    assert link.is_symlink() and target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    new = tmp_path / "new.bin"
    atomic_write_bytes(new, b"x")  # a new file gets 0666 less the umask, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask


def test_open_descriptor_names_are_written_through(tmp_path):
    """/dev/stdout redirected to a file: written through the descriptor, never renamed over."""
    assert output_destination("/dev/stdout")[1] is False or not os.path.exists("/dev/stdout")
    assert output_destination("/proc/self/fd/1")[1] is False or not os.path.exists("/proc/self/fd/1")
    assert output_destination(tmp_path / "x.jsonl") == (tmp_path / "x.jsonl", True)


def test_check_outputs_refuses_inputs_and_repeated_outputs(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    for out in (data, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        with pytest.raises(CartError) as e:
            check_outputs({"-o": out}, [data])
        assert str(e.value) == f"-o {out}: is the input {data}; choose another output file"
    with pytest.raises(CartError) as e:
        check_outputs({"-o": tmp_path / "a", "--log": f"{tmp_path}/./a"}, [])
    assert str(e.value) == f"--log {tmp_path}/./a: is also -o {tmp_path / 'a'}; choose another output file"
    # fine: new outputs, stdout, a missing input (its own error comes later), hidden files in
    # an input directory (the corpus walk skips them)
    check_outputs({"-o": tmp_path / "out.jsonl", "--log": "-", "--plot": None},
                  [data, "-", tmp_path / "missing"])
    (tmp_path / ".cache.jsonl").write_text("")
    check_outputs({"-o": tmp_path / ".cache.jsonl"}, [tmp_path])
    assert data.read_text() == "{}\n"


def test_intact_records_stop_at_a_line_cart_did_not_write():
    data = b'{"run": "x"}\n[1, 2]\n{"run": "y"}\n'
    assert list(intact_records(data)) == [({"run": "x"}, 13)]
    assert list(intact_records(b"")) == []  # a 0-byte .partial: nothing done yet
    assert list(intact_records(b"null\n")) == []


def test_read_input_bytes_and_stdin_once(tmp_path):
    with pytest.raises(CartError, match=r"^.*x\.safetensors: no such cartridge file$"):
        read_input_bytes(tmp_path / "x.safetensors", "cartridge file")
    with pytest.raises(CartError, match=r": is a directory, expected a cartridge file$"):
        read_input_bytes(tmp_path, "cartridge file")
    with pytest.raises(CartError) as e:
        check_stdin_once(["-", "a", "-"])
    assert str(e.value) == "- (stdin) is given more than once; it can be read only once"
