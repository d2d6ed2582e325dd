"""Many machines, as torchrun runs them: two torchrun agents on this machine as two "nodes" of one process each,
meeting through a c10d rendezvous, train.py across both, against the same run launched as one agent of 2."""
import os
import re
import socket
import subprocess
import sys

from conftest import write_task_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for a whole launch; a rendezvous that never completes gives up well before (JOIN_TIMEOUT)
JOIN_TIMEOUT = 60
# torchrun sets OMP_NUM_THREADS=1 only when it starts several processes on a node; one process a node would take
# both cores, and another thread count rounds float32 differently: both launches get one thread a process.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}  # INFO: each agent prints its ranks
TINY = ["--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2",
        "--batch-size", "9", "--max-steps", "6", "--checkpoint-every-epochs", "0", "--device", "cpu",
        "--no-progress"]
FIGURES = ("epoch ", "validation: ", "test: ")  # the lines of the run's figures (epoch N: step S val_...)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(launcher, data_dir, checkpoint_dir):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "train.py", "--data-dir", str(data_dir),
            "--checkpoint-dir", str(checkpoint_dir), *TINY]


def start(command):
    return subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(launches):
    """Wait for every launch (all running at once); [(stdout, stderr)]; each must exit 0 within TIMEOUT."""
    try:
        outputs = [launch.communicate(timeout=TIMEOUT) for launch in launches]
    finally:
        for launch in launches:  # a launch left hanging by a failed peer: its agent and its worker
            if launch.poll() is None:
                os.killpg(launch.pid, 9)
                launch.communicate()
    for launch, (out, err) in zip(launches, outputs):
        assert launch.returncode == 0, f"exit {launch.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return outputs


def figures(out):
    return [line for line in out.splitlines() if line.startswith(FIGURES)]


def agent_ranks(err):
    """(global ranks, world size) this agent's rendezvous gave its workers, as torchrun logs them."""
    ranks = re.search(r"global_ranks=\[([\d, ]*)\]", err)
    sizes = re.search(r"global_world_sizes=\[([\d, ]*)\]", err)
    assert ranks and sizes, err[-3000:]
    return [int(r) for r in ranks.group(1).split(",")], {int(s) for s in sizes.group(1).split(",")}


def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path):
    data_dir = write_task_folder(tmp_path / "tasks", n_training=6, n_evaluation=2)
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", f"multinode-{os.getpid()}"
    # c10d rendezvous: the agents meet at the endpoint (the first to bind it hosts the store) and the rendezvous
    # numbers them; --node-rank is only read by the static rendezvous (--master-addr/--master-port), so not given.
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", rdzv_id, "--rdzv-conf", f"join_timeout={JOIN_TIMEOUT}", "--max-restarts", "0"]
    one_node = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    launches = [start(train_command(node, data_dir, tmp_path / "nodes")) for _ in range(2)]
    launches.append(start(train_command(one_node, data_dir, tmp_path / "one-node")))
    *nodes, (single, _) = finish(launches)

    ranks = [agent_ranks(err) for _, err in nodes]
    assert sorted(r for rs, _ in ranks for r in rs) == [0, 1] and all(size == {2} for _, size in ranks), ranks
    # rank 0 alone prints: the node holding it tells the whole run; the other node's process prints nothing
    primary, other = sorted(nodes, key=lambda node: agent_ranks(node[1])[0] != [0])
    assert primary[0].startswith("run ") and other[0] == "", (primary[0][:500], other[0][:500])
    shown = figures(primary[0])
    assert [line.split(":")[0] for line in shown] == ["epoch 1", "epoch 1", "validation", "test"], shown
    assert shown == figures(single), (shown, figures(single))  # the same run: every figure printed alike
