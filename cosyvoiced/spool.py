"""The spool directory, with maildir discipline.

    inbox/   clients drop job files here (write to a dotfile or *.tmp/*.part, then rename)
    work/    a job is claimed by renaming it here as ``<job id>~<original name>``
    outbox/  results: ``OUT.<ext>`` and its ``OUT.json`` record, each written to a temp
             name, fsynced and renamed (the audio written by the encoder process and
             fsynced on its saving thread, off the tick); the record goes last and marks
             the job done
    failed/  inputs that could not be served, each with ``NAME.error.json``
    prompts/ prompt audio a job claimed (``<job id>~<name>``): deleted when the job is
             done, moved to failed/ beside its job when it fails, handed back with it
    attempts/ ``<job id>``: in how many lives of the daemon the job was started and not
             let go by a clean stop (crashes), written before its first segment is handed
             out; a job left in work/ by two crashes in a row is not run a third time (the
             worker's poison rule, for the daemon)

The spool's own directory also holds, unnamed (O_TMPFILE), the audio so far of long whole
replies in progress (replyaudio.py).

A job in `work/` is finished when its record (which carries the job id) exists in `outbox/`
or `failed/`; only then is the `work/` entry removed. After a crash, the same check tells a
finished job from one to run again, so no input ever ends twice or not at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosyvoiced import logs
from cosyvoiced.job import ErrorCode, JobError, JobFailure

log = logs.get_logger("cosyvoiced.spool")

WORK_SEPARATOR = "~"
IGNORED_SUFFIXES = (".tmp", ".part")
# Prompt audio waits in the inbox for the job file that names it; never a job itself.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au")
ERROR_SUFFIX = ".error.json"
ADMIN_TOKEN_NAME = "admin.token"  # noqa: S105 - the file's name, not a secret
RECORD_SUFFIX = ".json"
POSING_SUFFIX = ".input"  # after an input named as an error record (see _failed_names)
# A job file's name is cut to this many bytes when it is claimed: the names made from it
# (work/'s "JOBID~NAME", failed/'s ".JOBID~NAME.error.json.XXXXXXXX.tmp") stay under
# NAME_MAX, 255 bytes; a longer one could be neither claimed nor failed.
MAX_INPUT_NAME_BYTES = 200
DEFAULT_MAX_PROMPT_BYTES = 16 << 20  # http.max_upload_bytes' default
_MAX_SUFFIX_CHARS = 16  # a longer "suffix" is part of the name, not its type


def short_name(name: str) -> str:
    """`name` if it fits MAX_INPUT_NAME_BYTES; else its start, cut on a character, and its
    suffix (the job's type)."""
    if len(os.fsencode(name)) <= MAX_INPUT_NAME_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > _MAX_SUFFIX_CHARS:
        stem, dot, suffix = name, "", ""
    room = MAX_INPUT_NAME_BYTES - len(os.fsencode(dot + suffix))
    stem = stem[:room]  # a character is one byte or more
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem + dot + suffix


def is_job_candidate(name: str) -> bool:
    """Dotfiles and *.tmp/*.part are writers' scratch names, not jobs (yet); audio files
    are prompts that a job file claims."""
    return not name.startswith(".") and not name.lower().endswith(
        IGNORED_SUFFIXES + AUDIO_SUFFIXES)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP_TOKEN_BYTES = 4


def _temp_pattern(name: str = ".+") -> re.Pattern[str]:
    """The temp names `atomic_write` gives `name` (any name by default)."""
    return re.compile(rf"^\.{name}\.[0-9a-f]{{{2 * _TEMP_TOKEN_BYTES}}}\.tmp$")


def atomic_write(directory: Path, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write `directory/name` so that a reader sees either nothing or all of it."""
    commit(stage(directory, name, data, mode), directory / name)


def _new_temp(directory: Path, name: str, mode: int = 0o644) -> tuple[Path, int]:
    """A new temp file beside `name` (a unique name, never a link), open to write."""
    temp = directory / f".{name}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp"
    return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def stage(directory: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    """`atomic_write`'s first half: `data` in a temp file beside `name`, fsynced. Any thread
    may do it (the temp name is unique); a temp never committed goes at the next start."""
    temp, fd = _new_temp(directory, name, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


@dataclass
class StagedFile:
    """`stage` for a file another process writes (encoding.py's `Staging`): created empty
    under a temp name, written by the encoder process, fsynced here, then `commit`ted."""

    directory: Path
    name: str
    path: Path | None = None

    def create(self) -> str:
        if self.path is None:
            self.path, fd = _new_temp(self.directory, self.name)
            os.close(fd)
        return str(self.path)

    def settle(self) -> None:
        assert self.path is not None, "settled once written"
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def commit(temp: Path, path: Path) -> None:
    """`atomic_write`'s second half: the staged temp file becomes `path`."""
    try:
        os.rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_temp_files(directory: Path, name: str | None = None) -> list[str]:
    """Delete what `atomic_write` left in `directory` when the process died mid-write (of
    `name` only, if given): never a result, since only the rename commits one."""
    pattern = _temp_pattern(re.escape(name) if name else ".+")
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(source: Path, target: Path) -> bool:
    """Rename unless `target` exists (atomically, via renameat2); False if it does."""
    result = _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                             _RENAME_NOREPLACE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    raise OSError(code, os.strerror(code), str(source))


def _json_bytes(record: dict[str, Any]) -> bytes:
    # A file name that is not UTF-8 reaches us with surrogates (surrogateescape), which
    # UTF-8 cannot encode: written as JSON's own \\udcXX escapes instead.
    return (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode(
        errors="backslashreplace")


def _record_job_id(path: Path) -> str | None:
    try:
        with path.open("rb") as stream:
            return str(json.load(stream).get("job"))
    except (OSError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class Claimed:
    """A job file owned by the daemon, in `work/`."""

    work_name: str
    claimed_at: float = field(default_factory=time.time, compare=False)

    @classmethod
    def named(cls, job_id: str, original_name: str) -> Claimed:
        return cls(f"{job_id}{WORK_SEPARATOR}{original_name}")

    @property
    def job_id(self) -> str:
        return self.work_name.split(WORK_SEPARATOR, 1)[0]

    @property
    def original_name(self) -> str:
        return self.work_name.split(WORK_SEPARATOR, 1)[1]

    @property
    def stem(self) -> str:
        name = self.original_name
        return name.rsplit(".", 1)[0] if "." in name else name

    @property
    def suffix(self) -> str:
        name = self.original_name
        return name.rsplit(".", 1)[1].lower() if "." in name else ""


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.inbox = self.root / "inbox"
        self.work = self.root / "work"
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"
        self.prompts = self.root / "prompts"
        self.attempts = self.root / "attempts"
        # Set from http.max_upload_bytes by the service: a dropped prompt's bound is an
        # uploaded one's.
        self.max_prompt_bytes = DEFAULT_MAX_PROMPT_BYTES

    def ensure(self) -> None:
        for directory in (self.inbox, self.work, self.outbox, self.failed, self.prompts,
                          self.attempts):
            directory.mkdir(parents=True, exist_ok=True)

    # intake
    def inbox_names(self) -> Generator[str, None, None]:
        """Every name in `inbox/`, job candidate or not (a scan's step counts each name it
        looks at), in the directory's order, read as they are asked for (a folder of a
        million files is never listed at once)."""
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                yield entry.name

    def claim(self, name: str, job_id: str) -> Claimed | None:
        """Take `inbox/name` for ourselves (under `short_name`); None if it is gone
        (claimed already)."""
        claimed = Claimed.named(job_id, short_name(name))
        try:
            os.rename(self.inbox / name, self.work / claimed.work_name)
        except FileNotFoundError:
            return None
        return claimed

    def write_claimed(self, job_id: str, name: str, data: bytes) -> Claimed:
        """Persist a job that arrived another way (ZeroMQ `submit`) as if claimed."""
        claimed = Claimed.named(job_id, name)
        atomic_write(self.work, claimed.work_name, data)
        return claimed

    def claimed(self) -> list[Claimed]:
        """Jobs left in `work/`, oldest first (job ids sort by creation time)."""
        return [Claimed(name) for name in sorted(os.listdir(self.work))
                if WORK_SEPARATOR in name and is_job_candidate(name)]

    def read(self, claimed: Claimed, max_bytes: int) -> bytes:
        """The claimed file's bytes; refuses links, non-files and oversized files."""
        path = self.work / claimed.work_name
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise JobFailure(ErrorCode.SYMLINK, "the job file is a symbolic link; drop the "
                             "file itself, links are never followed")
        if not stat.S_ISREG(info.st_mode):
            raise JobFailure(ErrorCode.NOT_REGULAR_FILE, "the job is not a regular file")
        if info.st_size > max_bytes:
            raise JobFailure(ErrorCode.FILE_TOO_LARGE, f"the job file is {info.st_size} bytes; "
                             f"the limit is {max_bytes} (spool.max_file_bytes)")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except PermissionError:
            raise JobFailure(ErrorCode.UNREADABLE, "the daemon may not read the job file; "
                             "make it readable by the cosyvoiced-submit group") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise JobFailure(ErrorCode.SYMLINK, "the job file is a symbolic link") from None
            raise
        with os.fdopen(fd, "rb") as stream:
            _check_one_name(os.fstat(fd), "the job file")
            data = stream.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise JobFailure(ErrorCode.FILE_TOO_LARGE,
                             f"the job file is over the limit of {max_bytes} bytes")
        return data

    # outcomes
    def _result_names(self, output: str, job_id: str) -> tuple[str, str]:
        return output, f"{output}-{job_id}"

    def finished_result(self, claimed: Claimed, output: str) -> str | None:
        """The base name of this job's result in the outbox, if it was published."""
        for base in self._result_names(output, claimed.job_id):
            if _record_job_id(self.outbox / (base + RECORD_SUFFIX)) == claimed.job_id:
                return base
        return None

    def staged_result(self, claimed: Claimed, extension: str) -> StagedFile:
        """Where a result's audio is written under a temp name in the outbox, by the encoder
        process (the slow part of publishing a long one, done off the tick)."""
        return StagedFile(self.outbox, f"{claimed.job_id}.{extension}")

    def publish_result(self, claimed: Claimed, output: str, extension: str, staged: Path,
                       record: dict[str, Any], *, beside: dict[str, bytes] | None = None
                       ) -> str:
        """Put the `staged` audio and the files `beside` it (extension -> bytes: captions) in
        place, then its record (the commit point), then release the work file. A staged file
        that cannot be put in place is deleted, not left in outbox/ until a restart."""
        base, unique = self._result_names(output, claimed.job_id)
        try:
            taken = _record_job_id(self.outbox / (base + RECORD_SUFFIX))
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if taken not in (None, claimed.job_id):
            base = unique  # another job's result has that name: never overwrite it
        commit(staged, self.outbox / f"{base}.{extension}")  # deletes it if it cannot
        for kind, data in (beside or {}).items():
            atomic_write(self.outbox, f"{base}.{kind}", data)
        atomic_write(self.outbox, base + RECORD_SUFFIX,
                     _json_bytes(record | {"job": claimed.job_id,
                                           "file": f"{base}.{extension}"}))
        self.release(claimed)
        return base

    def _failed_names(self, claimed: Claimed) -> tuple[str, str]:
        """The input's name in failed/ (its record's, less ERROR_SUFFIX), and the one it
        takes if that is taken."""
        if claimed.original_name.endswith(ERROR_SUFFIX):
            # Moved there as it is, it would pose as another input's error record.
            posing = f"{claimed.work_name}{POSING_SUFFIX}"
            return posing, posing
        return claimed.original_name, claimed.work_name

    def _move_to_failed(self, claimed: Claimed, name: str) -> str:
        """Move the input, and the prompt it claimed, beside its error record."""
        for prompt in self._prompts_of(claimed.job_id):
            if not rename_noreplace(prompt.path, self.failed / prompt.claimed.original_name):
                os.rename(prompt.path, self.failed / prompt.claimed.work_name)
        os.rename(self.work / claimed.work_name, self.failed / name)
        _fsync_dir(self.failed)
        self.clear_attempts(claimed.job_id)
        return name

    def resume_failure(self, claimed: Claimed) -> str | None:
        """Finish a failure recorded before a crash: move the input beside its record."""
        for name in self._failed_names(claimed):
            if _record_job_id(self.failed / (name + ERROR_SUFFIX)) == claimed.job_id:
                return self._move_to_failed(claimed, name)
        return None

    def publish_failure(self, claimed: Claimed, error: JobError) -> str:
        """Write the error record (the commit point), then move the input beside it; or
        only move it, if its record was written before and the move refused (a full disk:
        the job book tries again), so that its record is written once."""
        resumed = self.resume_failure(claimed)
        if resumed is not None:
            return resumed
        name, unique = self._failed_names(claimed)
        if os.path.lexists(self.failed / name) or os.path.lexists(
                self.failed / (name + ERROR_SUFFIX)):
            name = unique  # an earlier input of that name failed too: keep both
        record = {"job": claimed.job_id, "input": claimed.original_name} | error.to_dict()
        atomic_write(self.failed, name + ERROR_SUFFIX, _json_bytes(record))
        return self._move_to_failed(claimed, name)

    def release(self, claimed: Claimed) -> None:
        (self.work / claimed.work_name).unlink(missing_ok=True)
        self.clear_attempts(claimed.job_id)
        self.discard_prompts(claimed.job_id)

    # the admin token: whoever can read it (root, the daemon's user) is a local admin
    @property
    def admin_token_path(self) -> Path:
        return self.root / ADMIN_TOKEN_NAME

    def new_admin_token(self) -> str:
        """A fresh token for this life of the daemon, readable by its user alone; "" (no
        local admin this life, said in the log) if the spool's disk would not take it: a
        full disk stopped the daemon at every start, its network intakes with it."""
        token = secrets.token_urlsafe(32)
        try:
            atomic_write(self.root, ADMIN_TOKEN_NAME, token.encode(), mode=0o600)
        except OSError as error:
            with contextlib.suppress(OSError):  # an old life's token would only mislead
                self.admin_token_path.unlink(missing_ok=True)
            log.error("admin_token_unwritable", path=str(self.admin_token_path),
                      error=str(error), message="no admin token this life of the daemon: "
                      "cosyvoicectl is an ordinary client (its own jobs only) until the "
                      "daemon starts again with room on the spool's disk")
            return ""
        return token

    # crash-safe recovery
    def attempts_of(self, job_id: str) -> int:
        """In how many lives of the daemon this job was started, less those a clean stop
        ended (`uncount_attempt`): the crashes it was in hand for (0: none, or unreadable)."""
        try:
            return int((self.attempts / job_id).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def count_attempt(self, job_id: str) -> int:
        """One more life in which the job starts; durable before it is handed out."""
        return self._set_attempts(job_id, self.attempts_of(job_id) + 1)

    def uncount_attempt(self, job_id: str) -> int:
        """This life's start of the job is not counted after all (a stop, not a crash,
        ended it); the lives left that were."""
        return self._set_attempts(job_id, max(0, self.attempts_of(job_id) - 1))

    def _set_attempts(self, job_id: str, attempts: int) -> int:
        if attempts:
            atomic_write(self.attempts, job_id, str(attempts).encode())
        else:
            self.clear_attempts(job_id)
        return attempts

    def clear_attempts(self, job_id: str) -> None:
        (self.attempts / job_id).unlink(missing_ok=True)

    def hand_back(self, claimed: Claimed) -> bool:
        """Return an unstarted job to the inbox under its own name, its prompt audio first,
        so that the job finds it when it is claimed again. False if any of those names is
        taken there (a new drop), or if a prompt cannot be made its submitter's again (the
        daemon's own copy, where it may not chown: `_give_back_prompts`): the job stays in
        work/ with its prompts, claimed, for the next start. (A prompt left behind was
        deleted at the next start as an orphan, and the job took the new file of its name:
        another's voice.)"""
        self.clear_attempts(claimed.job_id)
        prompts = self._prompts_of(claimed.job_id)
        if not self._give_back_prompts(claimed, prompts):
            return False  # claimed, its prompt is its own with no owner check again
        returned: list[_Prompt] = []
        for prompt in prompts:
            if not rename_noreplace(prompt.path, self.inbox / prompt.claimed.original_name):
                self._reclaim(returned)
                return False
            returned.append(prompt)
        if rename_noreplace(self.work / claimed.work_name, self.inbox / claimed.original_name):
            return True
        self._reclaim(returned)
        return False

    def _reclaim(self, returned: list[_Prompt]) -> None:
        """Take back the prompts just handed back for a job that stays in work/."""
        for prompt in returned:
            os.rename(self.inbox / prompt.claimed.original_name, prompt.path)

    # prompt audio
    def claim_prompt(self, job: Claimed, name: str) -> Path:
        """Take `inbox/name` as this job's prompt (or find it, claimed before a restart)."""
        if not name.lower().endswith(AUDIO_SUFFIXES):  # else another job's file, or a part
            raise JobFailure(ErrorCode.INVALID_FIELD, f"prompt_audio: {name!r} is not named "
                             f"as audio ({', '.join(AUDIO_SUFFIXES)})", "prompt_audio")
        claimed = _Prompt(self.prompts, Claimed.named(job.job_id, name))
        if not claimed.path.exists():
            try:
                self._check_prompt_owner(job, name)
                os.rename(self.inbox / name, claimed.path)
            except FileNotFoundError:
                raise JobFailure(ErrorCode.PROMPT_AUDIO_NOT_FOUND, f"prompt_audio: no file "
                                 f"{name!r} in the inbox; drop the audio before the job "
                                 "file that names it", "prompt_audio") from None
        info = os.lstat(claimed.path)
        if not stat.S_ISREG(info.st_mode):
            raise JobFailure(ErrorCode.PROMPT_AUDIO_UNREADABLE, f"prompt_audio: {name!r} is "
                             "not a regular file (links are never followed)", "prompt_audio")
        _check_one_name(info, f"prompt_audio: {name!r}", "prompt_audio")
        self._check_prompt_size(name, info.st_size)
        if info.st_uid != os.getuid():
            self._own_copy(claimed.path, name)
        return claimed.path

    def _check_prompt_size(self, name: str, size: int) -> None:
        # The cache's key and the worker read the whole file: a (sparse) file of 64 GiB
        # was a MemoryError on the tick, at every start.
        if size > self.max_prompt_bytes:
            raise JobFailure(ErrorCode.FILE_TOO_LARGE, f"prompt_audio: {name!r} is {size} "
                             f"bytes; the limit is {self.max_prompt_bytes} "
                             "(http.max_upload_bytes, as for an uploaded prompt: 30 s of "
                             "audio is the most an engine takes)", "prompt_audio")

    def _own_copy(self, path: Path, name: str) -> None:
        """Replace a submitter's claimed prompt with the daemon's own copy of it: its writer
        may hold it open and change it after the cache keyed the job by its content and
        before the worker reads it (another client's cached result, in the wrong voice)."""
        data, mode = read_at_most(path, self.max_prompt_bytes + 1)
        self._check_prompt_size(name, len(data))  # it grew since it was looked at
        # The daemon's own: given back to its submitter only at a stop (`hand_back`); a
        # file of theirs in prompts/ would be theirs to change wherever they can reach it.
        atomic_write(path.parent, path.name, data, stat.S_IMODE(mode) & 0o666)

    def _check_prompt_owner(self, job: Claimed, name: str) -> None:
        """The sticky inbox keeps a submitter from taking another's drop: so does a job that
        names it (its audio was cloned, then deleted, and its owner's job failed). A job
        file of root's or the daemon's own (a ZeroMQ `submit`) may name any."""
        prompt_uid = os.lstat(self.inbox / name).st_uid  # FileNotFoundError: not dropped
        job_uid = os.lstat(self.work / job.work_name).st_uid
        refusal = _owner_refusal(job_uid, prompt_uid, name)
        if refusal is not None:
            raise JobFailure(ErrorCode.NOT_OWNER, refusal, "prompt_audio")

    def _give_back_prompts(self, claimed: Claimed, prompts: list[_Prompt]) -> bool:
        """Make the job's claimed prompts its submitter's again (they are the daemon's own
        copies, `_own_copy`), so that, handed back, it passes the owner check: a restart
        failed every queued cloning job of a non-root user (not_owner). False if the
        daemon may not (it runs as its own user): the job is then kept claimed."""
        job = os.lstat(self.work / claimed.work_name)
        for prompt in prompts:
            if _owner_refusal(job.st_uid, os.lstat(prompt.path).st_uid, "") is None:
                continue
            try:
                os.chown(prompt.path, job.st_uid, job.st_gid, follow_symlinks=False)
            except OSError:  # EPERM: not root; EINVAL: a uid unmapped in its namespace
                return False
        return True

    def write_prompt(self, job_id: str, name: str, data: bytes) -> Path:
        """Keep prompt audio that came with a request, as if claimed from the inbox."""
        work_name = Claimed.named(job_id, name).work_name
        atomic_write(self.prompts, work_name, data)
        return self.prompts / work_name

    def remove_temp_files(self) -> list[str]:
        """The daemon's own temp files in the directories it writes (not inbox/: the temp
        names there are clients')."""
        return [f"{directory.name}/{name}"
                for directory in (self.work, self.outbox, self.failed, self.prompts,
                                  self.attempts)
                for name in remove_temp_files(directory)]

    def discard_prompts(self, job_id: str) -> None:
        for prompt in self._prompts_of(job_id):
            prompt.path.unlink(missing_ok=True)

    def discard_orphan_attempts(self) -> None:
        """Attempt counts whose job is no longer in work/ (a crash after its outcome)."""
        live = {claimed.job_id for claimed in self.claimed()}
        for name in os.listdir(self.attempts):
            if name not in live:
                self.clear_attempts(name)

    def discard_orphan_prompts(self) -> list[str]:
        """Prompts whose job is no longer in work/ (a crash between the two deletions)."""
        live = {claimed.job_id for claimed in self.claimed()}
        orphans = [prompt for prompt in self._prompts_of("")
                   if prompt.claimed.job_id not in live]
        for prompt in orphans:
            prompt.path.unlink(missing_ok=True)
        return [prompt.claimed.work_name for prompt in orphans]

    def _prompts_of(self, job_id: str) -> list[_Prompt]:
        prefix = f"{job_id}{WORK_SEPARATOR}" if job_id else ""
        try:
            names = os.listdir(self.prompts)
        except FileNotFoundError:
            return []
        return [_Prompt(self.prompts, Claimed(name)) for name in names
                if name.startswith(prefix) and WORK_SEPARATOR in name]


@dataclass(frozen=True)
class _Prompt:
    """A job's prompt audio in prompts/, named like a claimed job file."""

    directory: Path
    claimed: Claimed

    @property
    def path(self) -> Path:
        return self.directory / self.claimed.work_name


def read_at_most(path: Path, max_bytes: int) -> tuple[bytes, int]:
    """At most `max_bytes` of a regular file, and its mode, never following a link nor
    waiting on a FIFO: a prompt's, read on the tick (OSError if it cannot be)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as stream:
        return stream.read(max_bytes), os.fstat(fd).st_mode


def _owner_refusal(job_uid: int, prompt_uid: int, name: str) -> str | None:
    """Why a job file of `job_uid`'s may not name a prompt of `prompt_uid`'s; None if it
    may (a job file of root's or the daemon's own, a ZeroMQ `submit`, may name any)."""
    if job_uid in (0, os.getuid()):
        return None
    hidden = unseen_owner_uid()
    if hidden in (prompt_uid, job_uid):
        return (f"prompt_audio: who dropped {name!r} cannot be told: the daemon runs in a "
                "user namespace that shows other users' files as uid "
                f"{hidden}'s (systemd's PrivateUsers=); a job may name its own user's "
                "audio only")
    if prompt_uid != job_uid:
        return (f"prompt_audio: {name!r} was dropped by another user than this job file's; "
                "a job may name its own user's audio only")
    return None


@functools.cache
def unseen_owner_uid() -> int | None:
    """The uid a file shows when its owner is not mapped into this process's user namespace
    (the kernel's overflow uid): systemd's PrivateUsers=, a container. Every submitter's
    file is then one owner's, and the owner check would take any two for the same user.
    None where every uid is seen as it is (the initial namespace)."""
    try:
        if Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]:
            return None
        return int(Path("/proc/sys/kernel/overflowuid").read_text())
    except (OSError, ValueError):
        return None


def _check_one_name(info: os.stat_result, what: str, field: str | None = None) -> None:
    """A file with another name (a hard link) may be anyone's that the daemon can read,
    linked into the inbox by one who cannot (as postfix's safe_open, one link only)."""
    if info.st_nlink > 1:
        raise JobFailure(ErrorCode.HARD_LINK, f"{what} has {info.st_nlink - 1} other name(s) "
                         "(hard links); drop a copy of the file itself", field)
