"""WORKDIR, USER, SHELL, VOLUME, EXPOSE, STOPSIGNAL, HEALTHCHECK, ONBUILD, CMD and ENTRYPOINT.

A mixin of :class:`hpcexp.convert.interpret.Interpreter`: the instructions that make the
image config (working folder, user, shell, stop signal, the command) rather than its
files, and the notes that say how the final stage's CMD/ENTRYPOINT became the
``%runscript`` (which the writer renders from the stage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcexp.convert import model as m
from hpcexp.convert.model import REF as _REF
from hpcexp.convert.report import Note
from hpcexp.convert.words import literal

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.convert.dockerfile import Instruction


class ImageConfig:
    """Image-config handlers of the interpreter (see the module docstring)."""

    # -- WORKDIR / USER / SHELL / VOLUME ... ------------------------------------------
    def do_workdir(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        words = self.words(ins, ins.args)
        if len(words) != 1:
            raise self.fail(ins, "expects one path")
        raw = self.path_value(ins, words[0], "path", shell=True)
        if not raw:
            raise self.fail(ins, "expands to an empty path")
        st.workdir = self.abspath(raw)
        st.workdir_set = True
        if not raw.startswith(("/", _REF)) or (_REF not in raw and raw != ins.args.strip()):
            self.note(ins, "WORKDIR", "translated", f"resolved to the absolute path {st.workdir}", "P14")
        self.emit(m.Mkdir(st.workdir))

    def do_user(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        words = self.words(ins, ins.args) if ins.args.strip() else []
        if len(words) != 1:
            raise self.fail(ins, "expects one user, e.g. USER app or USER 1000:1000")
        user = self.path_value(ins, words[0], "user", shell=True)
        shown = user.replace(_REF, "")
        if user.split(":")[0] in ("root", "0"):
            st.run_as = None
            self.note(ins, f"USER {shown}", "translated", "later RUN steps run as root, as in Docker")
            return
        st.run_as = user
        st.uses_as = True
        self.note(ins, f"USER {shown}", "approximated",
                  f"later RUN steps run as {shown} during the build, as in Docker, when the build can switch "
                  "users (setpriv in the image and subordinate ids for the build; otherwise as root, with a "
                  "warning in the build log); the container itself runs as whoever starts it", "P13")

    def do_shell(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        if not ins.exec_form:
            raise self.fail(ins, 'must be a JSON list, e.g. SHELL ["/bin/bash", "-c"]')
        st.shell = tuple(ins.exec_form)
        self.note(ins, "SHELL " + " ".join(ins.exec_form), "translated",
                  "later RUN steps and shell-form CMD/ENTRYPOINT run through this shell", "P19")

    def do_volume(self, ins: "Instruction") -> None:
        paths = list(ins.exec_form) if ins.exec_form is not None else [literal(w) for w in self.words(ins, ins.args)]
        for p in paths:
            ap = self.abspath(p)
            self.emit(m.Mkdir(ap))
            self.note(ins, f"VOLUME {ap}", "approximated", "the folder is created, but the image is read-only: "
                      "bind a host folder there (binds:) or run with --writable-tmpfs", "P27")

    def do_expose(self, ins: "Instruction") -> None:
        self.note(ins, f"EXPOSE {ins.args.strip()}", "dropped",
                  "Apptainer shares the host network; ports need no exposing", "P27")

    def do_stopsignal(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        raw = literal(self.processor().word(ins.args.strip())) if ins.args.strip() else ""
        name = _signal_name(raw)
        if name is None:
            raise self.fail(ins, f"{raw[:40]!r} is not a signal (use a name like SIGINT, or a number)")
        st.stopsignal = name
        self.note(ins, f"STOPSIGNAL {raw}", "translated", "Apptainer has no stop signal setting; it is recorded in "
                  f"the fidelity report and the image's sidecar, and `hpcexp stop` of a local run sends {name} "
                  "first (then SIGKILL after the grace period), as `docker stop` does", "P27")

    def do_healthcheck(self, ins: "Instruction") -> None:
        if ins.args.strip().upper() == "NONE":
            self.note(ins, "HEALTHCHECK NONE", "translated", "nothing to do")
            return
        self.note(ins, "HEALTHCHECK", "dropped", "Apptainer has no health checks and %test runs at build time, "
                  "where a service probe would fail", "P24")

    def do_onbuild(self, ins: "Instruction") -> None:
        self.note(ins, "ONBUILD", "dropped", "Apptainer images have no build triggers", "P25")

    # -- CMD / ENTRYPOINT -------------------------------------------------------------
    def do_cmd(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        st.cmd = self.command_value(ins)
        st.cmd_set = True
        st.runscript_line = ins.line

    def do_entrypoint(self, ins: "Instruction") -> None:
        st = self.cur
        assert st is not None
        value = self.command_value(ins)
        st.entrypoint = value or None
        st.entrypoint_shell = ins.exec_form is None and bool(value)
        if not st.cmd_set:
            st.cmd = None
        st.runscript_line = ins.line
        if ins.exec_form is None and value:
            self.note(ins, "ENTRYPOINT (shell form)", "translated",
                      "runs through the shell; CMD and run arguments are ignored, as in Docker", "P17")

    def command_value(self, ins: "Instruction") -> tuple[str, ...]:
        st = self.cur
        assert st is not None
        if ins.exec_form is not None:
            return tuple(ins.exec_form)
        text = ins.args.strip()
        if not text:
            return ()
        return (*st.shell, text)

    def finish_notes(self) -> None:
        last = self.stages[-1]
        line = last.runscript_line
        if last.entrypoint or last.cmd:
            if last.entrypoint and last.entrypoint_shell:
                pass  # the P17 note at the ENTRYPOINT line says it all
            elif last.entrypoint and last.cmd:
                self.notes.append(Note(line, "ENTRYPOINT + CMD", "translated", "%runscript runs ENTRYPOINT with "
                                       "CMD as default arguments; run arguments replace CMD (Docker's rule)", "P16"))
            elif last.cmd:
                self.notes.append(Note(line, "CMD", "translated", "%runscript runs CMD; run arguments replace it "
                                       "(Docker's rule; a base image ENTRYPOINT is not applied)", "P15"))
            else:
                self.notes.append(Note(line, "ENTRYPOINT", "translated",
                                       "%runscript runs ENTRYPOINT with the run arguments appended", "P16"))
        else:
            self.notes.append(Note(0, "no CMD/ENTRYPOINT", "translated",
                                   "no %runscript is written, so the base image's own runscript applies", "P18"))


_SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8, "KILL": 9,
            "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17,
            "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25,
            "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "PWR": 30, "SYS": 31}


def _signal_name(text: str) -> str | None:
    """``SIGINT``/``INT``/``2`` -> ``SIGINT`` (Linux numbering, as Docker's signal.ParseSignal); else None."""
    t = text.strip().upper()
    if t.isdigit():
        n = int(t)
        return next((f"SIG{k}" for k, v in _SIGNALS.items() if v == n), None)
    t = t.removeprefix("SIG")
    return f"SIG{t}" if t in _SIGNALS else None
