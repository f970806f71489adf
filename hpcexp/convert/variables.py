"""ARG, ENV, LABEL and MAINTAINER: the instructions that set variables and labels.

A mixin of :class:`hpcexp.convert.interpret.Interpreter` (it uses the interpreter's word
expansion, notes and current stage), split out because Docker's variable rules (ARG scope
and precedence, ENV lines whose values refer to each other, the legacy ``KEY value`` form,
spython's ``parse_env`` checked against our tokenizer) are a topic of their own. It fills
the stage's ``env``/``args``, its ``%environment`` and ``%labels``, and ``export`` steps.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hpcexp.convert import model as m
from hpcexp.convert import words
from hpcexp.convert.bridge import _spython, _spython_mod
from hpcexp.convert.words import literal, render_shell, split_key_values

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.convert.dockerfile import Instruction
    from hpcexp.convert.words import Value

_ARG_COMMENT = re.compile(r"(^|\s)#")
VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SPACES = re.compile(r"\s+")
_LEGACY_SPLIT = re.compile(r"[\t\v\f\r ]+")
_SIMPLE_PAIRS = re.compile(r"""\s*(?:[A-Za-z_][A-Za-z0-9_.-]*=(?:"[^"\\`]*"|'[^'\\`]*'|[^\s"'\\`]+)(?:\s+|$))+""")


class Variables:
    """ARG/ENV/LABEL/MAINTAINER handlers of the interpreter (see the module docstring)."""

    # -- ARG --------------------------------------------------------------------------
    def do_arg(self, ins: "Instruction") -> None:
        text = ins.args
        comment = _ARG_COMMENT.search(text)
        if comment:
            self.note(ins, "ARG with # comment", "approximated",
                      "text after '#' was ignored (Docker has no trailing comments; it would declare more ARGs)",
                      "P12")
            text = text[:comment.start()]
        if not text.strip():
            raise self.fail(ins, "needs a name")
        global_scope = self.cur is None
        for tok in _split_unquoted(text):
            name, eq, default = tok.partition("=")
            if not VAR_NAME.match(name):
                raise self.fail(ins, f"invalid ARG name {name[:40]!r}")
            wp = self.processor(global_scope)
            value: tuple | None
            if name in self.cli_args:
                value = (self.cli_args[name],)
            elif eq:
                try:
                    value = wp.word(default)
                except ValueError as exc:
                    raise self.fail(ins, str(exc)) from None
            elif not global_scope and name in self.global_args:
                value = self.global_args[name]
            else:
                value = None
            if global_scope:
                if value is None:
                    self.global_unset.add(name)
                    self.global_args.pop(name, None)
                else:
                    self.global_args[name] = value
                    self.global_unset.discard(name)
            else:
                st = self.cur
                assert st is not None
                self._wp = None
                if value is None:
                    st.arg_unset.add(name)
                    st.args.pop(name, None)
                else:
                    st.args[name] = value
                    st.arg_unset.discard(name)
                    if name not in st.env:
                        self.emit(m.Export(((name, render_shell(value)),)))
            if value is not None:
                self.used_args[name] = literal(value)

    # -- ENV --------------------------------------------------------------------------
    def env_pairs(self, ins: "Instruction", keyword: str) -> list[tuple[str, str]]:
        """Raw (key, value-text) pairs; spython's parse_env first, our tokenizer when they disagree."""
        text = ins.args
        tokens = _split_unquoted(text)
        first = tokens[0] if tokens else ""
        if "=" not in first:
            # Docker's legacy one-pair form (its parser's "old format"): the key is the text up to
            # the first run of whitespace, the value is ALL the rest of the line, taken as one word
            # (quotes removed, variables expanded, inner spaces kept): `LABEL version = "2.0"` is
            # the label `version` with the value `= 2.0`.
            parts = _LEGACY_SPLIT.split(text.strip(), maxsplit=1)
            if len(parts) < 2 or not parts[1]:
                raise self.fail(ins, f"{parts[0][:40]!r} needs a value (KEY=VALUE, or the legacy KEY VALUE)")
            key, rest = parts
            self.note(ins, f"{keyword} KEY value (legacy form)", "translated",
                      "the whole rest of the line is the value, as in Docker", "P10")
            return [(key, rest)]
        if _SIMPLE_PAIRS.fullmatch(text):
            # plain KEY=VALUE / KEY="quoted value" pairs: spython's parse_env splits these right
            spy = _spython_mod()
            theirs = _spython(self.label, ins.line, keyword, spy["parser"].parse_env, text)
            return [tuple(item.split("=", 1)) for item in theirs]  # type: ignore[misc]
        # escapes, quoted keys, quotes inside words: spython splits these wrongly or crashes (P10, P26)
        try:
            return split_key_values(text, self.df.escape)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None

    def do_env(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        pairs = self.env_pairs(ins, "ENV")
        # Docker expands every value of one ENV line against the environment from BEFORE the
        # line: `ENV A=2 B=$A` gives B the previous A, not 2
        wp = self.processor()
        values = []
        for key, raw in pairs:
            if not VAR_NAME.match(key):
                raise self.fail(ins, f"invalid variable name {key[:40]!r}")
            try:
                values.append((key, wp.word(raw)))
            except ValueError as exc:
                raise self.fail(ins, str(exc)) from None
            self.global_only_note(ins, wp)
        if len(pairs) > 1 and _refers_to_each_other(pairs):
            self.note(ins, "ENV with several pairs", "translated", "each value refers to the variables as they "
                      "were before this line, as in Docker", "P11")
        together = False
        if len(values) > 1:
            keys = {k for k, _ in values}
            together = any(isinstance(seg, words.Ref) and seg.name in keys for _, v in values for seg in v)
        for key, value in values:
            st.env[key] = value
            self._wp = None
            shown = render_shell(value)
            if not together:
                self.emit(m.Export(((key, shown),)))
                st.environment.append((key, shown))
        if together:  # one export: the shell expands all its words before assigning any (Docker's rule)
            self.emit(m.Export(tuple((k, render_shell(v)) for k, v in values)))
            # %environment is one export per line: a variable is set only after every value that
            # refers to its previous value (`A=2 B=$A`: B first)
            st.environment.extend((k, render_shell(v)) for k, v in _referrers_first(values))

    # -- LABEL / MAINTAINER -----------------------------------------------------------
    def do_label(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        for key, raw in self.env_pairs(ins, "LABEL"):
            wp = self.processor()
            try:
                k = literal(wp.word(key))
                v = literal(wp.word(raw))
            except ValueError as exc:
                raise self.fail(ins, str(exc)) from None
            clean_k = _SPACES.sub("_", k)
            if clean_k != k:
                self.note(ins, "LABEL", "approximated", f"label name {k!r} written as {clean_k!r} "
                          "(Apptainer label names end at the first space)", "P26")
            st.labels.append((clean_k, " ".join(v.split())))

    def do_maintainer(self, ins: "Instruction") -> None:
        assert self.cur is not None
        self.cur.labels.append(("maintainer", " ".join(ins.args.split())))
        self.note(ins, "MAINTAINER", "translated", "written as the label 'maintainer'")


def _split_unquoted(text: str) -> list[str]:
    if "'" not in text and '"' not in text:
        return text.split()
    out, cur, quote = [], [], None
    for c in text:
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c in " \t":
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


def _referrers_first(values: list[tuple[str, "Value"]]) -> list[tuple[str, "Value"]]:
    """Order ``values`` so that each key comes after the values referring to it (cycles keep line order)."""
    todo = list(values)
    out: list[tuple[str, Value]] = []
    while todo:
        for i, (key, _) in enumerate(todo):
            if not any(isinstance(seg, words.Ref) and seg.name == key for k, v in todo if k != key for seg in v):
                out.append(todo.pop(i))
                break
        else:
            out.extend(todo)
            break
    return out


def _refers_to_each_other(pairs: list[tuple[str, str]]) -> bool:
    """Does a value of ``K1=V1 K2=V2`` name one of the line's own keys ($K or ${K})?"""
    raws = [raw for _, raw in pairs if "$" in raw]
    for key, _ in pairs:
        for raw in raws:
            if "$" + key in raw or "${" + key in raw:
                if re.search(r"\$\{?" + key + r"(?![A-Za-z0-9_])", raw):
                    return True
    return False
