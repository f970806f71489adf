"""A real Dockerfile tokenizer: parser directives, continuations, comments, heredocs, flags, JSON form.

spython reads Dockerfiles as raw physical lines and guesses instructions from the first
word of each line, which is the root of P20, P22, P23, P28, P29 and P30 (docs/conversion.md).
This module follows the Dockerfile reference instead:

* parser directives (``# escape=``, ``# syntax=``) only at the very top;
* a logical line is physical lines joined on the escape character; whole-line comments
  and empty lines inside a continuation are removed (Docker does this before the shell
  sees the command, P22);
* the keyword is case-insensitive (P29) and only the first word of a *logical* line is a
  keyword, so ``from os import path`` inside a continuation stays shell text (P30);
* ``<<EOF`` / ``<<-EOF`` / ``<<"EOF"`` heredocs of RUN/COPY/ADD take the following
  physical lines up to the terminator (P20);
* ``--flag=value`` options are parsed off FROM/RUN/COPY/ADD/HEALTHCHECK (P01a, P04, P21);
* ``["a", "b"]`` is the exec (JSON) form when it parses as a JSON list of strings (P07, P23).

Everything here is pure and raises :class:`hpcexp.errors.ConvertError` with ``file:line``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcexp.errors import ConvertError

MAX_BYTES = 4 * 1024 * 1024  # a Dockerfile larger than this is not a Dockerfile

INSTRUCTIONS = ("ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR")
_INSTRUCTION_SET = frozenset(INSTRUCTIONS)
FLAG_INSTRUCTIONS = ("FROM", "RUN", "COPY", "ADD", "HEALTHCHECK")
HEREDOC_INSTRUCTIONS = ("RUN", "COPY", "ADD")
_DIRECTIVE_RE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
_HEREDOC_RE = re.compile(r"<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_.-]*)\2")
_FLAG_RE = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?$")


# slots make these hot-path records cheaper; dataclass(slots=) exists from Python 3.10 on.
SLOTS: dict = {"slots": True} if sys.version_info >= (3, 10) else {}

@dataclass(**SLOTS)
class Heredoc:
    """One here-document attached to an instruction."""

    name: str          # the terminator word
    body: str          # the text between the instruction line and the terminator (tabs stripped for <<-)
    strip_tabs: bool   # <<- form
    quoted: bool       # <<'EOF' / <<"EOF": no expansion of the body


@dataclass(**SLOTS)
class Instruction:
    """One logical Dockerfile instruction."""

    keyword: str                        # upper-case keyword
    line: int                           # 1-based line of the keyword
    end_line: int                       # last physical line (continuations, heredocs)
    original: str                       # the logical line as written (keyword included, joined)
    args: str                           # text after the keyword and flags (continuations joined)
    flags: tuple[tuple[str, str | None], ...] = ()   # (name, value) in order, e.g. ("from", "builder")
    exec_form: tuple[str, ...] | None = None         # JSON form, when args is a JSON list of strings
    heredocs: tuple[Heredoc, ...] = ()

    def flag(self, name: str) -> str | None:
        """The last value of --name (Docker: the last one wins), or None."""
        value = None
        for k, v in self.flags:
            if k == name:
                value = v if v is not None else ""
        return value


@dataclass
class Dockerfile:
    """A parsed Dockerfile: directives and instructions, in order."""

    path: Path
    label: str
    instructions: list[Instruction] = field(default_factory=list)
    directives: dict[str, str] = field(default_factory=dict)
    escape: str = "\\"


def read_dockerfile(path: Path, label: str | None = None) -> tuple[str, bytes]:
    """Read ``path`` as UTF-8 text; every way that fails is a one-line ConvertError."""
    label = label or str(path)
    try:
        # O_NONBLOCK: a FIFO or device named by mistake must not hang the command
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:  # plain os.read: a buffered file object costs more than reading a Dockerfile (bench_convert)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(st.st_mode):
                raise ConvertError(f"{label} is not a regular file")
            want = min(st.st_size, MAX_BYTES) + 1
            chunks = []
            while want > 0:
                chunk = os.read(fd, want)
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConvertError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConvertError(f"{label} is a directory, not a Dockerfile",
                           hint="give the Dockerfile itself, e.g. --dockerfile DIR/Dockerfile") from None
    except OSError as exc:
        raise ConvertError(f"cannot read {label}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConvertError(f"{label} is larger than {MAX_BYTES // (1024 * 1024)} MiB; that is not a Dockerfile")
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise ConvertError(f"{label}:{line}: contains a NUL byte; that is not a text Dockerfile")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConvertError(f"{label}:{line}: not valid UTF-8 text (byte {data[exc.start]:#04x})") from None
    return text, data


def parse(text: str, path: Path, label: str | None = None) -> Dockerfile:
    """Tokenize Dockerfile ``text`` into instructions (no semantic checks beyond syntax)."""
    label = label or str(path)
    df = Dockerfile(path=path, label=label)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    n = len(lines)
    i = 0
    # -- parser directives: only at the very top, before any comment/blank/instruction --
    while i < n:
        m = _DIRECTIVE_RE.match(lines[i].strip()) if lines[i].lstrip().startswith("#") else None
        if not m:
            break
        key = m.group(1).lower()
        if key in df.directives:  # a repeated directive ends the directive block (Docker: invalid)
            break
        df.directives[key] = m.group(2)
        i += 1
    esc = df.directives.get("escape", "\\")
    if esc not in ("\\", "`"):
        raise ConvertError(f"{label}:{i}: invalid escape directive {esc[:4]!r}: must be \\ or `")
    df.escape = esc

    while i < n:
        raw = lines[i]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i
        parts: list[str] = []
        cur = raw.lstrip()
        if not stripped.endswith(esc):  # one physical line (the usual case): no joining
            parts.append(stripped)
            i += 1
        else:
            while True:
                body = cur.rstrip()
                if body.endswith(esc):
                    parts.append(body[:-1])
                    i += 1
                    # skip comment lines and blank lines inside the continuation (Docker removes them)
                    while i < n and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                        i += 1
                    if i >= n:
                        break
                    cur = lines[i]
                    continue
                parts.append(cur)
                i += 1
                break
        logical = parts[0] if len(parts) == 1 else "".join(parts)
        end = i  # 1-based last line == index i
        word, _, rest = logical.strip().partition(" ")
        if "\t" in word:
            word, _, more = word.partition("\t")
            rest = more + " " + rest
        keyword = word.upper()
        if keyword not in _INSTRUCTION_SET:
            # Quote the word only when it looks like a misspelt instruction: the first line of a
            # file that is no Dockerfile at all (a key, a token) is never echoed back.
            what = f"unknown instruction {word!r}" if re.fullmatch(r"[A-Za-z]{1,20}", word) \
                else "not a Dockerfile instruction (content not shown)"
            raise ConvertError(f"{label}:{start + 1}: {what}",
                               hint=f"Dockerfile instructions are {', '.join(INSTRUCTIONS)}")
        rest = rest.strip()
        flags: list[tuple[str, str | None]] = []
        if keyword in FLAG_INSTRUCTIONS:
            while rest.startswith("--"):
                tok, _, remainder = rest.partition(" ")
                m = _FLAG_RE.match(tok)
                if not m:
                    break
                flags.append((m.group(1).lower(), m.group(2)))
                rest = remainder.lstrip()
        heredocs: list[Heredoc] = []
        if keyword in HEREDOC_INSTRUCTIONS and "<<" in rest and not rest.startswith("["):
            for m in _HEREDOC_RE.finditer(rest):
                name, strip_tabs, quoted = m.group(3), m.group(1) == "-", bool(m.group(2))
                body_lines: list[str] = []
                found = False
                while i < n:
                    line = lines[i]
                    i += 1
                    check = line.lstrip("\t") if strip_tabs else line
                    if check == name:
                        found = True
                        break
                    body_lines.append(line.lstrip("\t") if strip_tabs else line)
                if not found:
                    raise ConvertError(f"{label}:{start + 1}: heredoc <<{name} is never terminated "
                                       f"(no line {name!r} after it)")
                heredocs.append(Heredoc(name=name, body="".join(b + "\n" for b in body_lines),
                                        strip_tabs=strip_tabs, quoted=quoted))
            end = i
        exec_form = None
        if rest.startswith("["):
            try:
                value = json.loads(rest)
            except ValueError:
                value = None
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                exec_form = tuple(value)
        df.instructions.append(Instruction(keyword=keyword, line=start + 1, end_line=end,
                                           original=logical.strip(), args=rest, flags=tuple(flags),
                                           exec_form=exec_form, heredocs=tuple(heredocs)))
    return df


def load(path: Path, label: str | None = None) -> tuple[Dockerfile, bytes]:
    """Read and tokenize a Dockerfile; also return its raw bytes (for the sha256)."""
    text, data = read_dockerfile(path, label)
    return parse(text, path, label), data
