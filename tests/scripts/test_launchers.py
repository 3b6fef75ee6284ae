"""The shell launchers: argument checks that run before torchrun starts."""
import os
import subprocess
import sys

import pytest

from .conftest import SCRIPTS


@pytest.mark.parametrize("ngpu", ["0", "abc", "-1", "2x"])
def test_run_train_rejects_an_ngpu_that_is_not_a_positive_integer(ngpu):
    proc = subprocess.run(["bash", str(SCRIPTS / "run_train.sh"), "--training.steps=1"],
                          env={**os.environ, "NGPU": ngpu}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"NGPU must be a positive integer (processes to start), got '{ngpu}'" in proc.stderr


@pytest.mark.parametrize("env, args, message", [
    ({"CONFIG_FILE": "/nonexistent/run.toml"}, [], "No such file or directory: '/nonexistent/run.toml'"),
    ({}, ["--training.stepz=3"], "unknown key 'stepz' in [training]"),
])
def test_run_train_reports_a_bad_config_once_with_exit_code_2(env, args, message):
    # Checked before torchrun starts: one message, not one per process plus torchrun's report.
    proc = subprocess.run(["bash", str(SCRIPTS / "run_train.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "NGPU": "2", **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("config error:") == 1 and message in proc.stderr, proc.stderr
    assert "torch.distributed" not in proc.stderr


def test_slurm_script_sends_the_early_sigterm_to_the_torchrun_agents():
    # For the batch shell (B:TERM) the signal would have to go through srun, which turns a
    # SIGTERM into SIGKILL for its tasks: the workers would never save.
    text = (SCRIPTS / "run_multinode.slurm").read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH --signal")]
    assert directives == ["--signal=TERM@300"]
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / "run_multinode.slurm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_slurm(tmp_path, head_address):
    """scontrol, srun and python3 stand-ins: srun answers `hostname --ip-address` with
    head_address, else runs its command as on two nodes (SLURM_NODEID 0 and 1); python3
    prints a torchrun command line ("TORCHRUN node=N ARGS") instead of starting it, and
    runs anything else with the real Python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node1\\nnode2\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nif [[ \" $* \" == *' hostname '* ]]; then echo '%s'; exit; fi\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "for n in 0 1; do SLURM_NODEID=$n \"$@\"; done\n" % head_address)
    (bin_dir / "python3").write_text(
        "#!/bin/bash\nif [[ \"$1 $2\" == '-m torch.distributed.run' ]]; then echo \"TORCHRUN "
        "node=$SLURM_NODEID ${*:3}\"; else exec %s \"$@\"; fi\n" % sys.executable)
    for tool in ("scontrol", "srun", "python3"):
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "77"}


def test_slurm_script_refuses_a_loopback_rendezvous_address_on_several_nodes(tmp_path):
    env = _fake_slurm(tmp_path, "127.0.1.1")
    script = str(SCRIPTS / "run_multinode.slurm")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "resolves to 127.0.1.1 (loopback)" in proc.stderr
    assert "TORCHRUN" not in proc.stdout                              # nothing started
    # No GPU here: the recipe's device = "cuda" would stop the script's config check.
    proc = subprocess.run(["bash", script, "--training.device=cpu", "--training.steps=5", "--job.name=a b"],
                          env={**env, "RDZV_HOST": "10.1.2.3", "SLURM_GPUS_ON_NODE": "4"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    started = [line for line in proc.stdout.splitlines() if line.startswith("TORCHRUN")]
    # One torchrun per node; the first hosts the rendezvous (its name does not resolve to
    # RDZV_HOST, so torchrun would not know it should); workers = the GPUs Slurm gave.
    assert [line.split()[1] for line in started] == ["node=0", "node=1"], proc.stdout
    for line, host in zip(started, ("1", "0")):
        assert (f"--nnodes=2 --nproc_per_node=4 --rdzv_id=77 --rdzv_backend=c10d "
                f"--rdzv_endpoint=10.1.2.3:29500 --rdzv_conf=is_host={host} -m ep_fp8.train "
                f"--config train_configs/moe_16b.toml --training.device=cpu --training.steps=5 --job.name=a b") in line, line


@pytest.mark.parametrize("answer, endpoint", [
    ("fe80::1 10.0.0.5", "10.0.0.5:29500"),           # IPv4 preferred where there are several
    ("2001:db8::7", "[2001:db8::7]:29500"),           # IPv6 only: in brackets before the port
])
def test_slurm_script_takes_an_ipv4_address_and_brackets_an_ipv6_one(tmp_path, answer, endpoint):
    env = _fake_slurm(tmp_path, answer)
    proc = subprocess.run(["bash", str(SCRIPTS / "run_multinode.slurm"), "--training.device=cpu",
                           "--training.steps=5"], env={**env, "SLURM_GPUS_ON_NODE": "4"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    started = [line for line in proc.stdout.splitlines() if line.startswith("TORCHRUN")]
    assert len(started) == 2 and all(f"--rdzv_endpoint={endpoint} " in line for line in started)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/out", "tests", "bnech"], "unknown stage 'bnech' (tests, bench, train, ep)"),
    (["{tmp}/a_file", "tests"], "cannot make the output folder '{tmp}/a_file'"),
])
def test_run_gpu_checks_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    (tmp_path / "a_file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(["bash", str(SCRIPTS / "run_gpu_checks.sh"), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message.replace("{tmp}", str(tmp_path)) in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing made


def test_run_gpu_checks_puts_a_relative_output_folder_where_it_is_called_from(tmp_path):
    # Without a GPU it stops after making the folder; the folder is the caller's, not the repo's.
    # GPUs are hidden so that on a GPU machine too it stops there instead of running the checks.
    proc = subprocess.run(["bash", str(SCRIPTS / "run_gpu_checks.sh"), "rel_out", "tests"], cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert "no CUDA GPU visible" in proc.stderr, proc.stderr
    assert (tmp_path / "rel_out").is_dir() and not (SCRIPTS.parent / "rel_out").exists(), proc.stderr


@pytest.mark.parametrize("env, message", [
    ({"NGPU": "abc"}, "NGPU must be a positive integer (workers per node), got 'abc'"),
    ({"NGPU": "0"}, "NGPU must be a positive integer (workers per node), got '0'"),
    ({"SLURM_JOB_NODELIST": ""}, "no SLURM allocation (SLURM_JOB_NODELIST is unset)"),
])
def test_slurm_script_refuses_a_bad_ngpu_or_no_allocation(tmp_path, env, message):
    proc = subprocess.run(["bash", str(SCRIPTS / "run_multinode.slurm")], env={**_fake_slurm(tmp_path, "10.0.0.1"), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "TORCHRUN" not in proc.stdout
