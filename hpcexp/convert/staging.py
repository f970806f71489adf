"""COPY, ADD and RUN --mount: the instructions that stage files through ``%files``.

A mixin of :class:`hpcexp.convert.interpret.Interpreter` (it uses the interpreter's word
expansion, notes and current stage): split out because staging files is the largest part
of Dockerfile interpretation (context matching, --from stages, --chmod/--chown/--exclude/
--parents, archives, URLs, here-documents) and reads best on its own. It records
:class:`hpcexp.convert.model.StagedFile` entries and %post actions; the writer spells them.

:class:`Copying` is a little over 300 lines because COPY/ADD is one decision tree (flags,
then per source: URL, another stage, a context folder, file or archive) that reads worse
cut in two.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import TYPE_CHECKING

from hpcexp.convert import model as m
from hpcexp.convert.context import IgnoreRules, archive_kind
from hpcexp.convert.model import REF as _REF
from hpcexp.convert.model import STAGING, StagedFile
from hpcexp.convert.words import has_refs, literal
from hpcexp.convert.writer import safe_source

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.convert.dockerfile import Instruction

_CHMOD = re.compile(r"[0-7]{3,4}|[ugoa]*[-+=][rwxXst]*(,[ugoa]*[-+=][rwxXst]*)*")
_CHOWN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
_URL = re.compile(r"^(https?|git)://|^git@")
_GLOB_FILES = re.compile(r"[A-Za-z0-9_./@%+=:,*?\[\]-]+")


def _basename(path: str) -> str:
    b = posixpath.basename(path.rstrip("/"))
    return b if b not in ("", ".", "..") else "_"


class Copying:
    """COPY/ADD/RUN --mount handlers of the interpreter (see the module docstring)."""

    def run_mount(self, ins: "Instruction", spec: str) -> tuple[list[m.Action], list[m.Action]]:
        """The actions before and after a RUN step for one ``--mount=`` option."""
        opts: dict[str, str] = {}
        for part in spec.split(","):
            k, _, v = part.partition("=")
            opts[k.strip().lower()] = v.strip()
        kind = opts.get("type", "bind")
        target = opts.get("target") or opts.get("dst") or opts.get("destination") or ""
        if kind in ("cache", "tmpfs"):
            if not target:
                raise self.fail(ins, f"--mount={spec}: a {kind} mount needs target=")
            tgt = self.abspath(target)
            st = self.cur
            assert st is not None
            st.uses_mount = True
            what = "a build cache" if kind == "cache" else "a tmpfs"
            self.note(ins, f"RUN --mount=type={kind}", "approximated",
                      f"{tgt} is an empty folder for this step (Docker: {what}, kept out of the image); what the step "
                      "writes there is removed after it and the image's own files there are put back, so it stays "
                      "out of the image" + (", but nothing is reused between builds" if kind == "cache" else ""), "P21")
            return [m.Hide(tgt)], [m.Unhide(tgt)]   # marked by the step's position: see model.Hide
        if kind in ("secret", "ssh"):
            sid = opts.get("id") or opts.get("target") or "default"
            self.note(ins, f"RUN --mount=type={kind}", "dropped",
                      f"{kind} {sid!r} is not available in an Apptainer build; the step runs without it "
                      "(pass it another way, e.g. a bind at run time)", "P21")
            return [], []
        if kind != "bind":
            self.note(ins, f"RUN --mount=type={kind}", "dropped", "unknown mount type", "P21")
            return [], []
        if not target:
            raise self.fail(ins, f"--mount={spec}: a bind mount needs target=")
        src = opts.get("source") or opts.get("src") or "."
        tgt = self.abspath(target)
        st = self.cur
        assert st is not None
        st.stage_no += 1
        n = st.stage_no
        stage_from = opts.get("from")
        if stage_from:
            frm = self.from_stage(ins, stage_from)
            staged = f"{STAGING}/from/{n}/0/{_basename(src)}"
            st.files.append(StagedFile(frm, posixpath.normpath("/" + src), staged))
        else:
            rels = self.context_sources(ins, src)
            if len(rels) != 1:
                raise self.fail(ins, f"--mount source {src!r} must be one file or folder")
            staged = self.stage_context(rels[0], n, 0)
        st.uses_cp = True
        st.uses_mount = True
        self.note(ins, "RUN --mount=type=bind", "translated",
                  f"{src} is copied to {tgt} for this step and removed after it (what was there is put back)", "P21")
        return [m.Hide(tgt, str(n)), m.BindCopy(staged, tgt)], [m.Unhide(tgt, str(n))]

    # -- COPY / ADD -------------------------------------------------------------------
    def from_stage(self, ins: "Instruction", ref: str) -> str:
        val = literal(self.processor().word(ref))
        st = self.find_stage(val.lower())
        if st is not None:
            if st is self.cur:
                raise self.fail(ins, f"--from={val} refers to the stage being built")
            return st.name
        if val.isdigit():
            raise self.fail(ins, f"--from={val}: there is no stage {val} before this one")
        ext = self.ext.get(val)
        if ext is None:
            name = f"ext{len(self.ext)}"
            ext = m.Stage(index=-1, name=name, alias=None, line=ins.line)
            ext.base = self.base_header(ins, val)
            ext.base_ref = val
            self.ext[val] = ext
            self.note(ins, f"COPY --from={val}", "translated", f"the image is added as stage {name!r}", "P03")
        assert self.cur is not None
        if ext.name not in self.cur.ext_before:
            self.cur.ext_before.append(ext.name)
        return ext.name

    def context_sources(self, ins: "Instruction", src: str, allow_empty: bool = False) -> list[str]:
        norm = posixpath.normpath(src.replace("\\", "/") if self.df.escape == "`" else src).lstrip("/")
        if norm in (".", ""):
            norm = ""
        if norm == ".." or norm.startswith("../"):
            raise self.fail(ins, f"source {src!r} is outside the build context")
        ctx = self.context()
        found = ctx.match(norm)
        if not found and allow_empty and any(ch in norm for ch in "*?["):
            # BuildKit: a source wildcard that matches nothing is nothing to copy (the "copy if
            # present" idiom, `COPY cwallet.ss[o] ./`); a literal path that is missing is an error
            self.note(ins, f"{ins.keyword} {src}", "translated", "the wildcard matches nothing in the build "
                      "context, so nothing is copied (as BuildKit does)", "P32")
            return []
        if not found:
            raise self.fail(ins, f"source {src!r} not found in the build context {self.ctx_root.name}/"
                            + (" (or excluded by .dockerignore)" if ctx.has_rules else ""))
        return found

    def stage_context(self, rel: str, n: int, k: int, exclude: "IgnoreRules | None" = None) -> str:
        """Add %files lines staging context path ``rel``; return the staged path."""
        st = self.cur
        assert st is not None
        ctx = self.context()
        base = _basename(rel) if rel else "_context"
        staged = f"{STAGING}/ctx/{n}/{k}/{base}"
        if ctx.is_dir(rel):
            members = ctx.under(rel)
            dropped: list[str] = []
            if exclude is not None:  # COPY --exclude: patterns match paths inside the copied folder
                kept = []
                for f in members:
                    inner = f[len(rel) + 1:] if rel else f
                    (dropped if exclude.ignored(inner) else kept).append(f)
                members = kept
            st.ctx_files.update(members)
            filtered = ctx.filtered(rel) or bool(dropped)
            if filtered and all(safe_source(f) for f in members):
                for f in members:
                    inner = f[len(rel) + 1:] if rel else f
                    st.files.append(StagedFile(None, f, f"{staged}/{inner}"))
                if not members:
                    st.post.append(m.Mkdir(staged))
            else:
                st.files.append(StagedFile(None, rel or ".", staged))
                # names %files cannot carry one by one: stage the folder, drop the ignored part in %post
                gone = (ctx.ignored_paths(rel) if ctx.filtered(rel) else []) + dropped
                for path in gone:
                    inner = path[len(rel) + 1:] if rel else path
                    st.post.append(m.Remove(staged + "/" + inner))
        else:
            st.ctx_files.add(rel)
            st.files.append(StagedFile(None, rel, staged))
        return staged

    def do_copy(self, ins: "Instruction") -> None:
        self.copy_or_add(ins, add=False)

    def do_add(self, ins: "Instruction") -> None:
        self.copy_or_add(ins, add=True)

    def copy_or_add(self, ins: "Instruction", add: bool) -> None:
        st = self.cur
        assert st is not None
        kw = ins.keyword
        chmod = None
        chown = None
        frm = None
        parents = False
        excludes: list[str] = []
        for fl, val in ins.flags:
            if fl == "chown":
                chown = self.path_value(ins, self.processor().word(val or ""), "--chown", shell=True)
                if _REF not in chown and not _CHOWN.fullmatch(chown):
                    raise self.fail(ins, f"--chown={chown!r} is not USER, USER:GROUP or UID:GID")
                self.note(ins, f"{kw} --chown={chown}", "translated", "the copied files get this owner in the image "
                          "(chown during the build); the container still runs as whoever starts it", "P04")
            elif fl == "chmod":
                chmod = val or ""
                if not _CHMOD.fullmatch(chmod):
                    raise self.fail(ins, f"--chmod={chmod!r} is not a mode")
            elif fl == "from":
                frm = self.from_stage(ins, val or "")
            elif fl == "link":
                self.note(ins, f"{kw} --link", "translated", "layer linking has no meaning in a SIF; ignored", "P04")
            elif fl == "exclude":
                excludes.append(val or "")
            elif fl == "parents":
                parents = True
                self.note(ins, f"{kw} --parents", "translated", "each source keeps its path under the destination, "
                          "as BuildKit does", "P04")
            elif fl in ("checksum", "keep-git-dir"):
                self.note(ins, f"{kw} --{fl}", "dropped", "not checked by Apptainer", "P04")
            else:
                self.note(ins, f"{kw} --{fl}", "dropped", f"unknown {kw} option", "P04")
        if excludes:
            self.note(ins, f"{kw} --exclude", "translated" if frm is None else "approximated",
                      f"--exclude {' '.join(excludes)}: matching files are left out"
                      + ("" if frm is None else " (matched by name in the copied folder; ** is read as any depth)"),
                      "P31")
        if ins.heredocs and ins.exec_form is None:
            self.copy_heredoc(ins, chmod, chown)
            return
        if ins.exec_form is not None:
            self.note(ins, f"{kw} [JSON form]", "translated", "sources and destination read as a JSON list", "P07")
            words = []
            for w in ins.exec_form:
                v = self.processor().word(w.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'"))
                words.append(v)
        else:
            words = self.words(ins, ins.args)
        if len(words) < 2:
            raise self.fail(ins, "needs at least one source and a destination")
        dest_raw = self.path_value(ins, words[-1], "destination", shell=True)
        srcs = [self.path_value(ins, w, "source") for w in words[:-1]]
        dest_is_dir = dest_raw.endswith("/") or dest_raw in (".", "") or len(srcs) > 1
        dest = self.abspath(dest_raw or ".")
        if not dest_raw.startswith(("/", _REF)):
            if st.workdir_set:
                self.note(ins, f"{kw} to {dest_raw}", "translated", f"relative destination resolved against "
                          f"WORKDIR to {dest}", "P05")
        st.stage_no += 1
        n = st.stage_no
        lines: list[m.Action] = []
        staged_all: list[str] = []
        exclude = IgnoreRules(excludes) if excludes else None
        for k, src in enumerate(srcs):
            if add and _URL.match(src):
                lines += self.add_url(ins, src, dest, dest_is_dir)
                continue
            if frm is not None:
                path = posixpath.normpath("/" + src) if not src.startswith("/") else posixpath.normpath(src)
                if any(ch in path for ch in "*?["):
                    staged_dir = f"{STAGING}/from/{n}/{k}"
                    st.files.append(StagedFile(frm, path, staged_dir + "/"))
                    staged_all.append(staged_dir)
                    self.note(ins, f"{kw} --from with wildcard", "approximated",
                              "matches are copied into the destination folder", "P03")
                    lines += self.exclude_lines(ins, staged_dir, excludes)
                    lines.append(m.CopyGlob(staged_dir, dest))
                    continue
                staged = f"{STAGING}/from/{n}/{k}/{_basename(path)}"
                st.files.append(StagedFile(frm, path, staged))
                staged_all.append(staged)
                st.uses_cp = True
                lines += self.exclude_lines(ins, staged, excludes)
                if parents:
                    lines.append(m.CopyIn(staged, self.parents_dest(dest, src.lstrip("/")), "file"))
                else:
                    lines.append(m.CopyIn(staged, dest, "dir" if dest_is_dir else "file"))
                continue
            rels = self.context_sources(ins, src, allow_empty=True)
            if exclude is not None:
                rels = [r for r in rels if not (exclude.ignored(r) or exclude.ignored(_basename(r)))]
            many = dest_is_dir or len(rels) > 1
            for j, rel in enumerate(rels):
                kk = f"{k}" if len(rels) == 1 else f"{k}.{j}"
                ctx = self.context()
                kind = archive_kind(os.path.join(self.ctx_root, rel)) if add and not ctx.is_dir(rel) else ""
                if kind:
                    staged = self.stage_context(rel, n, kk)  # type: ignore[arg-type]
                    lines.append(m.Unpack(staged, dest, kind))
                    self.note(ins, f"ADD {rel}", "translated", f"the archive is extracted into {dest}", "P08")
                    continue
                staged = self.stage_context(rel, n, kk, exclude)  # type: ignore[arg-type]
                staged_all.append(staged)
                st.uses_cp = True
                if parents:
                    lines.append(m.CopyIn(staged, self.parents_dest(dest, rel, src), "file"))
                else:
                    lines.append(m.CopyIn(staged, dest, "dir" if many else "file"))
        if chmod or chown:
            # mode and owner are set on the staged copy, before it is copied into place (cp -a keeps
            # them): only the files this instruction copies change, never what the destination held
            fix: list[m.Action] = []
            for p in dict.fromkeys(staged_all):
                if chmod:
                    fix.append(m.Chmod(chmod, p, recursive=True))
                if chown:
                    fix.append(m.Chown(chown, p))
            lines[0:0] = fix
        if chmod:
            self.note(ins, f"{kw} --chmod", "translated", f"mode {chmod} set on the copied files", "P04")
        self.emit(m.Block(ins.line, kw, tuple(lines)))

    def parents_dest(self, dest: str, rel: str, src: str | None = None) -> str:
        """COPY --parents: the source's path is kept under the destination (after a ``/./`` marker
        only the part after it, as BuildKit does)."""
        keep = rel
        if src is not None and "/./" in "/" + src:
            marker = posixpath.normpath(("/" + src).rsplit("/./", 1)[0]).lstrip("/")
            if marker and rel.startswith(marker + "/"):
                keep = rel[len(marker) + 1:]
        return posixpath.join(dest, keep) if keep else dest

    def exclude_lines(self, ins: "Instruction", staged: str, excludes: list[str]) -> list[m.Action]:
        """--exclude for a copy from another stage: the staged copy is pruned in %post."""
        out: list[m.Action] = []
        for pat in excludes:
            if not _GLOB_FILES.fullmatch(pat) or ".." in pat.split("/"):
                raise self.fail(ins, f"--exclude={pat!r}: only plain names and * ? [ ] wildcards are supported")
            out.append(m.Prune(staged, pat))
        return out

    def copy_heredoc(self, ins: "Instruction", chmod: str | None, chown: str | None = None) -> None:
        words = self.words(ins, ins.args)
        dest_raw = self.path_value(ins, words[-1], "destination", shell=True)
        dest = self.abspath(dest_raw)
        dest_is_dir = dest_raw.endswith("/") or len(ins.heredocs) > 1
        lines: list[m.Action] = []
        for hd in ins.heredocs:
            target = posixpath.join(dest, hd.name) if dest_is_dir else dest
            body = hd.body
            if not hd.quoted and "$" in body:
                # Docker expands ARG/ENV in an unquoted COPY heredoc at build time; so do we, now
                wp = self.processor()
                try:
                    value = wp.expand(body)
                except ValueError as exc:
                    raise self.fail(ins, f"<<{hd.name}: {exc}") from None
                if has_refs(value):
                    names = sorted({s.name for s in value if not isinstance(s, str)})
                    self.note(ins, f"{ins.keyword} <<{hd.name}", "approximated",
                              f"${', $'.join(names)} comes from the base image, unknown at conversion time; "
                              "taken as unset", "P20")
                body = literal(value)
            lines.append(m.WriteFile(target, body))
            # Docker writes a heredoc file with mode 0644 (or --chmod), whatever the build's umask
            lines.append(m.Chmod(chmod or "644", target))
            if chown:
                lines.append(m.Chown(chown, target))
        self.note(ins, f"{ins.keyword} <<heredoc", "translated", f"written to {dest} in %post", "P20")
        self.emit(m.Block(ins.line, f"{ins.keyword} <<heredoc", tuple(lines)))

    def add_url(self, ins: "Instruction", url: str, dest: str, dest_is_dir: bool) -> list[m.Action]:
        if url.startswith("git") or ".git" in url.split("#")[0][-5:] or url.startswith("git@"):
            repo, _, ref = url.partition("#")
            self.note(ins, f"ADD {url}", "approximated", "cloned with git during %post: the image needs git "
                      "and the build needs network access", "P08")
            return [m.Clone(repo, ref, dest)]
        name = _basename(url.split("?")[0].split("#")[0]) or "download"
        target = posixpath.join(dest, name) if dest_is_dir else dest
        self.note(ins, f"ADD {url}", "approximated", "downloaded during %post with curl or wget: the image needs "
                  "one of them and the build needs network access (or download it into the context and COPY it)",
                  "P08")
        return [m.Fetch(url, target)]

