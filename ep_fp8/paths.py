"""Output files: whether a path can be written, checked before any work that would end in
writing it, and writing one so that it appears only once complete."""

from __future__ import annotations

import contextlib
import os


def output_path_problem(path: str, *, folder: bool = False) -> str:
    """Why this process could not write the file `path` (or make and write in the folder
    `path`, with folder=True), as words to follow the path in a message; '' when it can.

    It can when `path` is already a writable file (folder) or does not exist and its nearest
    existing ancestor is a writable folder (missing folders in between are made by the
    writer).
    """
    if "\0" in path:
        return "cannot be made: it holds a NUL character"
    if not folder and path.endswith(os.sep):   # abspath would drop the slash: q/ -> q
        return "cannot be written: it ends with a '/', which names a folder, not a file"
    target = os.path.abspath(path)
    if os.path.exists(target):
        if os.path.isdir(target) != folder:
            kind = "a file, not a folder" if folder else "a folder, not a file"
            return f"cannot be written: it is {kind}"
        where = target
    else:
        where = os.path.dirname(target)
        while not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            return f"cannot be made: {where!r} is a file, not a folder"
        try:
            name_max = os.pathconf(where, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):   # not on this platform: the usual limit
            name_max = 255
        for name in os.path.relpath(target, where).split(os.sep):
            if len(os.fsencode(name)) > name_max:
                return (f"cannot be made: the name {name[:40]!r}... is longer than the "
                        f"{name_max} bytes this file system allows")
    if not os.access(where, os.W_OK | (os.X_OK if os.path.isdir(where) else 0)):
        return f"cannot be written: no write permission on {where!r}"
    return ""


def publish_file(tmp: str, target: str, out: str, overwrite: bool) -> None:
    """Gives the complete file at `tmp` its name `target` (`out`: the name given, for
    messages): with `overwrite` by a rename over whatever is there; else by a hard link,
    which fails rather than replace a file that appeared while this one was written (a
    rename where links are not supported), and `tmp` is left for the caller to remove.
    Raises ValueError when such a file appeared, OSError when the rename fails."""
    if not overwrite:
        try:
            os.link(tmp, target)
            return
        except FileExistsError:
            raise ValueError(f"output {out!r} appeared while it was being prepared (another "
                             f"run?); it was left as it is: remove it or pass --overwrite") from None
        except OSError:   # a file system without hard links
            if os.path.exists(target):
                raise ValueError(f"output {out!r} appeared while it was being prepared; it "
                                 f"was left as it is: remove it or pass --overwrite") from None
    os.replace(tmp, target)


def fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_file(target: str, out: str, overwrite: bool):
    """Yields a binary file opened under a temporary name beside `target` (`out`: the name
    given, for messages), after making target's missing folders. When the block ends, the
    file is flushed to disk and given its name by publish_file, and the folder synced; on
    an error or an interrupt in the block (or in the publishing) the temporary file is
    removed and nothing appears at `target`. Raises ValueError when the folder or the
    temporary file cannot be made, or as publish_file does; OSError from writing it is the
    caller's to report."""
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {out!r}: its folder cannot be made ({e.strerror or e})") from None
    tmp = os.path.join(folder, f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:   # from the temporary file's creation on, its removal is certain
        try:
            f = open(tmp, "wb")
        except OSError as e:
            raise ValueError(f"output {out!r} cannot be written in {folder or '.'!r} "
                             f"({e.strerror or e})") from None
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish_file(tmp, target, out, overwrite)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_folder(folder)
