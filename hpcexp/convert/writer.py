"""The recipe writer: the model of :mod:`hpcexp.convert.model` as Apptainer recipe text.

All shell quoting, here-document markers, ``%files`` line syntax and section layout live
here, and nowhere else: the interpreter decides what a step means, this module how it is
spelled. The ``%files``, ``%labels`` and ``%environment`` sections are written by
spython's writer (it gets those right), through :mod:`hpcexp.convert.bridge`.

The output is deterministic: the same model always gives the same bytes (the golden
recipes of tests/golden/convert hold the writer to that).
"""

from __future__ import annotations

import posixpath
import re
import shlex

from hpcexp import __version__
from hpcexp.convert import model as m
from hpcexp.convert.bridge import _spython, _spython_mod
from hpcexp.convert.words import esc_dq
from hpcexp.errors import ConvertError

STAGING = m.STAGING
_REF = m.REF

_CP_FUNC = r'''_hpcexp_cp() {  # Docker COPY semantics: a folder's contents, or a file (into DEST if a folder)
    if [ -d "$1" ] && [ ! -L "$1" ]; then mkdir -p "$2" && cp -a "$1/." "$2/"
    elif [ "$3" = dir ] || [ -d "$2" ]; then mkdir -p "$2" && cp -a "$1" "$2/"
    else mkdir -p "$(dirname "$2")" && cp -a "$1" "$2"; fi
}'''

_AS_FUNC = r'''_hpcexp_as() {  # USER: run one step as USER[:GROUP] (Docker), if this build can switch users
    _u="${1%%:*}"; _g=""; case "$1" in *:*) _g="${1#*:}";; esac; shift
    case "$_u" in ""|root|0) "$@"; return;; esac
    _uid=$(id -u "$_u" 2>/dev/null || echo "$_u")
    [ -n "$_g" ] || _g=$(id -g "$_u" 2>/dev/null || echo "$_uid")
    _gid=$(awk -F: -v g="$_g" '$1 == g { print $3; exit }' /etc/group 2>/dev/null || true)
    [ -n "$_gid" ] || _gid="$_g"
    _home=$(awk -F: -v u="$_uid" '$3 == u { print $6; exit }' /etc/passwd 2>/dev/null || true)
    [ -n "$_home" ] || _home=/
    for _sp in /usr/bin/setpriv /bin/setpriv setpriv; do  # util-linux's (busybox's cannot switch users)
        if "$_sp" --reuid="$_uid" --regid="$_gid" --clear-groups true 2>/dev/null; then
            HOME="$_home" USER="$_u" "$_sp" --reuid="$_uid" --regid="$_gid" --clear-groups "$@"
            return
        fi
    done
    echo "hpcexp: warning: cannot switch to user $_u (needs setpriv, subordinate ids): step runs as root" >&2
    "$@"
}'''
_MOUNT_FUNC = r'''_hpcexp_hide() {  # RUN --mount: TARGET is an empty folder for one step, what it held is put aside
    if [ -e "$1" ] || [ -L "$1" ]; then mkdir -p /.hpcexp/hidden && mv "$1" "/.hpcexp/hidden/$2"; fi
    mkdir -p "$1"; cd "$PWD" 2>/dev/null || true
}
_hpcexp_unhide() {  # after the step: drop what the step left there, put the original back
    rm -rf "$1"
    if [ -e "/.hpcexp/hidden/$2" ] || [ -L "/.hpcexp/hidden/$2" ]; then mv "/.hpcexp/hidden/$2" "$1"; fi
    cd "$PWD" 2>/dev/null || true
}'''


def heredoc_marker(body: str, base: str = "HPCEXP_EOF") -> str:
    """A here-document end marker that no line of ``body`` can be mistaken for.

    The shell ends a here-document at the first line equal to its marker, so a body line
    reading ``HPCEXP_EOF`` would cut the file short and run the rest as commands."""
    marker = base
    while marker in body:
        marker += "_"
    return marker


def q(path: str) -> str:
    """A path as one shell word: shlex-quoted, or double-quoted around base-image variables."""
    if _REF not in path:
        return shlex.quote(path)
    parts = path.split(_REF)
    return '"' + "".join(p if k % 2 else esc_dq(p) for k, p in enumerate(parts)) + '"'


