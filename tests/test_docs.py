"""The documentation keeps up with the code.

* Every command of the Typer app has ``--help`` text (through the real entry point) and a man
  page ``man/cart-<name>.1`` that names each of its options and arguments; ``man/cart.1``
  lists it among its Commands and in SEE ALSO.
* Every setting of a stage's config dataclass is an option, listed under ``--config``; its
  default, written only in the dataclass, ends its ``--help`` and is its man page Default.
* ``man/cart-formats.5`` documents every tensor name and metadata key of the cartridge file,
  every field of a ``cart.chunk`` record, and every record kind of ``cart.io.SCHEMA_VERSIONS``.
* ``cart --help`` (and each ``cart <command> --help``) answers without importing torch or
  transformers.
* The man pages render without groff warnings (when groff is installed).

Add a command to ``cart/cli.py`` and these tests fail until its man page exists.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import run_cart_in_process

from cart import cli
from cart.cli import app

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"

COMMANDS = typer.main.get_command(app).commands
NAMES = sorted(COMMANDS)


# -- reading roff source as text ---------------------------------------------------------------
_ALTERNATING = {".BI", ".IB", ".BR", ".RB", ".IR", ".RI"}  # arguments joined without spaces
_SPECIAL_CHARS = {"dq": '"', "mu": "x", "em": "--", "en": "-", "bu": "*", "lq": '"', "rq": '"'}


def _unescape(s: str) -> str:
    s = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", s)  # font changes
    s = re.sub(r"\\\((..)", lambda m: _SPECIAL_CHARS.get(m.group(1), ""), s)
    s = s.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\").replace("\\ ", " ")
    return s


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments the roff way: spaces separate, double quotes group (``""`` inside
    quotes is a literal quote); apostrophes are ordinary characters."""
    args, i, n = [], 0, len(rest)
    while i < n:
        if rest[i] == " ":
            i += 1
            continue
        if rest[i] == '"':
            i += 1
            arg = []
            while i < n:
                if rest[i] == '"':
                    if rest[i + 1:i + 2] == '"':
                        arg.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                arg.append(rest[i])
                i += 1
            args.append("".join(arg))
        else:
            j = rest.find(" ", i)
            j = n if j < 0 else j
            args.append(rest[i:j])
            i = j
    return args


def roff_lines(path: Path) -> list[str]:
    """The page's lines with escapes removed and font-alternating macros joined into words.

    ``.BI frozen. i .keys`` becomes ``.BI frozen.i.keys``, so names split across fonts can be
    searched for as written in the code.
    """
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith('.\\"'):
            continue
        macro, _, rest = line.partition(" ")
        if macro in _ALTERNATING:
            line = f"{macro} " + "".join(_unescape(a) for a in _macro_args(rest))
        elif macro in (".B", ".I"):
            line = f"{macro} " + " ".join(_unescape(a) for a in _macro_args(rest))
        else:
            line = _unescape(line)
        out.append(line)
    return out


def roff_text(path: Path) -> str:
    return "\n".join(roff_lines(path))


