"""The interpreter: Dockerfile instructions -> the recipe model (:mod:`hpcexp.convert.model`).

Each instruction is read with Docker's semantics: ARGs are resolved at conversion time
(Dockerfile default < hpcexp.yaml ``build_args`` < ``--build-arg``) into literal values,
because ``%arguments``/``{{ }}`` need Apptainer >= 1.2 and recipes must build on Apptainer
1.1 and SingularityCE 3.9; ENV is exported in ``%post`` where it appears and kept for
``%environment``; COPY/ADD stage their sources through ``%files`` and are moved into place
in ``%post`` at their original position (P06); RUN keeps Docker's ``sh -c`` semantics.
What an instruction means is decided here, and recorded as a fidelity :class:`Note`; how
it is spelled (quoting, here-documents, section syntax) is the writer's business.

This module has the driver, the scope of words and paths, FROM (stages and their bases),
RUN, and the stage pruning; the other instructions are mixins of :class:`Interpreter`, one
module per topic, to keep each readable: :mod:`~hpcexp.convert.variables` (ARG, ENV,
LABEL), :mod:`~hpcexp.convert.staging` (COPY, ADD, RUN --mount: files staged through
``%files``) and :mod:`~hpcexp.convert.imageconfig` (WORKDIR, USER, SHELL, CMD,
ENTRYPOINT and the rest of the image config).
:class:`Interpreter` itself is about 300 lines: the scope helpers every handler shares
(words, paths, notes) belong with the driver that owns the scope.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Mapping

from hpcexp.convert import dockerfile as dfmod
from hpcexp.convert import model as m
from hpcexp.convert.context import BuildContext
from hpcexp.convert.dockerfile import Dockerfile, Instruction
from hpcexp.convert.imageconfig import ImageConfig
from hpcexp.convert.model import REF as _REF
from hpcexp.convert.model import BaseResolution, BaseResolver, Stage
from hpcexp.convert.report import Note
from hpcexp.convert.staging import Copying
from hpcexp.convert.variables import Variables
from hpcexp.convert.words import Value, WordProcessor, has_refs, literal, render_shell
from hpcexp.errors import ConvertError

_STAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BAD_REF = re.compile(r"[\s\x00-\x1f\x7f]")


# instruction -> handler method (the lexer admits only these keywords)
_HANDLERS = {kw: "do_" + kw.lower() for kw in dfmod.INSTRUCTIONS}


class Interpreter(Variables, Copying, ImageConfig):
    """Reads a Dockerfile's instructions in order and fills the stages of the recipe model."""

    def __init__(self, df: "Dockerfile", context: Path, arch: str, build_args: Mapping[str, str],
                 resolve_base: BaseResolver | None, label: str) -> None:
        self.df = df
        self.ctx_root = context
        self.ctx: BuildContext | None = None
        self.arch = arch
        self.cli_args = dict(build_args)
        self.resolve_base = resolve_base
        self.label = label
        self.notes: list[Note] = []
        self.stages: list[Stage] = []
        self.ext: dict[str, Stage] = {}
        self.global_args: dict[str, tuple] = {
            "TARGETPLATFORM": (f"linux/{arch}",), "TARGETOS": ("linux",), "TARGETARCH": (arch,),
            "TARGETVARIANT": ("",), "BUILDPLATFORM": (f"linux/{arch}",), "BUILDOS": ("linux",),
            "BUILDARCH": (arch,), "BUILDVARIANT": ("",),
        }
        self.global_unset: set[str] = set()
        self.used_args: dict[str, str] = {}
        self.context_files: set[str] = set()
        self.base_refs: list[str] = []
        self.cur: Stage | None = None
        self._wp: WordProcessor | None = None     # the stage's word processor; reset when ARG/ENV change
        self.base_env: dict[str, str] = {}        # environment of the last base resolved (local SIF)

    # -- helpers ----------------------------------------------------------------------
    def note(self, ins: "Instruction | None", construct: str, action: str, reason: str,
             code: str | None = None) -> None:
        if _REF in construct or _REF in reason:  # a base-image variable inside a path: show it as ${NAME}
            construct, reason = construct.replace(_REF, ""), reason.replace(_REF, "")
        self.notes.append(Note(ins.line if ins else 0, construct, action, reason, code))

    def fail(self, ins: "Instruction", msg: str, hint: str | None = None) -> ConvertError:
        return ConvertError(f"{self.label}:{ins.line}: {ins.keyword}: {msg}", hint=hint)

    def context(self) -> BuildContext:
        if self.ctx is None:
            if not os.path.isdir(self.ctx_root):
                raise ConvertError(f"build context {self.ctx_root} is not a folder")
            self.ctx = BuildContext(self.ctx_root, self.df.path)
        return self.ctx

    def words(self, ins: "Instruction", text: str) -> list["Value"]:
        wp = self.processor()
        try:
            out = wp.words(text)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None
        self.global_only_note(ins, wp)
        return out

    def processor(self, global_scope: bool = False):
        if global_scope or self.cur is None:
            return WordProcessor(self.global_args, self.df.escape, self.global_unset, closed=True)
        if self._wp is not None:
            return self._wp
        st = self.cur
        known = {**st.args, **st.env} if st.args else st.env
        # a global ARG used in a stage without `ARG NAME` expands to nothing, as in Docker
        self._wp = WordProcessor(known, self.df.escape, _Unset(st.arg_unset, self.global_args))
        return self._wp

    def global_only_note(self, ins: "Instruction", wp: Any) -> None:
        st = self.cur
        for name in dict.fromkeys(wp.unset_used):
            if st is not None and name in self.global_args and name not in st.args and name not in st.env \
                    and name not in st.arg_unset:
                self.note(ins, f"${name}", "translated", f"{name} is a global ARG not declared in this stage, so it "
                          f"expands to nothing, as in Docker (add `ARG {name}` after FROM to use it)", "P02")

    def path_value(self, ins: "Instruction", value: "Value", what: str, shell: bool = False) -> str:
        """A path as text. A variable the base image may define (unknown here) is taken as unset
        for sources; for destinations and WORKDIR (``shell``) it is left to the shell at build and
        run time: the path then holds the reference between two NULs, see :func:`hpcexp.convert.writer.q`."""
        if has_refs(value):
            names = sorted({s.name for s in value if not isinstance(s, str)})
            if shell:
                self.note(ins, f"{ins.keyword} {what}", "approximated",
                          f"${', $'.join(names)} is not set by this Dockerfile, so Docker would take it from the "
                          "base image's environment; the recipe leaves it to the shell at build and run time "
                          "(the base image's environment plus Apptainer's: HOME is /root during the build and "
                          "the invoking user's home at run time)", "P33")
                return "".join(s if isinstance(s, str) else _REF + render_shell((s,)) + _REF for s in value)
            self.note(ins, f"{ins.keyword} {what}", "approximated",
                      f"${', $'.join(names)} comes from the base image, unknown at conversion time; "
                      "taken as unset", "P05")
        return literal(value)

    def abspath(self, path: str) -> str:
        assert self.cur is not None
        if not path.startswith(("/", _REF)):
            path = posixpath.join(self.cur.workdir, path)
        norm = posixpath.normpath(path)
        return "/" if norm in ("/", "//") else norm.replace("//", "/")

    def emit(self, *steps: m.Step) -> None:
        assert self.cur is not None
        self.cur.post.extend(steps)

    def chdir(self) -> str | None:
        """The folder a RUN step must first change to (WORKDIR changed since the last step), or None."""
        st = self.cur
        assert st is not None
        if st.workdir_set and st.cwd_emitted != st.workdir:
            st.cwd_emitted = st.workdir
            return st.workdir
        return None

    # -- driver -----------------------------------------------------------------------
    def run(self) -> None:
        if not self.df.instructions:
            raise ConvertError(f"{self.label}: no instructions (empty Dockerfile); it needs a FROM line")
        if "escape" in self.df.directives and self.df.escape != "\\":
            self.note(None, "# escape=`", "translated", "continuation lines use ` as Docker does", "P28")
        for ins in self.df.instructions:
            handler = getattr(self, _HANDLERS[ins.keyword])
            if self.cur is None and ins.keyword not in ("FROM", "ARG"):
                raise self.fail(ins, "comes before the first FROM", hint="every Dockerfile starts with FROM "
                                "(only ARG may come before it)")
            try:
                handler(ins)
            except ValueError as exc:  # quoting/substitution errors from the word processor
                raise self.fail(ins, str(exc)) from None
        if not self.stages:
            raise ConvertError(f"{self.label}: no FROM instruction; a Dockerfile must start from an image")

    # -- FROM -------------------------------------------------------------------------
    def do_from(self, ins: "Instruction") -> None:
        wp = self.processor(global_scope=True)
        try:
            words = wp.words(ins.args)
        except ValueError as exc:
            raise self.fail(ins, str(exc)) from None
        if len(words) not in (1, 3) or (len(words) == 3 and literal(words[1]).lower() != "as"):
            raise self.fail(ins, f"expected 'FROM image [AS name]', got {ins.args[:80]!r}")
        ref = literal(words[0])
        if not ref or has_refs(words[0]) or ref.endswith((":", "/", "@")) or "::" in ref or ref.startswith(":"):
            missing = ", ".join(f"${n}" for n in dict.fromkeys(wp.unknown_used))
            raise self.fail(ins, f"the image reference {ins.args.split()[0]!r} expands to {ref!r}"
                            + (f" ({missing} is not a global ARG)" if missing else ""),
                            hint="declare ARG NAME=value before the first FROM, or pass --build-arg NAME=value")
        if ref != ins.args.split()[0]:
            self.note(ins, "FROM with ARG", "translated", f"image reference resolved at conversion time to {ref}",
                      "P01")
        if _BAD_REF.search(ref):
            raise self.fail(ins, f"the image reference {ref[:80]!r} contains spaces or control characters")
        alias = literal(words[2]).lower() if len(words) == 3 else None
        platform = ins.flag("platform")
        if platform is not None:
            pval = literal(wp.word(platform)) if platform else ""
            same = pval.endswith("/" + self.arch) or not pval
            self.note(ins, "FROM --platform", "translated" if same else "approximated",
                      f"--platform={pval} dropped; the architecture is chosen by hpcexp (--arch {self.arch})"
                      + ("" if same else f", not {pval}"), "P01")
        for fl, _ in ins.flags:
            if fl != "platform":
                self.note(ins, f"FROM --{fl}", "dropped", "unknown FROM option", "P01")
        index = len(self.stages)
        name = alias if alias and _STAGE_NAME_RE.match(alias) else f"stage{index}"
        taken = {s.name for s in self.stages} | set(self.ext)
        while name in taken:
            name += "_"
        parent = self.find_stage(ref.lower()) if "/" not in ref and ":" not in ref else None
        if parent is not None:
            st = copy.copy(parent)
            st.files, st.post = list(parent.files), list(parent.post)
            st.environment, st.labels, st.env = list(parent.environment), list(parent.labels), dict(parent.env)
            st.ctx_files, st.ext_before = set(parent.ctx_files), list(parent.ext_before)
            st.index, st.name, st.alias, st.line = index, name, alias, ins.line
            for k in st.args:
                if k not in st.env:
                    st.post.append(m.Unset(k))
            st.args, st.arg_unset, st.cmd_set = {}, set(), False
            self.note(ins, f"FROM {ref}", "translated",
                      f"Apptainer cannot base a stage on another stage; the steps of stage {parent.name!r} "
                      "are repeated in this one", "P02")
        else:
            st = Stage(index=index, name=name, alias=alias, line=ins.line)
            self.base_env = {}
            st.base = self.base_header(ins, ref)
            if ref != "scratch":
                st.base_ref = ref
            if self.base_env:
                st.env = {k: (v,) for k, v in self.base_env.items()}
                st.base_env = dict(self.base_env)
                self.note(ins, f"FROM {ref}", "translated", f"the base image's environment is read from the image "
                          f"({len(self.base_env)} variables): $VAR references to it expand as in Docker", "P33")
        if alias is None and index > 0:
            self.note(ins, "FROM (unnamed stage)", "translated", f"stage {index} is named {name!r}", "P02")
        self.stages.append(st)
        self.cur = st
        self._wp = None

    def find_stage(self, ref: str) -> Stage | None:
        for st in self.stages:
            if st.alias == ref:
                return st
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None

    def base_header(self, ins: "Instruction | None", ref: str) -> BaseResolution:
        """What ``FROM ref`` bootstraps from (the project's base map, else the docker reference)."""
        if ref == "scratch":
            if ins is not None:
                self.note(ins, "FROM scratch", "translated", "Bootstrap: scratch (an empty image)", "P01")
            return m.SCRATCH
        if ref not in self.base_refs:
            self.base_refs.append(ref)
        res = self.resolve_base(ref) if self.resolve_base else None
        self.base_env = dict(res.environment) if res is not None else {}
        if res is None:
            return BaseResolution("docker", ref)
        if ins is not None and res.notes:
            for action, reason in res.notes:
                self.note(ins, f"FROM {ref}", action, reason)
        elif ins is not None:
            self.note(ins, f"FROM {ref}", "translated",
                      f"base image taken from the project's base map: Bootstrap: {res.bootstrap}"
                      + (f", From: {res.source}" if res.source else ""))
        return res

    # -- RUN --------------------------------------------------------------------------
    def shell_command(self, text: str) -> m.Shell:
        """``text`` run like Docker's ``SHELL + [text]``, as the stage's USER."""
        st = self.cur
        assert st is not None
        return m.Shell(text, st.shell, st.run_as)

    def do_run(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        before: list[m.Action] = []
        after: list[m.Action] = []
        for fl, val in ins.flags:
            if fl == "mount":
                b, a = self.run_mount(ins, val or "")
                before += b
                after += a
            elif fl == "network":
                self.note(ins, f"RUN --network={val}", "dropped",
                          "Apptainer builds use the host network; the step runs with network access")
            elif fl == "security":
                self.note(ins, f"RUN --security={val}", "dropped", "not available in Apptainer builds")
            else:
                self.note(ins, f"RUN --{fl}", "dropped", "unknown RUN option")
        body: m.Action
        if ins.exec_form is not None:
            if not ins.exec_form:
                raise self.fail(ins, "the exec form [] is empty")
            body = m.Exec(tuple(ins.exec_form), st.run_as)
            self.note(ins, "RUN [exec form]", "translated", "the argument list is run without a shell, "
                      "each argument quoted", "P23")
        elif ins.heredocs:
            cmd = ins.args
            hd = ins.heredocs
            only = re.fullmatch(r"\s*<<-?(['\"]?)" + re.escape(hd[0].name) + r"\1\s*", cmd)
            if only and len(hd) == 1:
                script = hd[0].body
                if script.startswith("#!"):
                    interp = script.split("\n", 1)[0][2:].strip()
                    st.stage_no += 1
                    body = m.Script(f"{m.STAGING}/run/{st.stage_no}", script, interp, st.shell, st.run_as)
                else:
                    body = self.shell_command(script)
            else:
                text = cmd + "\n" + "".join(h.body + h.name + "\n" for h in hd)
                body = self.shell_command(text)
            self.note(ins, "RUN <<heredoc", "translated", "the here-document body is run as the step's script",
                      "P20")
        else:
            if not ins.args.strip():
                raise self.fail(ins, "has no command")
            body = self.shell_command(ins.args)
        self.emit(m.Block(ins.line, "RUN", (*before, body, *after), self.chdir()))

    # -- rendering --------------------------------------------------------------------
    def prune(self) -> None:
        """Keep the stages the final image needs (as BuildKit does): Apptainer builds every stage
        it is given, and a stage merged into its child or never copied from is wasted work."""
        needed = {self.stages[-1].name}
        by_name = {s.name: s for s in self.stages}
        todo = [self.stages[-1]]
        while todo:
            st = todo.pop()
            for frm, _, _ in st.files:
                if frm in by_name and frm not in needed:
                    needed.add(frm)
                    todo.append(by_name[frm])
        for st in self.stages:
            if st.name not in needed:
                self.notes.append(Note(st.line, f"stage {st.name}", "translated",
                                       "not used by the final image, so it is left out (Docker BuildKit skips "
                                       "it too)", "P02"))
        self.stages = [s for s in self.stages if s.name in needed]
        ext_by_name = {e.name: e for e in self.ext.values()}
        refs: list[str] = []
        for st in self.stages:
            for name in st.ext_before:
                ref = ext_by_name[name].base_ref
                if ref and ref not in refs:
                    refs.append(ref)
            if st.base_ref and st.base_ref not in refs:
                refs.append(st.base_ref)
            self.context_files.update(st.ctx_files)
        self.base_refs = refs

    def recipe(self, sha: str) -> m.Recipe:
        """The model the writer renders (after :meth:`prune`)."""
        return m.Recipe(self.label, sha, self.arch, self.stages, list(self.ext.values()))


class _Unset:
    """Names that expand to nothing in a stage: declared ARGs without value, and global ARGs."""

    __slots__ = ("a", "b")

    def __init__(self, a: set[str], b: dict[str, tuple]) -> None:
        self.a, self.b = a, b

    def __contains__(self, name: object) -> bool:
        return name in self.a or name in self.b
