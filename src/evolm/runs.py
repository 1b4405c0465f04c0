"""The life of a run, for `evolm es` and `evolm search` alike: its folder (created without silent
overwrites, written atomically), its log file, the check of a resumed config, and listing runs."""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolm.errors import UserError, ctrl_c_behind, remember_log


class RunDirError(UserError, RuntimeError):
    """A run folder cannot be used as asked; the message says what to do instead."""


# Written when a run folder is created: what makes a folder an evolm run that --overwrite, `runs list
# --cleanup` and `export` may delete (a config.yaml alone could be any program's).
RUN_MARKER = ".evolm-run"
RUN_FORMAT = 1  # the run folder layout's version, in the marker
LOCK_FILE = ".evolm-lock"  # held (flock) by the process writing the run; the kernel drops it when that dies
EXPORT_INFO = "evolm.json"  # written into every export: what it was evolved from; export replaces only these


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target; on any
    failure (a full disk) the temporary file is removed and the target keeps its old content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming_the_file(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



@contextmanager
def stop_signals_to(handler, signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Inside the block these signals (Ctrl-C and SIGTERM) call `handler(signum, frame)`; afterwards they do
    what they did. Off the main thread no signal arrives, and nothing is installed."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

@contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """An OSError from a write or fsync (a full disk) carries no file name; give it `path`'s."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Serialised in memory first (checkpoints are small), so a write error is a plain OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file, gzipped where its name ends in .gz (kept completions compress ten-fold, which
    matters for run folders committed beside a write-up); a missing file or a half-written line (a run still
    going) is skipped."""
    if not path.is_file():
        return []
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    except (EOFError, gzip.BadGzipFile) as exc:
        raise RunDirError(f"{path}: not a whole gzip file ({exc})") from None
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_the_file(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluations_by_set(rows: list[dict], default: str = "test") -> dict[str, list[dict]]:
    """Rows of results/evaluations.jsonl grouped by their `set` (rows of runs made before evaluation sets
    existed have none: they are the test split's), each group in file order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("set", default), []).append(row)
    return groups


def evaluations_summary(rows: list[dict], step_key: str, last: int, finished: bool) -> dict:
    """What a summary says of a run's evaluations: base (step 0), final (step `last`, when the run finished)
    and last evaluated, of the test split at the top level and of each eval.sets set under "sets"."""
    by_set = {name: {r[step_key]: r for r in group} for name, group in evaluations_by_set(rows).items()}

    def outline(evaluations: dict[int, dict]) -> dict:
        return {"base": evaluations.get(0), "final": evaluations.get(last) if finished else None,
                "last_evaluated": evaluations[max(evaluations)] if evaluations else None}

    return {**outline(by_set.get("test", {})), "sets": {name: outline(e) for name, e in by_set.items() if name != "test"}}


@dataclass
class RunDir:
    """Where everything of one run lives, the one place that names a run folder's files (README: "A run folder holds")."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def history_file(self) -> Path:
        return self.results / "history.jsonl"

    @property
    def evaluations_file(self) -> Path:
        return self.results / "evaluations.jsonl"

    @property
    def best_file(self) -> Path:
        """results/best.json: the generation whose θ scored best on eval.keep_best's set, and the score."""
        return self.results / "best.json"

    def best_export_dir(self, space_kind: str) -> Path:
        """Where the best θ goes: best/adapter (lora) or best/model (full spaces)."""
        return self.root / "best" / self.export_dir(space_kind).name

    @property
    def resumes_file(self) -> Path:
        """One line per --resume: when, and which settings it changed ({key: [before, after]})."""
        return self.results / "resumes.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.results / "summary.json"

    @property
    def checkpoints(self) -> Path:
        """An ES run's latest.pt, or a GRPO run's TRL checkpoint folders."""
        return self.root / "checkpoints"

    @property
    def checkpoint_file(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def export_dir(self, space_kind: str) -> Path:
        """Where a run's final θ goes: a PEFT adapter for lora, a whole model folder for the full spaces."""
        return self.adapter_dir if space_kind == "lora" else self.model_dir

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def database(self) -> Path:
        """A search run's variants, lineage and metrics (SQLite); what several workers share."""
        return self.root / "run.db"

    @property
    def analysis(self) -> Path:
        """`evolm analyze`'s figures and report of a search run."""
        return self.root / "analysis"

    @property
    def best_adapter_dir(self) -> Path:
        """A search run's best adapter so far."""
        return self.root / "best_adapter"

    @property
    def marker_file(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def is_marked(self) -> bool:
        """Whether evolm made this folder (the only runs evolm ever deletes)."""
        return self.marker_file.is_file()

    @property
    def is_unmarked_run(self) -> bool:
        """A run of an evolm older than run markers: config.yaml beside results, a checkpoint or run.db."""
        return not self.is_marked and self.config_file.is_file() and any(
            p.exists() for p in (self.history_file, self.checkpoint_file, self.database))

    def mark(self) -> None:
        if not self.is_marked:
            atomic_write_text(self.marker_file, json.dumps({"format": RUN_FORMAT}) + "\n")

    @classmethod
    def create(cls, path: str | Path, overwrite: bool) -> "RunDir":
        """A fresh run folder holding only its marker; a non-empty one is only emptied when `overwrite` is
        set, it is a marked run and no process holds it. Call it once the run can start (config valid, data
        and model loaded): `refuse_busy_dir` first, to fail fast, then this, so a run that cannot start never
        costs the old one. Every writer makes the subfolders it writes into."""
        root = Path(path)
        refuse_busy_dir(root, overwrite)
        if root.is_dir() and any(root.iterdir()):
            with cls(root).lock():  # not while another process writes it
                shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root)
        run.mark()
        return run

    @contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Hold the run while the block writes it: exclusive for an ES run (a second writer is refused with
        one line), shared for `evolm search` workers, which share a run by design. The kernel drops the
        lock of a process that died, so a lock file left behind (a kill -9) is no obstacle. Marks an
        older run (it is being resumed, so it is evolm's)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "an evolm search worker"
                raise RunDirError(f"{self.root} is in use by another process ({holder}); wait for it to end or "
                                  "stop it, then try again") from None
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            if self.config_file.is_file():
                self.mark()
            yield
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not run.config_file.is_file():
            raise RunDirError(f"{path} is not a run folder (no config.yaml)")
        return run

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(state, self.checkpoint_file)

    def load_checkpoint(self) -> dict | None:
        """The checkpoint, None when there is none yet; an unreadable one is a RunDirError saying what to do."""
        if not self.checkpoint_file.is_file():
            return None
        try:
            # weights only: a checkpoint from a shared run folder must not be able to run code
            state = torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # EOFError, RuntimeError, UnpicklingError … for a damaged or crafted file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunDirError(
                f"checkpoint {self.checkpoint_file} is unreadable (truncated, corrupted or not weights only: "
                f"{reason}); delete it to "
                f"restart this run from generation 0, or start a new run") from None
        if not isinstance(state, dict) or "strategy" not in state:
            raise RunDirError(f"checkpoint {self.checkpoint_file} is not an evolm checkpoint (no strategy state); "
                              "delete it to restart this run from generation 0, or start a new run")
        return state


def changed_keys(saved: dict, wanted: dict) -> list[str]:
    """Dotted keys whose values differ between two nested configs, sorted; each command decides
    which of them a resumed run may change."""
    before, after = flatten(saved), flatten(wanted)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def flatten(tree: Any, key: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value}."""
    if not isinstance(tree, dict) or not tree:  # an empty section is a value, so filling it is a change
        return {key: tree}
    return {leaf: value for name, child in tree.items()
            for leaf, value in flatten(child, f"{key}.{name}" if key else str(name)).items()}


def is_under(key: str, sections: Iterable[str]) -> bool:
    """Whether dotted `key` is one of `sections` or lies inside one (`space.rank` is under `space`)."""
    return any(key == section or key.startswith(section + ".") for section in sections)


@contextmanager
def log_to_file(path: Path | None, *, echo: bool = False) -> Iterator[None]:
    """The `evolm` logger writes INFO and above to `path` while the block runs, and stops on leaving
    it, so a second run in the same process does not write into the first one's log. `path` None
    (ranks other than 0) writes no file; `echo` also prints to stderr, for commands without a
    progress bar."""
    logger = logging.getLogger("evolm")
    handlers: list[logging.Handler] = []
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if echo:
        handlers.append(logging.StreamHandler())
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    except Exception as exc:
        # the traceback the command's one line points to (a Ctrl-C that surfaced as another error is no failure)
        if path is not None and not isinstance(exc, UserError) and not ctrl_c_behind(exc):
            logger.exception("internal error")
            remember_log(exc, path)
        raise
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


def refuse_busy_dir(root: Path, overwrite: bool) -> None:
    """Raise unless `root` is absent or empty, or is a marked run that `overwrite` allows replacing. A
    folder that is not a run is never deleted: the user empties it, there is no force."""
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output_dir {root} exists and is not a folder")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not overwrite:
        raise RunDirError(
            f"output_dir {root} is not empty; pass --overwrite to replace it, "
            f"--resume {root} to continue it, or choose another output_dir"
        )
    run = RunDir(root)
    if run.is_unmarked_run:
        raise RunDirError(
            f"output_dir {root} is a run of an older evolm (no {RUN_MARKER} marker), which --overwrite does not "
            f"delete: --resume {root} continues it (and marks it), or delete the folder yourself")
    if not run.is_marked:
        raise RunDirError(
            f"output_dir {root} is not empty and is not an evolm run (no {RUN_MARKER} marker): --overwrite only "
            "replaces runs; choose another output_dir, or delete the folder yourself if nothing in it matters"
        )


def refuse_foreign_export_dir(out: Path, run: RunDir) -> None:
    """`export RUN DIR` writes DIR anew: DIR must be absent, empty, or an earlier export of evolm (it holds
    evolm.json, or only a PEFT adapter's two files, as exports before evolm.json wrote); anything else,
    the run itself or a folder holding runs, is refused and left as it is."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a folder; give a new folder to export to")
    if not out.is_dir() or not any(out.iterdir()):
        return
    names = {p.name for p in out.iterdir()}
    if out.resolve() == run.root.resolve() or RUN_MARKER in names or "config.yaml" in names:
        raise RunDirError(f"{out} is a run folder; export into a new folder (e.g. {run.root / 'export'})")
    if EXPORT_INFO in names or names == {"adapter_config.json", "adapter_model.safetensors"}:
        return
    raise RunDirError(f"{out} is not empty and is not an earlier evolm export (no {EXPORT_INFO}); export writes "
                      "only into a new or empty folder or over an earlier export: choose another folder")


def refuse_ignored_resume_arguments(config_source: str | None, overrides: list[str], overwrite: bool) -> None:
    """`--resume RUN` continues RUN with its own config.yaml in RUN: a config file, an output_dir or
    --overwrite next to it would be silently ignored, so they are refused."""
    if config_source is not None:
        raise RunDirError(f"--resume continues a run with its own config.yaml; drop '{config_source}' "
                          "(key=value overrides may follow --resume RUN)")
    if any(item.partition("=")[0].strip() == "output_dir" for item in overrides):
        raise RunDirError("--resume RUN writes into RUN; drop output_dir=… (start a new run to write elsewhere)")
    if overwrite:
        raise RunDirError("--overwrite replaces a run and --resume continues one: give only one of them")


def fresh_dir_beside(final: Path) -> Path:
    """A new empty folder next to `final`, named so no folder of the user's can be it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place, so a reader never sees half of it."""
    old = None
    if final.exists():
        old = fresh_dir_beside(final)
        old.rmdir()
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_summary(run: RunDir) -> dict:
    """results/summary.json, or a status saying why there is none to read."""
    if not run.summary_file.is_file():
        return {}
    try:
        summary = json.loads(run.summary_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "summary.json unreadable"}
    return summary if isinstance(summary, dict) else {"status": "summary.json unreadable"}


def list_runs(root: Path) -> list[dict]:
    """Every run folder below `root` (ES and search; marked, or of an older evolm), newest first; `path`
    relative to `root`, `marked` whether evolm may delete it."""
    if not Path(root).is_dir():
        raise RunDirError(f"{root} is not a folder; give the folder that holds your runs (default: runs)")
    rows = []
    for config in sorted(Path(root).glob("**/config.yaml")):
        run = RunDir(config.parent)
        if not (run.is_marked or run.is_unmarked_run):
            continue
        history = read_jsonl(run.history_file)
        summary = read_summary(run)
        last = history[-1] if history else {}
        files = [p for p in run.root.rglob("*") if p.is_file()]
        rows.append(
            {
                "path": str(run.root.relative_to(root)),
                "modified": max(p.stat().st_mtime for p in files),
                "generations": len(history),
                "last_mean_fitness": last.get("mean"),
                "final": summary.get("final") if isinstance(summary.get("final"), dict) else None,
                "status": summary.get("status", "running or stopped" if history else "new"),
                "size_mb": sum(p.stat().st_size for p in files) / 2**20,
                "marked": run.is_marked,
            }
        )
    rows.sort(key=lambda r: r["modified"], reverse=True)
    return rows


def cleanup_candidates(rows: list[dict], keep: int) -> tuple[list[str], list[str]]:
    """The one rule for what --cleanup deletes: (the marked runs beyond the `keep` most recently modified of
    them, the unmarked runs of an older evolm, which are never deleted)."""
    return [r["path"] for r in rows if r["marked"]][keep:], [r["path"] for r in rows if not r["marked"]]


def cleanup_runs(root: Path, paths: list[str]) -> list[str]:
    """Delete these runs below `root` where each is still a marked run no process holds; returns what was
    deleted."""
    deleted = []
    for path in paths:
        run = RunDir(Path(root) / path)
        if not run.is_marked:
            continue
        try:
            with run.lock():
                shutil.rmtree(run.root)
        except RunDirError as exc:
            logging.getLogger("evolm").warning("kept %s: %s", path, exc)
            continue
        deleted.append(path)
    return deleted


def format_age(timestamp: float) -> str:
    seconds = time.time() - timestamp
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"
