"""Where a defense trial keeps its checkpoints, so that a trial Ray moves to another node resumes
there instead of starting over.

- a folder path: used as it is. On one machine that is the results folder (the default); on a
  cluster, a folder every node mounts at the same path (NFS, EFS).
- a URI (`s3://bucket/prefix`, `gs://...`, `file:///...`): the trial works in a local folder and
  mirrors it there through pyarrow's file systems (credentials the usual way: the instance role,
  `AWS_*` variables). `pull` fetches the last checkpoint before the trial starts; `push` uploads
  each checkpoint as it is saved, the tensors before `state.json`, which names them, so a node lost
  mid-upload leaves the previous consistent pair (`trials.checkpoint`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from trials.checkpoint import STATE_FILE


def is_uri(location: str) -> bool:
    return "://" in location


class CheckpointPlace:
    """One trial's checkpoint folder: local (or mounted), or mirrored to a URI."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._local: Path | None = None
        if is_uri(location):
            from pyarrow import fs

            self._fs, self._path = fs.FileSystem.from_uri(location)

    def pull(self) -> Path:
        """The local folder the trial checkpoints into, holding the last saved checkpoint if any."""
        if not is_uri(self.location):
            return Path(self.location)
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix="bdlab-checkpoint-"))
            for name in self._remote_files():
                with self._fs.open_input_stream(f"{self._path}/{name}") as stream:
                    (self._local / name).write_bytes(stream.read())
        return self._local

    def push(self, folder: Path) -> None:
        """Upload the checkpoint just saved in `folder` (a no-op for a local or mounted folder)."""
        if not is_uri(self.location):
            return
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
        self._fs.create_dir(self._path, recursive=True)
        for name in [n for n in names if n != STATE_FILE] + [n for n in names if n == STATE_FILE]:
            with self._fs.open_output_stream(f"{self._path}/{name}") as out:
                out.write((folder / name).read_bytes())
        for stale in set(self._remote_files()) - set(names):  # tensors of the previous checkpoint
            self._fs.delete_file(f"{self._path}/{stale}")

    def remove(self) -> None:
        """Delete the checkpoints of a finished trial."""
        if not is_uri(self.location):
            shutil.rmtree(self.location, ignore_errors=True)
            return
        from pyarrow import fs

        if self._fs.get_file_info(self._path).type != fs.FileType.NotFound:
            self._fs.delete_dir(self._path)
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)

    def _remote_files(self) -> list[str]:
        from pyarrow import fs

        selector = fs.FileSelector(self._path, allow_not_found=True)
        return [info.base_name for info in self._fs.get_file_info(selector) if info.type == fs.FileType.File]
