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
from typing import Any, Container

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


# --------------------------------------------------------------------------------------
# Words and variables (Docker's shell-word processing for ENV, ARG, LABEL, COPY, ...)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A variable Docker would take from the base image's environment (unknown to us).

    It is kept as a shell reference (``${NAME}`` or ``${NAME:-word}``) for the runtime.
    """

    name: str
    op: str = ""                      # "", ":-", "-", ":+", "+"
    word: tuple[Any, ...] = ()        # a Value


Value = tuple  # tuple[str | Ref, ...]


_DQ_SPECIAL = re.compile(r'[\\"$`]')


def _esc_dq(s: str) -> str:
    if not _DQ_SPECIAL.search(s):
        return s
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def render_shell(value: Value) -> str:
    """A value as the inside of a double-quoted shell string (refs stay references)."""
    if len(value) == 1 and value[0].__class__ is str:
        return _esc_dq(value[0])
    out = []
    for seg in value:
        if isinstance(seg, Ref):
            out.append("${" + seg.name + seg.op + (render_shell(seg.word) if seg.op else "") + "}")
        else:
            out.append(_esc_dq(seg))
    return "".join(out)


def literal(value: Value) -> str:
    """The text of a value with unknown references replaced by their Docker fallback."""
    if len(value) == 1 and value[0].__class__ is str:  # the usual case: one plain string
        return value[0]
    out = []
    for seg in value:
        if isinstance(seg, Ref):
            if seg.op in (":-", "-"):
                out.append(literal(seg.word))
        else:
            out.append(seg)
    return "".join(out)


def has_refs(value: Value) -> bool:
    for s in value:  # a loop, not any(genexpr): this runs for every word of every instruction
        if s.__class__ is not str:
            return True
    return False


def _join(segs: list) -> Value:
    out: list = []
    for s in segs:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
                continue
        out.append(s)
    return tuple(out)


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_RE = {e: re.compile("[^\\s'\"$" + re.escape(e) + "]+") for e in ("\\", "`")}


class WordProcessor:
    """Docker's word processing: quotes, escapes and $VAR / ${VAR} / ${VAR:-d} / ${VAR:+a}.

    ``known`` maps names to values (tuples of str/Ref); names not in it are either unknown
    (kept as :class:`Ref`, as Docker would read them from the base image) or, if listed in
    ``unset``, declared without a value (expand to nothing, like Docker).
    """

    def __init__(self, known: dict[str, Value], escape: str = "\\", unset: Container[str] = frozenset(),
                 closed: bool = False):
        self.known = known
        self.esc = escape
        self.unset = unset
        self.closed = closed          # no base image environment here (global scope): unknown = unset
        self.unknown_used: list[str] = []
        self.unset_used: list[str] = []

    def words(self, text: str) -> list[Value]:
        """Split ``text`` into words on unquoted whitespace, expanding variables."""
        self.unknown_used, self.unset_used = [], []
        return self._process(text, split=True)

    def word(self, text: str) -> Value:
        """``text`` as one word (no splitting; quotes still removed)."""
        self.unknown_used, self.unset_used = [], []
        res = self._process(text, split=False)
        return res[0] if res else ()

    def expand(self, text: str) -> Value:
        """Variables only (heredoc bodies): quotes stay, ``\\$`` is a literal ``$``."""
        self.unknown_used, self.unset_used = [], []
        out: list = []
        i, n = 0, len(text)
        while i < n:
            j = text.find("$", i)
            if j < 0:
                out.append(text[i:])
                break
            if j > i and text[j - 1] == self.esc:
                out.append(text[i:j - 1] + "$")
                i = j + 1
                continue
            out.append(text[i:j])
            segs, i = self._dollar(text, j)
            out.extend(segs)
        return _join(out)

    def _lookup(self, name: str) -> Value | None:
        if name in self.known:
            return self.known[name]
        if name in self.unset:
            self.unset_used.append(name)
            return None
        if self.closed:
            self.unknown_used.append(name)
            return None
        return (Ref(name),)

    def _process(self, text: str, split: bool) -> list[Value]:
        if "$" not in text and "'" not in text and '"' not in text and self.esc not in text:
            if split:
                return [(w,) for w in text.replace("\t", " ").replace("\n", " ").split(" ") if w]
            return [(text,) if text else ()]
        words: list[Value] = []
        cur: list = []
        started = False
        i, n = 0, len(text)
        quote = None
        esc = self.esc
        plain = _PLAIN_RE[esc]
        while i < n:
            m = plain.match(text, i)
            if m and quote is None:
                cur.append(m.group(0))
                started = True
                i = m.end()
                continue
            c = text[i]
            if quote == "'":
                if c == "'":
                    quote = None
                else:
                    cur.append(c)
                i += 1
                continue
            if c == esc and i + 1 < n:
                nxt = text[i + 1]
                if quote == '"' and nxt not in ('"', esc, "$"):
                    cur.append(c)
                cur.append(nxt)
                started = True
                i += 2
                continue
            if quote is None and c in ("'", '"'):
                quote = c
                started = True
                i += 1
                continue
            if quote == '"' and c == '"':
                quote = None
                i += 1
                continue
            if c == "$":
                segs, i = self._dollar(text, i)
                cur.extend(segs)
                started = True
                continue
            if split and quote is None and c in " \t\n":
                if started:
                    words.append(_join(cur))
                cur, started = [], False
                i += 1
                continue
            cur.append(c)
            started = True
            i += 1
        if quote is not None:
            raise ValueError(f"unterminated {quote} quote")
        if started or not split:
            words.append(_join(cur))
        return words

    def _dollar(self, text: str, i: int) -> tuple[list, int]:
        n = len(text)
        if i + 1 >= n:
            return ["$"], i + 1
        if text[i + 1] == "{":
            depth, j = 1, i + 2
            while j < n and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise ValueError("missing '}' in ${...}")
            inner = text[i + 2:j - 1]
            m = _NAME_RE.match(inner)
            if not m:
                raise ValueError(f"bad substitution ${{{inner}}}")
            name, rest = m.group(0), inner[m.end():]
            if not rest:
                val = self._lookup(name)
                return list(val or ()), j
            op = next((o for o in (":-", ":+", "-", "+") if rest.startswith(o)), None)
            if op is None:
                raise ValueError(f"unsupported substitution ${{{inner}}} (Docker supports :- and :+)")
            sub = WordProcessor(self.known, self.esc, self.unset, self.closed)
            word = sub.word(rest[len(op):])
            self.unknown_used.extend(sub.unknown_used)
            self.unset_used.extend(sub.unset_used)
            val = self._lookup(name)
            if val is not None and len(val) == 1 and isinstance(val[0], Ref) and val[0].name == name:
                self.unknown_used.append(name)
                return [Ref(name, op, word)], j
            is_set = val is not None
            non_empty = bool(val) and val != ("",)
            if op == ":-":
                return list(val if non_empty and val is not None else word), j
            if op == "-":
                return list(val if val is not None else word), j
            if op == ":+":
                return list(word if non_empty else ()), j
            return list(word if is_set else ()), j
        m = _NAME_RE.match(text, i + 1)
        if not m:
            return ["$"], i + 1
        name = m.group(0)
        val = self._lookup(name)
        if val is not None and len(val) == 1 and isinstance(val[0], Ref):
            self.unknown_used.append(name)
        return list(val or ()), m.end()


def split_key_values(text: str, escape: str = "\\") -> list[tuple[str, str]]:
    """Split ``K=V K2="v 2"`` into raw (key, value-text) pairs without expanding anything.

    Values keep their quotes; :class:`WordProcessor` removes them while expanding.
    """
    pairs = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        j = i
        quote = None
        while j < n:
            c = text[j]
            if quote:
                if c == escape and quote == '"' and j + 1 < n:
                    j += 2
                    continue
                if c == quote:
                    quote = None
            elif c == escape and j + 1 < n:
                j += 2
                continue
            elif c in "'\"":
                quote = c
            elif c in " \t":
                break
            j += 1
        if quote:
            raise ValueError(f"unterminated {quote} quote")
        token = text[i:j]
        key, eq, value = token.partition("=")
        if not eq:
            raise ValueError(f"{token!r} is not KEY=VALUE")
        pairs.append((key, value))
        i = j
    return pairs
