"""Where a checkpoint's bytes go: a store writes, finds and deletes the checkpoints of one run's folder.

The CheckpointManager decides what to save and what to keep; its writer hands each snapshot to the run's store.
SingleFileStore keeps a checkpoint as one .pth (or .pth.zst) and its .json sidecar, written atomically by
checkpoint.py;
FolderStore, a multi-process run's, as a DCP folder and its sidecar (dcp_checkpoint.py). An object store is
another class with the same methods; nothing above a store spells a file name.
"""
import os

import checkpoint as ckpt
import dcp_checkpoint


class SingleFileStore:
    """A run's checkpoints as NAME.pth + NAME.json in its folder (checkpoint.py's commit protocol and locks)."""
    suffix = ".pth"

    def __init__(self, folder):
        self.folder = folder

    def path(self, name):
        """Where checkpoint `name` is or would be; refuses a name that leaves the folder, or a symlink there."""
        return ckpt.checkpoint_path(self.folder, name, suffix=self.suffix)

    def exists(self, name):
        """Whether anything, a symlink included, takes the name, in any form (.pth, .pth.zst or DCP folder)."""
        stem = os.path.join(self.folder, ckpt.check_name(name, automatic=True))
        return any(os.path.lexists(stem + suffix) for suffix in (*ckpt.FILE_SUFFIXES, dcp_checkpoint.SUFFIX))

    def write(self, fields, overwrite=False, verify_after_save=False, cancel=None):
        """Write one checkpoint durably (all or nothing); its sidecar and path."""
        sidecar = ckpt.save_full_checkpoint(self.folder, **fields, overwrite=overwrite,
                                            verify_after_save=verify_after_save, cancel=cancel)
        return sidecar, os.path.join(self.folder, sidecar["file"])

    def discard(self, fields):
        """A save that will not be written (abandoned, or its copy failed): nothing to undo for a single file."""

    def delete(self, name):
        """Remove a checkpoint (sidecar first, so no listing shows a file without it); FileNotFoundError if gone,
        CheckpointError for a symlink (never deleted through)."""
        ckpt.delete_checkpoint(ckpt.existing_file(self.folder, name) or self._plain_path(name))

    def _plain_path(self, name):
        """Where the checkpoint of this store's form would be, a link there included (delete refuses it)."""
        return os.path.join(self.folder, ckpt.check_name(name, automatic=True) + self.suffix)


class FolderStore(SingleFileStore):
    """A multi-process run's checkpoints as NAME.dcp/ + NAME.json. Every rank writes its part of each into the
    folder that stage() made (dcp_checkpoint.ShardWriter); write() then commits it on rank 0."""
    suffix = dcp_checkpoint.SUFFIX

    def stage(self, name, needed_bytes):
        """The temporary folder a save's ranks write into (rank 0, before they start)."""
        return dcp_checkpoint.stage(self.folder, name, needed_bytes)

    def write(self, fields, overwrite=False, verify_after_save=False, cancel=None):
        """Once every rank's part is written (fields["sharded_save"] says when), commit the folder."""
        save = fields["sharded_save"]
        rest = {k: v for k, v in fields.items() if k not in ("sharded_save", "compression")}
        try:
            save.wait_uploaded()
            check_folder_options(rest.get("contents", "full"), fields.get("compression", "none"))
        except BaseException:
            save.discard()
            raise
        record = ckpt.build_record(**rest)
        sidecar = dcp_checkpoint.commit(self.folder, save.staging, record, overwrite=overwrite,
                                        verify_after_save=verify_after_save, cancel=cancel)
        return sidecar, self.path(fields["name"])

    def delete(self, name):
        ckpt.delete_checkpoint(self._plain_path(name))

    def discard(self, fields):
        """Wait for the ranks' writing to end (their collectives must finish), then remove what they wrote."""
        save = fields["sharded_save"]
        try:
            save.wait_uploaded()
        except ckpt.CheckpointError:  # failed as well as abandoned: either way nothing is kept
            pass
        save.discard()


def check_folder_options(contents, compression):
    """ValueError for what a DCP folder cannot hold: its ranks write the full state, each its part, uncompressed."""
    if ckpt.check_contents(contents) != "full" or ckpt.check_compression(compression) != "none":
        raise ValueError(f"a multi-process run saves DCP folders, which hold the full state uncompressed: contents "
                         f"{contents!r} and compression {compression!r} are for single-process runs (convert a "
                         "folder with load_checkpoint.py --consolidate, then --export)")
