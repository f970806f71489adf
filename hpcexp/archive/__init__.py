"""Archives of runs: results plus everything needed to trust and reproduce them.

``hpcexp archive`` bundles, per run, the run folder (``run.json``, logs, the rendered job
script, ``results/``, ``events/``) with the recipe and the Dockerfile it came from, and
puts ``MANIFEST.json`` first: path, size and sha256 of every member, each run's
provenance (image sha256, recipe sha256, git commit) and hpcexp's version (reliability
invariant I7: an archive is verifiable).

Why it is built the way it is
  - Two passes. The manifest is the first member but lists every file's sha256, so a
    first pass walks and hashes everything, spooling entries to an unlinked temporary
    file (memory stays bounded whatever the number of files); the second pass writes the
    archive and re-hashes each file as it is copied: a file that changed in between is
    an error naming it, never an archive that lies.
  - Nothing outside the run leaks in. The walk never follows a symlink (``lstat``,
    ``scandir(follow_symlinks=False)``, ``O_NOFOLLOW``): a link is stored as a link, so a
    link to ``~/.ssh/id_rsa`` puts the string ``~/.ssh/id_rsa`` in the archive, never the
    key. FIFOs, sockets and devices are skipped before anything opens them (no hang).
  - Deterministic. Members are sorted, every timestamp is one fixed value derived from
    the runs, owners are 0/"" and modes are normalised, the gzip header carries no name
    and mtime 0: the same runs give a byte-identical ``.tar.gz``.
  - Crash consistent. The archive is written under a temporary name in the destination
    folder (:mod:`hpcexp.infra.atomic`) and renamed only when complete; archived runs are only
    read, never modified.
  - Interruptible. On any failure, SIGTERM or Ctrl-C included, the gzip or zip stream is
    cut off from the temporary file (:class:`writers._Sink`) and closed before that file is
    closed and removed: nothing the stdlib stream still wants to write (at once, or when
    the garbage collector finalises it, which Python 3.13 reports) reaches a closed file.

``extract`` restores an archive into a new (or empty) folder and refuses, before writing
anything, absolute names, ``..``, links leading outside the folder (also through chains
of links), writing through a link, and device or FIFO members, naming the member.

Modules, by what they own (this file is only the package's face: its names are the
public ones, importable as ``hpcexp.archive.NAME``):
  - :mod:`~hpcexp.archive.scan`      pass 1: which runs, what of each, the safe walk and its spool
  - :mod:`~hpcexp.archive.manifest`  MANIFEST.json, written streamed and read back line by line
  - :mod:`~hpcexp.archive.writers`   pass 2: tar.gz and zip writers, the gzip thread, the sink
  - :mod:`~hpcexp.archive.create`    ``create_archive``: the output file, interruption, results
  - :mod:`~hpcexp.archive.reader`    format detection and member iteration (verify and extract)
  - :mod:`~hpcexp.archive.verify`    ``verify_archive``
  - :mod:`~hpcexp.archive.extract`   ``extract_archive`` and its safety rules
  - :mod:`~hpcexp.archive.base`      sizes, the member-name printer, the fault hook
"""

from hpcexp.archive.base import CHUNK, FORMATS, SMALL, Warn
from hpcexp.archive.create import (
                                   ArchiveResult,
                                   ArchiveStream,
                                   create_archive,
                                   default_name,
                                   format_for,
                                   human_summary,
                                   open_stream,
)
from hpcexp.archive.extract import DEFAULT_MAX_SIZE, ExtractResult, extract_archive, parse_size
from hpcexp.archive.extract import _remove_tree as _remove_tree  # tests/test_hardening.py imports it from here
from hpcexp.archive.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_SCHEMA
from hpcexp.archive.reader import detect_format
from hpcexp.archive.verify import Problem, VerifyReport, verify_archive

__all__ = [
    "CHUNK",
    "DEFAULT_MAX_SIZE",
    "FORMATS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "SMALL",
    "ArchiveResult",
    "ArchiveStream",
    "ExtractResult",
    "Problem",
    "VerifyReport",
    "Warn",
    "create_archive",
    "default_name",
    "detect_format",
    "extract_archive",
    "format_for",
    "human_summary",
    "open_stream",
    "parse_size",
    "verify_archive",
]