def sections(path: Path) -> dict[str, list[str]]:
    """``.SH`` name (upper case) -> the normalized lines under it."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in roff_lines(path):
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"').upper()
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def tag_words(lines: list[str]) -> set[str]:
    """The words of every ``.TP``/``.TQ`` tag (the line after the macro): the documented items."""
    words: set[str] = set()
    for prev, line in zip(lines, lines[1:]):
        if prev.strip() in (".TP", ".TQ"):
            text = line.split(" ", 1)[1] if line.startswith(".") else line
            words.update(re.findall(r"[A-Za-z0-9_.{}/<>-]*[A-Za-z0-9_}>]", text))
    return words


def mentions(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` not as part of a longer option or identifier."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def run_cart(*args: str) -> subprocess.CompletedProcess:
    """The entry point in this process (conftest.run_cart_in_process), output as text."""
    result = run_cart_in_process(*args, cwd=ROOT)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def one_line(s: str) -> str:
    return " ".join(s.split())


# -- every command: help text and a man page ---------------------------------------------------
def test_the_app_has_commands():
    assert NAMES, "typer.main.get_command(app).commands is empty"


@pytest.mark.parametrize("name", NAMES)
def test_command_has_a_man_page_naming_every_option(name):
    page = MAN / f"cart-{name}.1"
    assert page.is_file(), f"cart {name} has no man page: create {page.relative_to(ROOT)}"
    text = roff_text(page)
    assert re.search(rf"^\.TH CART-{name.upper()} 1\b", text, re.M), f"{page.name}: bad .TH"
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert heading in sections(page), f"{page.name}: no .SH {heading}"
    options_section = "\n".join(sections(page)["OPTIONS"])
    for param in COMMANDS[name].params:
        if param.param_type_name == "option":
            for opt in [*param.opts, *param.secondary_opts]:
                assert mentions(options_section, opt), (
                    f"{page.name}: OPTIONS does not document {opt} of cart {name}")
        else:  # an argument: named as in `cart <name> --help`
            assert mentions(text, param.name), f"{page.name}: argument {param.name} not named"


@pytest.mark.parametrize("name", NAMES)
def test_command_help_runs_and_describes_it(name):
    command = COMMANDS[name]
    assert (command.help or "").strip(), f"cart {name} has no help text (a docstring)"
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), (
            f"cart {name}: {param.name} has no help text")
    result = run_cart(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: cart {name}"), result.stdout
    description = one_line(command.help.strip().split("\n\n")[0])
    assert description in one_line(result.stdout), result.stdout
    for param in command.params:
        if param.param_type_name == "option":
            assert param.opts[0] in result.stdout


# -- settings: the dataclass default, --help and the man page agree ----------------------------
STAGE_NAMES = [name for name in NAMES if isinstance(COMMANDS[name], cli._Stage)]


def option_entries(page: Path) -> dict[str, str]:
    """The OPTIONS section's ``.TP`` entries: each option named in an entry's tags (the line
    after ``.TP`` or ``.TQ``) -> the entry's body."""
    entries: dict[str, str] = {}
    tags: list[str] = []
    body: list[str] = []
    lines = sections(page)["OPTIONS"] + [".TP"]
    for prev, line in zip([""] + lines, lines):
        if line.strip() in (".TP", ".TQ"):
            if line.strip() == ".TP" and tags:
                entries.update(dict.fromkeys(tags, "\n".join(body)))
                tags, body = [], []
        elif prev.strip() in (".TP", ".TQ"):
            tags += re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", line.split(" ", 1)[-1])
        else:
            body.append(line)
    return entries


def test_stage_commands_are_found():
    assert {"chunk", "synth", "distill", "compact", "eval", "serve"} <= set(STAGE_NAMES)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_every_setting_is_an_option_with_its_default_in_help_and_man_page(name):
    """Each field of the stage's config dataclass is an option of the same name; its default,
    declared only in the dataclass, ends the option's --help and is the man page's Default."""
    command, page = COMMANDS[name], MAN / f"cart-{name}.1"
    command.get_help(command.context_class(command, info_name=name))  # fills in the defaults
    options = {p.name: p for p in command.params if p.param_type_name == "option"}
    entries = option_entries(page)
    config_entry = entries["--config"]
    for field in dataclasses.fields(cli.config_class(name)):
        assert field.name in options, f"cart {name}: setting {field.name} has no option"
        assert mentions(config_entry, field.name), (
            f"{page.name}: --config does not list the key {field.name}")
        param = options[field.name]
        shown = cli.shown_default(field.name, field.default)
        if shown is None:  # None or "": the man page says what it means in words
            continue
        assert param.help.endswith(f"[default: {shown}]"), (
            f"cart {name} {param.opts[-1]}: help does not end in [default: {shown}]: {param.help}")
        entry = entries.get(param.opts[-1], "")
        assert entry.strip(), f"{page.name}: no OPTIONS entry for {param.opts[-1]}"
        assert re.search(rf"Default:\s*(?:\.[BI]R? )?{re.escape(shown)}(?![\w-]|[.,]\w)", entry), (
            f"{page.name}: the entry of {param.opts[-1]} does not say Default: {shown} "
            f"(the default of {cli.config_class(name).__name__}.{field.name})")


@pytest.mark.parametrize("name", NAMES)
def test_overview_page_lists_command(name):
    page = MAN / "cart.1"
    text = roff_text(page)
    assert re.search(rf"cart[ -]{name}\b", text), f"cart.1 does not mention cart {name}"
    assert f"cart-{name}" in "\n".join(sections(page)["SEE ALSO"]), (
        f"cart.1: SEE ALSO lacks cart-{name}(1)")
    assert name in _overview_entries(), f"cart.1: Commands lists no {name}"


def _overview_entries() -> dict[str, str]:
    """The ``.TP`` entries of the overview's Commands list: name -> description."""
    text = roff_text(MAN / "cart.1")
    block = text.split(".SS Commands", 1)[1].split("\n.SS", 1)[0]
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^\.TP\n\.B (\w+)\n(.*?)(?=^\.TP|\Z)", block, re.M | re.S)}


def test_root_help_and_version():
    result = run_cart("--help")
    assert result.returncode == 0, result.stderr
    for name in NAMES:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), result.stdout
    text = roff_text(MAN / "cart.1")
    for opt in ("--version", "-h", "--help"):
        assert mentions("\n".join(sections(MAN / "cart.1")["OPTIONS"]), opt)
    assert mentions(text, "--config") and mentions(text, "--model")


