"""A ``wilds_run`` folder owned by one live run: its lock, its default name, resume compatibility.

- **Lock**: the run holds an exclusive ``flock`` on the folder itself for as long as it lives. The
  kernel drops the lock when the process ends in any way (``kill -9`` included), so a crashed run
  never leaves the folder stuck, and no lock file is left behind.
- **Default name**: ``runs/<dataset>[_<test domains>]_<model>_<method>[_w<bits>]_seed<seed>``, so
  that default runs differing in any of these never meet in one folder.
- **Resume**: a resumed run must compute what the interrupted one computed; only settings of
  where and how fast it runs (``RESUME_MAY_CHANGE``) may differ.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import warnings
from pathlib import Path
from typing import Any

from dg_quant.errors import CheckpointError, ConfigError, OutputError

# Settings a resumed run may change: they move the run or change its speed, not what it computes
# (a change of device, precision or worker count can change the last digits, not the method).
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "log_dir",
        "root_dir",
        "download",
        "no_progress",
        "device",
        "num_workers",
        "eval_batch_size",
        "precision",
        "channels_last",
        "compile",
        "quant_kernels",
        "save_every",
        "weights",
        "plugin",
        "config",
        "logger",  # the record sinks (TensorBoard, CSV) do not change results
        "threads",  # how fast, not what
    }
)


def default_log_dir(config: argparse.Namespace, plugin_names: list[str]) -> str:
    """``runs/<dataset>[_<test domains>]_<model>_<method>[_w<bits>]_seed<seed>``."""
    method = "+".join(n.rsplit(".", 1)[-1] for n in plugin_names) or "erm"
    parts = [config.dataset]
    if getattr(config, "test_domain", None):
        parts.append(str(config.test_domain).replace(",", "+"))
    parts += [str(config.model).replace("/", "-").replace(":", "-"), method]
    if plugin_names and getattr(config, "bits", None) is not None:
        parts.append(f"w{config.bits}")
    parts.append(f"seed{config.seed}")
    return str(Path("runs") / "_".join(parts))


class RunFolder:
    """The output folder of one run, locked while the run lives (``with RunFolder(path) as folder``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.created = False
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        self.claim()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.remove_if_unused()
        self.release()

    def claim(self) -> None:
        """Create the folder if needed and lock it; ConfigError if another live run holds it."""
        try:
            if not self.path.is_dir():
                self.path.mkdir(parents=True)
                self.created = True
            fd = os.open(self.path, os.O_RDONLY)
        except FileExistsError:
            raise ConfigError(f"--log_dir {self.path} is a file; choose a folder") from None
        except OSError as exc:
            raise OutputError(
                f"cannot create --log_dir {self.path}: {exc.strerror}; choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise ConfigError(
                    f"--log_dir {self.path} is in use by another running wilds_run; wait for it to end "
                    "or choose another --log_dir"
                ) from None
            warnings.warn(f"cannot lock {self.path} ({exc.strerror}); make sure no other run uses it", stacklevel=2)
        self._fd = fd
        if not os.access(self.path, os.W_OK):
            self.release()
            raise OutputError(f"--log_dir {self.path} is not writable; choose a writable folder")
        # imported here: dg_quant.io loads torch, and wilds_run --help should not wait for it
        from dg_quant.io import remove_stale_temporaries

        remove_stale_temporaries(self.path)  # what a killed writer left; we own the folder now

    def remove_if_unused(self) -> None:
        """Remove the folder if this run created it and wrote nothing into it (a failed start)."""
        if self.created:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_resume_settings(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume ``path`` (written with ``saved`` settings) under different ``current`` ones."""
    saved_plugins = list(saved.get("plugins") or [])
    current_plugins = list(current.get("plugins") or [])
    if saved_plugins != current_plugins:
        flags = " ".join(f"--plugin {p}" for p in saved_plugins) or "no --plugin"
        raise CheckpointError(
            f"{path} was written by a run with plugins [{', '.join(saved_plugins)}], this one has "
            f"[{', '.join(current_plugins)}]; resume with {flags} (and the same settings) or choose another --log_dir"
        )
    for key in sorted(saved.keys() & current.keys() - RESUME_MAY_CHANGE):
        if saved[key] != current[key]:
            raise CheckpointError(
                f"{path} was written with {key}={saved[key]!r}, this run has {current[key]!r}; "
                "resume with the same settings or choose another --log_dir"
            )
