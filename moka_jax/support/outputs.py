"""Safe outputs: one check, used by every writer, that nothing it writes destroys data.

Every output directory gets a marker file (MARKER) naming the command that wrote it and, for
a training run, the config fingerprint it belongs to. Before any heavy work a writer calls
check_output, which

- refuses, even with overwrite, a path that is one of the command's own inputs or holds one
  (`convert SRC SRC --overwrite` would delete SRC);
- refuses a directory with another run's output of the same command unless told to
  overwrite, listing what differs;
- never replaces another command's output (an export over a training run), not even with
  overwrite: the marker's command names the command and the kind it wrote (`train`,
  `export-hf`, `export-peft`, `convert`, ...), and overwrite replaces only its own kind;
- never replaces a directory holding files that moka_jax did not write (no marker): overwrite
  replaces our outputs only, so a mistyped --out never deletes someone's files.

    state = check_output(out, command="convert", inputs=[src], overwrite=args.overwrite)
    with atomic_output_dir(out, overwrite, command="convert", inputs=[src]) as tmp: ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from moka_jax.support.diskfull import writing

MARKER = ".moka_jax_output.json"
LOCK = ".moka_jax_lock.json"  # a live run's owner (training.lock): bookkeeping, not data
_BOOKKEEPING = (MARKER, LOCK)


class OutputError(FileExistsError):
    """An output path that would overwrite data; the message says why and what to do."""


def _resolve(p) -> Path:
    return Path(p).expanduser().resolve()


def read_marker(path) -> dict | None:
    file = Path(path) / MARKER
    if not file.is_file():
        return None
    try:
        d = json.loads(file.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}  # ours (the name says so) but unreadable: treat as an unknown owner


def write_marker(path, command: str, inputs=(), owner=None) -> None:
    info = {"command": command, "inputs": [str(_resolve(i)) for i in inputs if i is not None]}
    if owner is not None:
        info["owner"] = owner
    (Path(path) / MARKER).write_text(json.dumps(info, indent=1))


def dict_diff(old, new, old_name: str = "existing", new_name: str = "this run",
              prefix: str = "") -> list[str]:
    """'a.b: old_name X vs new_name Y' for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += dict_diff(a, b, old_name, new_name, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {old_name} {a!r} vs {new_name} {b!r}")
    return out


def _holds_data(p: Path) -> bool:
    return not p.is_dir() or any(not q.is_dir() for q in p.rglob("*"))


def check_not_input(path, inputs, what: str = "output") -> Path:
    """OutputError when `path` is one of `inputs` or a directory above one."""
    out = _resolve(path)
    for i in inputs:
        if i is None:
            continue
        src = _resolve(i)
        if out == src or out in src.parents:
            raise OutputError(
                f"{what} {path} is {'' if out == src else 'a directory holding '}an input of "
                f"this command ({src}); writing there would destroy it, with or without "
                "overwrite. Choose another output path")
    return out


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def check_output(path, *, command: str, inputs=(), overwrite: bool = False, owner=None,
                 reuse: bool = False, known: tuple = (), flag: str = "--overwrite",
                 fix: str | None = None) -> str:
    """May `command` write the directory `path`? Returns

    "new"      absent, empty, or holding only a marker;
    "same"     `command`'s own output for `owner`, and `reuse` (a run that resumes);
    "replace"  an earlier output of `command` (same command and kind) that `overwrite` allows
               replacing; another command's output is never replaced.
    Anything else raises OutputError naming the directory, what it holds and the fix.
    known: entry names that identify `command`'s output when a marker is missing (older runs).
    fix: the advice when refused (default: pass `flag`, or choose another directory).
    """
    check_not_input(path, inputs)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{path} is a file, but {command} writes a directory there; choose "
                          "another output path")
    # Empty sub-directories (a run that stopped before writing anything) hold nothing to lose.
    content = sorted(e.name for e in p.iterdir() if e.name not in _BOOKKEEPING and _holds_data(e)) \
        if p.is_dir() else []
    if not content:
        return "new"
    marker = read_marker(p)
    if marker is None and known and all(e in known for e in content):
        marker = {"command": command}  # an output of ours from before markers existed
    if marker is None:
        raise OutputError(
            f"{path} holds files that moka_jax did not write ({_listing(content)}); {command} "
            "never replaces those, not even with overwrite. Choose a new or empty directory")
    theirs = marker.get("command", "an unknown command")
    same_owner = theirs == command and marker.get("owner") == owner
    if same_owner and reuse:
        return "same"
    if theirs != command:
        raise OutputError(
            f"{path} holds the output of `{theirs}` ({_listing(content)}); {command} never "
            f"replaces another command's output, not even with {flag}. Choose another "
            "directory")
    if overwrite:
        return "replace"
    detail = ""
    if same_owner:
        held = "this same output (the same config)" if owner is not None else \
            f"an earlier output of `{command}`"
    elif isinstance(marker.get("owner"), dict) and isinstance(owner, dict):
        held = "the output of another config"
        detail = ". Differences:\n  " + "\n  ".join(dict_diff(marker["owner"], owner, "there",
                                                               "now")[:10])
    else:
        held = f"an earlier output of `{command}` of unknown config"
    fix = fix or f"Pass {flag} to replace it, or choose another directory"
    raise OutputError(f"{path} already holds {held}. {fix}{detail}")


def check_output_file(path, *, command: str, inputs=(), overwrite: bool = False,
                      flag: str = "--overwrite") -> Path:
    """May `command` write the file `path`? Never an input; an existing file only with overwrite."""
    out = check_not_input(path, inputs, "output file")
    for i in inputs:
        if i is not None and _resolve(i) in out.parents and out.exists():
            raise OutputError(f"output file {path} lies inside an input of this command ({i}); "
                              "writing it would change that input. Choose another path")
    if out.is_dir():
        raise OutputError(f"output file {path} is a directory; choose a file path")
    if out.exists() and not overwrite:
        raise OutputError(f"output file {path} already exists; pass {flag} to replace it, or "
                          "choose another path")
    owner = read_marker(out.parent) if out.exists() else None
    if owner is not None and owner.get("command") != command:
        raise OutputError(f"output file {path} is part of the output of "
                          f"`{owner.get('command', 'an unknown command')}` in {out.parent}; "
                          f"{command} never replaces another command's files, not even with "
                          f"{flag}. Choose another path")
    return out


def write_file_atomic(path, text: str) -> Path:
    """Write text beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = None
    try:
        with writing(path, f"{path} is unchanged"):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False, *, command: str = "moka_jax",
                      inputs=(), owner=None, reuse: bool = False):
    """check_output, then yield a temp dir beside out_dir (marker written); on success it
    replaces out_dir in one rename, so a crash leaves the old output or the new one, whole.
    reuse: replace `command`'s own output for the same `owner` without overwrite."""
    check_output(out_dir, command=command, inputs=inputs, overwrite=overwrite, owner=owner,
                 reuse=reuse)
    out_dir = Path(out_dir).expanduser().absolute()
    intact = f"{out_dir} is unchanged" if out_dir.exists() else f"nothing was written to {out_dir}"
    with writing(out_dir, intact):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the output from other users
    try:
        with writing(out_dir, intact):  # the half-written copy is removed below
            write_marker(tmp, command, inputs, owner)
            yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["LOCK", "MARKER", "OutputError", "atomic_output_dir", "check_not_input", "check_output",
           "check_output_file", "dict_diff", "read_marker", "write_file_atomic", "write_marker"]