# -- the formats page ----------------------------------------------------------------------------
FORMATS = MAN / "cart-formats.5"


def _tiny_cartridge():
    torch = pytest.importorskip("torch")
    from cart.cartridge import Cartridge

    def t(n):
        return [torch.zeros(2, n, 4) for _ in range(2)]

    return Cartridge(t(1), t(1), t(3), t(3), metadata={},
                     biases=[torch.zeros(2, 4) for _ in range(2)])  # [kv_heads, p]: format 2


def test_formats_page_documents_tensor_names():
    cart = _tiny_cartridge()
    section = sections(FORMATS)["THE CARTRIDGE FILE"]
    documented = tag_words(section)
    patterns = sorted({re.sub(r"\.\d+(?=\.|$)", ".i", name) for name in cart.tensors()})
    assert len(patterns) == 5, patterns
    for pattern in patterns:  # frozen.i.keys ... bias.i, as written in the page
        assert pattern in documented, f"cart-formats.5 does not document tensor {pattern}"
    text = "\n".join(section)
    for word in ("kv_heads", "head_dim", "post-RoPE", "pickle"):
        assert word in text, f"cart-formats.5: THE CARTRIDGE FILE does not mention {word}"


def test_formats_page_documents_every_metadata_key():
    from cart import cartridge

    documented = tag_words(sections(FORMATS)["THE CARTRIDGE FILE"])
    keys = {*cartridge._REQUIRED_KEYS, *cartridge._INT_KEYS, *cartridge._FLOAT_KEYS,
            *cartridge._JSON_KEYS}
    keys |= set(_tiny_cartridge().full_metadata())  # what a writer adds: cart_version, created
    missing = sorted(k for k in keys if k not in documented)
    assert not missing, f"cart-formats.5 does not document metadata keys {missing}"
    text = roff_text(FORMATS)
    assert cartridge.FORMAT in text
    json_section = "\n".join(sections(FORMATS)["THE CARTRIDGE FILE"])
    for key in cartridge._JSON_KEYS:  # each JSON-encoded key says so in its entry
        assert re.search(rf"^\.B {key}\n\(JSON\)", json_section, re.M), (
            f"cart-formats.5: metadata key {key} is not marked (JSON)")


def test_formats_page_documents_every_schema_kind():
    from cart.io import SCHEMA_VERSIONS, schema_id

    text = roff_text(FORMATS)
    for kind in SCHEMA_VERSIONS:
        assert schema_id(kind) in text, f"cart-formats.5 does not document {schema_id(kind)}"
    planned = tag_words(sections(FORMATS).get("PLANNED RECORD KINDS", []))
    documented_kinds = {s.upper() for s in sections(FORMATS)}
    for kind in SCHEMA_VERSIONS:
        sid = schema_id(kind)
        assert sid.upper() in documented_kinds or sid in planned, (
            f"cart-formats.5: {sid} has neither its own section nor a planned entry")


def test_formats_page_documents_every_chunk_field():
    from cart.chunk import ChunkConfig, Document, chunk_records
    from cart.io import schema_id

    text = "one two three four five six"
    doc = Document("a.txt", text, token_ids=list(range(6)),
                   offsets=[(m.start(), m.end()) for m in re.finditer(r"\S+", text)])
    cfg = ChunkConfig(min_tokens=2, max_tokens=4, num_chunks=1)
    record = next(chunk_records([doc], cfg, {"model": "m", "hash": "h"}))
    section_name = schema_id("chunk").upper()
    assert section_name in sections(FORMATS), f"cart-formats.5 has no .SH {section_name}"
    lines = sections(FORMATS)[section_name]
    documented = tag_words(lines)
    fields = set(record)
    for nested in ("corpus", "tokenizer"):
        fields |= set(record[nested])
    fields |= set(record["sources"][0])
    missing = sorted(f for f in fields if f not in documented)
    assert not missing, f"cart-formats.5: cart.chunk fields not documented: {missing}"
    body = "\n".join(lines)
    for key in record["config"]:
        assert mentions(body, key), f"cart-formats.5: config.{key} not documented"


# -- cart --help stays light -------------------------------------------------------------------
_NO_HEAVY_IMPORTS = """
import sys
from cart.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code in (0, None), f"exit status {{e.code}}"
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print("HEAVY", heavy, file=sys.stderr)
sys.exit(3 if heavy else 0)
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in NAMES],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_torch_or_transformers(argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS.format(argv=argv)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: cart" in result.stdout
    assert "HEAVY []" in result.stderr


# -- rendering ---------------------------------------------------------------------------------
PAGES = sorted(MAN.glob("*.[1-8]"))


def test_man_pages_exist():
    names = {p.name for p in PAGES}
    assert {"cart.1", "cart-formats.5"} <= names, names


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page):
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
