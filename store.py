"""Where a checkpoint's bytes go: a store writes, finds and deletes the checkpoints of one run's folder.

The CheckpointManager decides what to save and what to keep; its writer hands each snapshot to the run's store.
SingleFileStore keeps a checkpoint as one .pth (or .pth.zst) and its .json sidecar, written atomically by
checkpoint.py; FolderStore, a multi-process run's, as a DCP folder and its sidecar (dcp_checkpoint.py); ObjectStore,
a run's whose root is a URL, as objects (remote.py), staged through a local folder. Nothing above a store spells a
file name.
"""
import os

import catalogue
import checkpoint as ckpt
import dcp_checkpoint
import remote


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


class ObjectStore(SingleFileStore):
    """A run's checkpoints in object storage (its root is a URL). Each is written whole into the run's local
    staging folder, by SingleFileStore's protocol, then uploaded from the writer thread, its sidecar object last,
    and removed here: a save is done, and announced, once committed there. A failed upload fails the save (the
    name keeps what it had there, or nothing) and leaves nothing here."""

    def __init__(self, folder, target, run_id):
        super().__init__(folder)
        self.target, self.run_id = target, run_id
        try:
            self.target.recover(runs={run_id})  # what a crash of this run's last process left half-uploaded
            # The names committed there: one LIST when the run starts, kept up to date by this store's writes
            # and deletes, so that exists() (asked on the training thread) never waits on the network.
            self._names = {m["name"] for m in target.list_checkpoints(run=run_id)}
        except remote.RemoteError as e:
            raise ckpt.CheckpointError(str(e)) from None

    def path(self, name):
        """The URL of checkpoint `name` (ROOT/runs/RUN_ID/checkpoints/NAME.pth: the name load_checkpoint.py and
        --resume take; its bytes sit under a version key its sidecar names)."""
        return self.target.display(self.target.key(self.run_id, ckpt.check_name(name, automatic=True) + ".pth"))

    def exists(self, name):
        return super().exists(name) or name in self._names

    def write(self, fields, overwrite=False, verify_after_save=False, cancel=None):
        name = fields["name"]
        if name in self._names and not overwrite:
            raise ckpt.CheckpointExists(f"a checkpoint named {name!r} already exists; choose another name")
        sidecar, staged = super().write(fields, overwrite=True, verify_after_save=verify_after_save, cancel=cancel)
        try:
            self._put_run_file()
            self.target.upload(staged, sidecar, self.run_id, name, cancel=cancel)
        except (remote.RemoteError, OSError) as e:
            raise ckpt.CheckpointError(f"could not upload checkpoint {name!r}: {e}") from e
        finally:
            _remove_staged(staged)
        self._names.add(name)
        return sidecar, self.target.display(self.target.key(self.run_id, os.path.basename(staged)))

    def delete(self, name):
        self.target.delete(self.run_id, name)
        self._names.discard(name)

    def _put_run_file(self):
        run_file = os.path.join(os.path.dirname(self.folder), catalogue.RUN_FILE)
        if os.path.isfile(run_file) and not os.path.islink(run_file):
            self.target.put_run_file(self.run_id, ckpt.read_bytes(run_file, ckpt.JSON_LIMIT))


def _remove_staged(path):
    try:
        ckpt.delete_checkpoint(path)
    except (OSError, ckpt.CheckpointError) as e:  # a staging copy left is cleaned at the next start
        ckpt.logger.warning("could not remove the staged copy %s: %s", path, e)