_SAFE_SRC = re.compile(r"[A-Za-z0-9_./@%+=:, \u0080-\U0010ffff-]+")
_GLOB_SRC = re.compile(r"[A-Za-z0-9_./@%+=:,*?\[\]\u0080-\U0010ffff-]+")


def safe_source(path: str) -> bool:
    """Can ``path`` be written as a %files source as it is (see :func:`files_src`)?"""
    return _SAFE_SRC.fullmatch(path) is not None


def files_src(label: str, path: str, glob: bool = False) -> str:
    """A %files source. Apptainer splits the line on spaces outside double quotes and then
    expands each source like a shell word (globs, variables, even `command` substitution,
    run on the host), so only names that need no escaping are written here; others are
    reached through their folder (see the interpreter's ``stage_context``)."""
    if not (_SAFE_SRC.fullmatch(path) or (glob and _GLOB_SRC.fullmatch(path))):
        raise ConvertError(f"{label}: the file name {path[:60]!r} has characters Apptainer's %files would "
                           "interpret as shell syntax", hint="rename it, or copy its folder instead")
    if path.startswith("-"):
        path = "./" + path
    return f'"{path}"' if " " in path else path


def files_dest(path: str) -> str:
    """A %files destination: taken literally by Apptainer (only spaces need the quotes)."""
    if "\n" in path or '"' in path:
        raise ConvertError(f"internal: staging path {path!r} cannot be written in %files")
    return f'"{path}"' if " " in path else path


def chown_line(owner: str, quoted_path: str) -> str:
    """chown at build time; a fakeroot build without a subordinate id range cannot give files to
    other ids, and then the files stay root's (said on the build log, not fatal)."""
    shown = owner.replace(_REF, "").replace("'", "")
    return (f"chown -R {q(owner)} {quoted_path} 2>/dev/null || echo 'hpcexp: warning: could not chown "
            f"{shown} (unknown user or group, or no subordinate ids for this build)' >&2")


# --------------------------------------------------------------------------------------
# %post steps
# --------------------------------------------------------------------------------------

def shell_lines(text: str, shell: tuple[str, ...], user: str | None) -> list[str]:
    """Lines running ``text`` like Docker's ``SHELL + [text]`` (default: sh -c, no -e), as ``user``."""
    if user is not None:  # USER: a process of its own, switched to that user
        return [f"_hpcexp_as {q(user)} {shlex.join([*shell, text.rstrip(chr(10))])}"]
    if shell == m.DEFAULT_SHELL:
        return ["(", "set +e", text.rstrip("\n"), ")"]
    return [shlex.join([*shell, text])]


# The model's types bound once (conversion speed is measured: no attribute look-up per step)
_Block, _Export, _Mkdir, _Remove, _Unset = m.Block, m.Export, m.Mkdir, m.Remove, m.Unset
_CopyIn, _Shell, _Exec, _Script, _Hide, _Unhide, _BindCopy = (m.CopyIn, m.Shell, m.Exec, m.Script, m.Hide,
                                                             m.Unhide, m.BindCopy)
_Chmod, _Chown, _CopyGlob, _Unpack, _WriteFile, _Prune, _Fetch, _Clone = (
    m.Chmod, m.Chown, m.CopyGlob, m.Unpack, m.WriteFile, m.Prune, m.Fetch, m.Clone)
_DEFAULT_SHELL = m.DEFAULT_SHELL
_DECOMPRESS = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}


