"""Docker's shell-word processing for ENV, ARG, LABEL, COPY, WORKDIR, USER...: quotes,
escapes and ``$VAR`` / ``${VAR:-word}`` expansion, as the Dockerfile reference defines them.

A value is a sequence of literal text and :class:`Ref` (a variable Docker would take from
the base image's environment, unknown at conversion time), so the writer can render it as
shell that expands the variable at build time instead of guessing. Pure; errors are
:class:`hpcexp.errors.ConvertError` with ``file:line``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container


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


def esc_dq(s: str) -> str:
    if not _DQ_SPECIAL.search(s):
        return s
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def render_shell(value: Value) -> str:
    """A value as the inside of a double-quoted shell string (refs stay references)."""
    if len(value) == 1 and value[0].__class__ is str:
        return esc_dq(value[0])
    out = []
    for seg in value:
        if isinstance(seg, Ref):
            out.append("${" + seg.name + seg.op + (render_shell(seg.word) if seg.op else "") + "}")
        else:
            out.append(esc_dq(seg))
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
