"""Where a checkpoint's bytes go: a store writes, finds and deletes the checkpoints of one run's folder.

The CheckpointManager decides what to save and what to keep; its writer hands each snapshot to the run's store.
SingleFileStore keeps a checkpoint as one .pth and its .json sidecar, written atomically by checkpoint.py. A
distributed (DCP folder) or object store is another class with the same four methods; nothing above a store
spells a file name.
"""
import os

import checkpoint as ckpt


class SingleFileStore:
    """A run's checkpoints as NAME.pth + NAME.json in its folder (checkpoint.py's commit protocol and locks)."""

    def __init__(self, folder):
        self.folder = folder

    def path(self, name):
        """Where checkpoint `name` is or would be; refuses a name that leaves the folder, or a symlink there."""
        return ckpt.checkpoint_path(self.folder, name)

    def exists(self, name):
        """Whether anything, a symlink included, takes the name."""
        return os.path.lexists(self._file(name))

    def write(self, fields, overwrite=False, verify_after_save=False, cancel=None):
        """Write one checkpoint durably (all or nothing); its sidecar and path."""
        sidecar = ckpt.save_full_checkpoint(self.folder, **fields, overwrite=overwrite,
                                            verify_after_save=verify_after_save, cancel=cancel)
        return sidecar, os.path.join(self.folder, sidecar["file"])

    def delete(self, name):
        """Remove a checkpoint (sidecar first, so no listing shows a file without it); FileNotFoundError if gone,
        CheckpointError for a symlink (never deleted through)."""
        ckpt.delete_checkpoint(self._file(name))

    def _file(self, name):
        return os.path.join(self.folder, ckpt.check_name(name, automatic=True) + ".pth")