def _action(a: m.Action, out: list[str], line: int, pos: int) -> None:
    """Append the lines of one action of the Block of Dockerfile line ``line``, which starts at
    item ``pos`` of %post (an unmarked RUN --mount is marked ``m{line}.{pos}``: see model.Hide)."""
    t = type(a)
    if t is _CopyIn:
        out.append(f"_hpcexp_cp {shlex.quote(a.staged)} {q(a.dest)} {a.into}")
    elif t is _Shell:
        if a.user is None and a.shell == _DEFAULT_SHELL:
            out += ("(", "set +e", a.text.rstrip("\n"), ")")
        else:
            out += shell_lines(a.text, a.shell, a.user)
    elif t is _Exec:
        cmd = shlex.join(a.argv)
        out.append(cmd if a.user is None else f"_hpcexp_as {q(a.user)} {cmd}")
    elif t is _Script:
        marker = heredoc_marker(a.body)
        out += [f"mkdir -p {STAGING}/run", f"cat > {a.path} <<'{marker}'", a.body.rstrip("\n"), marker,
                f"chmod +x {a.path}", *shell_lines(f"{a.interpreter} {a.path}", a.shell, a.user)]
    elif t is _Hide:
        out.append(f"_hpcexp_hide {q(a.target)} {a.mark if a.mark is not None else f'm{line}.{pos}'}")
    elif t is _Unhide:
        out.append(f"_hpcexp_unhide {q(a.target)} {a.mark if a.mark is not None else f'm{line}.{pos}'}")
    elif t is _BindCopy:
        out.append(f"rmdir {q(a.target)} && _hpcexp_cp {shlex.quote(a.staged)} {q(a.target)} file")
    elif t is _Chmod:
        out.append(f"chmod -R {shlex.quote(a.mode)} {shlex.quote(a.path)}" if a.recursive
                   else f"chmod {shlex.quote(a.mode)} {q(a.path)}")
    elif t is _Chown:
        out.append(chown_line(a.owner, q(a.path)))
    elif t is _CopyGlob:
        out.append(f"mkdir -p {q(a.dest)} && cp -a {a.staged_dir}/. {q(a.dest)}/")
    elif t is _Unpack:
        if a.kind == "tar":
            unpack = f"tar -xf {shlex.quote(a.staged)} -C {q(a.dest)}"
        else:  # a pipe works with every tar, busybox's included (no -z/-j/-J needed)
            unpack = f"{_DECOMPRESS[a.kind]} -dc {shlex.quote(a.staged)} | tar -xf - -C {q(a.dest)}"
        out.append(f"mkdir -p {q(a.dest)} && {unpack}")
    elif t is _WriteFile:
        marker = heredoc_marker(a.body)
        out += [f"mkdir -p {q(posixpath.dirname(a.target) or '/')}",
                f"cat > {q(a.target)} <<'{marker}'", a.body.rstrip("\n"), marker]
    elif t is _Prune:
        sh = a.pattern.replace("**/", "").strip("/")
        out.append(f'find {shlex.quote(a.staged)} -mindepth 1 \\( -path {shlex.quote(a.staged + "/" + sh)} '
                   f'-o -name {shlex.quote(sh)} \\) -exec rm -rf {{}} + 2>/dev/null || true')
    elif t is _Fetch:
        target, u = q(a.target), shlex.quote(a.url)
        out += [f"mkdir -p {q(posixpath.dirname(a.target))}",
                f"if command -v curl >/dev/null 2>&1; then curl -fsSL -o {target} {u}; "
                f"else wget -q -O {target} {u}; fi"]
    elif t is _Clone:
        argv = ["git", "clone", "--depth", "1"] + (["--branch", a.ref] if a.ref else []) + [a.repo]
        out += [f"mkdir -p {q(posixpath.dirname(a.dest))}", f"{shlex.join(argv)} {q(a.dest)}"]
    else:  # a model type without a writer is a programming error
        raise TypeError(f"no writer for {t.__name__}")


def post_lines(steps: list[m.Step]) -> list[str]:
    """The %post items of ``steps`` (an item may span lines: a here-document body is one item)."""
    out: list[str] = []
    for s in steps:
        t = type(s)
        if t is _Block:
            pos = len(out)
            if s.chdir is not None:
                out.append(f"cd {q(s.chdir)}")
            out.append(f"# Dockerfile line {s.line}: {s.what}")
            for a in s.actions:
                _action(a, out, s.line, pos)
        elif t is _Export:
            pairs = s.pairs
            if len(pairs) == 1:
                out.append(f'export {pairs[0][0]}="{pairs[0][1]}"')
            else:
                out.append("export " + " ".join(f'{k}="{v}"' for k, v in pairs))
        elif t is _Mkdir:
            out.append(f"mkdir -p {q(s.path)}")
        elif t is _Remove:
            out.append(f"rm -rf {shlex.quote(s.path)}")
        elif t is _Unset:
            out.append(f"unset {s.name}")
        else:
            raise TypeError(f"no writer for {t.__name__}")
    return out


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

def base_header(base: m.BaseResolution) -> list[str]:
    """``Bootstrap:``/``From:`` and the extra header lines of a stage's base."""
    lines = [f"Bootstrap: {base.bootstrap}"]
    if base.source:
        lines.append(f"From: {base.source}")
    lines.extend(f"{k}: {v}" for k, v in base.headers)
    return lines


def runscript(st: m.Stage) -> list[str] | None:
    """The %runscript of the final stage: ENTRYPOINT and CMD with Docker's argument rules."""
    ep, cmd = st.entrypoint, st.cmd or None
    if not ep and not cmd:
        return None
    lines = []
    if st.workdir_set:
        lines.append(f"cd {q(st.workdir)}")
    if ep and st.entrypoint_shell:
        lines.append(f"exec {shlex.join(ep)}")  # Docker: CMD and run arguments never reach it
    elif ep:
        if cmd:
            lines += ['if [ "$#" -gt 0 ]; then', f'    exec {shlex.join(ep)} "$@"', "else",
                      f"    exec {shlex.join([*ep, *cmd])}", "fi"]
        else:
            lines.append(f'exec {shlex.join(ep)} "$@"')
    else:
        assert cmd is not None
        lines += ['if [ "$#" -gt 0 ]; then', '    exec "$@"', "else", f"    exec {shlex.join(cmd)}", "fi"]
    return lines


def render(recipe: m.Recipe) -> str:
    """The recipe text of ``recipe``."""
    spy = _spython_mod()
    writer = spy["writer"]
    label = recipe.label
    out = [f"# Generated by hpcexp {__version__} from {label} (sha256 {recipe.sha256}) for {recipe.arch}.",
           "# Do not edit: change the Dockerfile and run `hpcexp convert` again.",
           "# %files sources are relative to the build context: build from that folder."]
    multi = len(recipe.stages) > 1 or bool(recipe.external)
    emitted_ext: set[str] = set()
    ext_by_name = {e.name: e for e in recipe.external}
    last = recipe.stages[-1]
    for st in recipe.stages:
        for name in st.ext_before:
            if name in emitted_ext:
                continue
            emitted_ext.add(name)
            out.append("")
            out.extend(base_header(ext_by_name[name].base))
            out.append(f"Stage: {name}")
        out.append("")
        out.extend(base_header(st.base))
        if multi:
            out.append(f"Stage: {st.name}")
        groups: dict[str | None, list[tuple[str, str]]] = {}
        for frm, src, dst in st.files:
            groups.setdefault(frm, []).append((files_src(label, src, glob=frm is not None), files_dest(dst)))
        for frm, pairs in groups.items():
            out.append("")
            out.extend(_spython(label, st.line, "%files", writer.create_keyval_section, pairs, "files", frm))
        if st.labels:
            out.append("")
            out.extend(_spython(label, st.line, "%labels", writer.create_keyval_section,
                                [(k, v) for k, v in st.labels], "labels", None))
        if st.environment:
            out.append("")
            out.extend(_spython(label, st.line, "%environment", writer.create_env_section,
                                [f'{k}="{v}"' for k, v in st.environment], "environment"))
        post = post_lines(st.post)
        if st.uses_mount:
            post.insert(0, _MOUNT_FUNC)
        if st.uses_as:
            post.insert(0, _AS_FUNC)
        if st.uses_cp:
            post.insert(0, _CP_FUNC)
        if st.files or any(STAGING in p for p in post):
            post.append(f"rm -rf {STAGING}")
        if post:
            out.append("")
            out.append("%post")
            out.extend(post)
        if st is last:
            rs = runscript(st)
            if rs is not None:
                out.append("")
                out.append("%runscript")
                out.extend(rs)
    return "\n".join(out) + "\n"
