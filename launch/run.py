"""Launch a recipe as ONE nemo-run Experiment: the trainer plus its rollout fleet.

    python -m launch.run --recipe qwen2_5_7b_gsm8k --executor slurm --cluster my_cluster.yaml --dryrun
    python -m launch.run --recipe demo_cpu trainer.steps=2            # local, this machine

Slurm: one heterogeneous job. Group 0 (``cluster.trainer_nodes`` nodes) runs the trainer under torchrun
(one rank per GPU, static rendezvous on the group's head node); group 1 (``cluster.rollout_nodes`` nodes)
runs ``launch.supervisor``: ``rollout.num_engines`` SGLang servers of ``rollout.engine_tp`` GPUs each on
disjoint GPUs (on CPU nodes, ``cluster.gpus_per_node=0``: one CPU engine per node), plus sglang-router on
the first rollout node. Without ``--detach`` the launcher waits for the job, streams its logs and exits
with the trainer's status; ``python -m launch.status JOB_ID`` shows a submitted job (launch/status.py).
A ``model.tiny`` recipe's initial weights are built into ``<trainer.log_dir>/init_hf`` before submission
(the engines load them; the trainer reuses them). The trainer is started by ``launch.health``,
which waits for every engine's and the router's /health, and it is told the fleet with
``rollout.engine_urls=[...]`` and ``rollout.router_url=...``.

The trainer reads the recipe the launcher validated: recipe file + cluster file + flags + dotted overrides,
merged and checked once here, written into the job directory (``a3po_recipe.yaml``, see
``config.recipe_yaml``) and given to the trainer as its ``--recipe``; only the fleet's addresses, known
when the job starts, follow as overrides.

Local: the same two tasks as local processes (the CPU engine when this machine has no GPU). A recipe with
``model.tiny`` has no weights on disk before the trainer builds them, so there the trainer starts its
own CPU engines and the launcher runs the trainer alone.

The layout is checked against the model and the cluster before anything is written (launch/layout.py).
``--dryrun`` writes the sbatch script (Slurm) and prints its path; nothing is submitted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import uuid
from pathlib import Path

from megatron_a3po.platform.keys import API_KEY_ENV, new_key
from megatron_a3po.errors import A3POError

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER_MODULE = "megatron_a3po.trainer"
STOP_FILE_NAME = "a3po_trainer_done"
RECIPE_FILE_NAME = "a3po_recipe.yaml"  # the merged, validated recipe in the job directory (the trainer's --recipe)
# how the trainer on a Slurm node names that file: its working directory is the job directory's code/
# (nemo-run: --chdir in a bare srun, --container-workdir /nemo_run/code in a container)
SLURM_RECIPE_ARG = f"../{RECIPE_FILE_NAME}"
SLURM_RUNDIR = "/nemo_run"  # where nemo-run mounts the job directory inside the containers


class LaunchError(A3POError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# configuration: recipe + cluster file + flags + dotted overrides


def read_cluster_file(path) -> list[dict]:
    """Recipe layers from a cluster file: a YAML mapping of ClusterCfg keys, or a mapping with a
    ``cluster:`` section plus the other recipe sections that cluster dictates (e.g. ``parallel:``,
    ``rollout:`` on CPU nodes)."""
    from omegaconf import OmegaConf

    from megatron_a3po.config import ClusterCfg, Recipe

    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"--cluster {path}: file not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:  # noqa: BLE001 - yaml syntax
        raise LaunchError(f"{p}: cannot parse YAML: {e}") from None
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise LaunchError(f"{p}: expected a mapping of cluster settings, got {type(raw).__name__}")
    sections = {k for k, f in Recipe.model_fields.items() if k not in ("name", "description", "model")}
    if "cluster" in raw and isinstance(raw["cluster"], dict) and set(raw) <= sections:
        layer = dict(raw)
    else:
        layer = {"cluster": raw}
    unknown = sorted(set(layer["cluster"]) - set(ClusterCfg.model_fields))
    if unknown:
        raise LaunchError(f"{p}: unknown cluster key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(ClusterCfg.model_fields)}")
    return [layer]


_FLAG_KEYS = ("account", "partition", "time", "qos", "container_image", "rollout_container_image", "job_dir")


def flag_layer(args) -> dict:
    out = {k: getattr(args, k) for k in _FLAG_KEYS if getattr(args, k, None) is not None}
    if args.mount:
        out["container_mounts"] = list(args.mount)
    return out


_SAFE = re.compile(r"^[\w@%+=:,./-]+$")


def sh(arg: str) -> str:
    """Quote one argument for an srun command line nemo-run writes verbatim into the sbatch script.

    Arguments with ``$`` are double-quoted so the shell variables the script defines (host names)
    expand; everything else is single-quoted when needed.
    """
    if _SAFE.match(arg):
        return arg
    if "$" in arg:
        if any(ch in arg for ch in '"\\`'):
            raise LaunchError(f"cannot quote argument {arg!r} for the sbatch script")
        return f'"{arg}"'
    return shlex.quote(arg)


# ---------------------------------------------------------------------------------------------
# the tasks


def rollout_host_var(node: int) -> str:
    return f"a3po_rollout_host_{node}"


TRAINER_HEAD_VAR = "a3po_trainer_head"
NODE_RANK_ARG = "--node-rank=$SLURM_NODEID"


def slurm_setup_lines(rollout_nodes: int) -> str:
    """Shell lines of the sbatch script: the address of every node the job talks to.

    A node's address is its ``NodeAddr`` in Slurm (the node name on most clusters; 127.0.0.1 on the
    local test cluster, whose node names resolve nowhere).
    """
    lines = ['a3po_node_addr() { scontrol show node "$1" -o | tr " " "\\n" | sed -n "s/^NodeAddr=//p"; }',
             "# the trainer's head node (torchrun rendezvous), het group 0",
             f'{TRAINER_HEAD_VAR}=$(a3po_node_addr "$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" '
             '| head -n1)")',
             "# rollout node addresses (het group 1), in node order: engine and router addresses",
             'a3po_rollout_hosts=( $(for n in $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1"); '
             'do a3po_node_addr "$n"; done) )']
    lines += [f"{rollout_host_var(i)}=${{a3po_rollout_hosts[{i}]}}" for i in range(rollout_nodes)]
    # a key per job for the servers, the router and the trainer: made on the node when the job starts,
    # so it is in no file; srun passes it to both groups in their environment, never on a command line
    lines += ["# the job's API key (rollout servers, router, trainer)",
              f"export {API_KEY_ENV}=\"$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')\""]
    return "\n".join(lines)


def fleet_args(recipe, layout, *, backend: str, model_path: str, hosts: list[str], bind_host: str,
               stop_file: str, health_timeout: float) -> list[str]:
    ro = recipe.rollout
    args = ["--backend", backend, "--model-path", model_path, "--engine-tp", str(layout.engine_tp),
            "--hosts", ",".join(hosts), "--bind-host", bind_host, "--stop-file", stop_file,
            "--health-timeout", str(int(health_timeout))]
    for e in layout.engines:
        args += ["--engine", f"{e.index}:{e.node}:{e.base_gpu}:{e.port}"]
    if layout.router_port is not None:
        args += ["--router-port", str(layout.router_port), "--router-policy", recipe.cluster.router_policy]
    if ro.mem_fraction_static is not None and backend == "sglang":
        args += ["--mem-fraction-static", str(ro.mem_fraction_static)]
    if ro.engine_args:
        args += ["--", *ro.engine_args]
    return args


def fleet_urls(layout, hosts: list[str]) -> tuple[list[str], str | None]:
    engines = [f"http://{hosts[e.node]}:{e.port}" for e in layout.engines]
    router = None if layout.router_port is None else f"http://{hosts[0]}:{layout.router_port}"
    return engines, router


def trainer_args(recipe_arg: str, engine_urls: list[str], router_url: str | None, torchrun: list[str], *,
                 health_timeout: float, stop_file: str) -> list[str]:
    """Arguments of ``python -m launch.health``: wait for the fleet, then torchrun the trainer on the job's
    recipe file (``recipe_arg``) with the fleet's addresses."""
    out = ["--timeout", str(int(health_timeout)), "--stop-file", stop_file]
    for u in engine_urls + ([router_url] if router_url else []):
        out += ["--url", u]
    ovs = []
    if engine_urls:
        ovs.append(f"rollout.engine_urls=[{','.join(engine_urls)}]")
    if router_url:
        ovs.append(f"rollout.router_url={router_url}")
    return out + ["--", *torchrun, "-m", TRAINER_MODULE, "--recipe", recipe_arg, *ovs]


def slurm_run_dir(recipe) -> str:
    """The trainer's run dir as the job sees it: ``trainer.log_dir``, made absolute against the submitting
    directory (the job runs elsewhere; a resubmission must find the same checkpoints)."""
    return os.path.abspath(recipe.trainer.log_dir)


def engine_model_path(recipe) -> str:
    """What the engines load first: ``model.hf_path``, or for a ``model.tiny`` recipe the HF directory the
    trainer would build (``<run dir>/init_hf``), prepared by ``prepare_slurm_model`` before submission."""
    if recipe.model.hf_path is not None:
        return recipe.model.hf_path
    return os.path.join(slurm_run_dir(recipe), "init_hf")


def prepare_slurm_model(recipe) -> None:
    """A tiny model has no weights on disk: build them where the trainer looks (it reuses them)."""
    if recipe.model.tiny is None:
        return
    from megatron_a3po.trainer.loop import prepare_initial_model

    prepare_initial_model(recipe, Path(slurm_run_dir(recipe)))


def build_slurm(run, recipe, layout, args):
    c = recipe.cluster
    hosts = [f"${{{rollout_host_var(i)}}}" for i in range(layout.rollout_nodes)]
    engine_urls, router_url = fleet_urls(layout, hosts)
    stop_file = f"{SLURM_RUNDIR}/{STOP_FILE_NAME}"
    # $SLURM_NODEID differs per task: it must reach launch.health unexpanded (the batch script's shell has
    # the head node's value), which expands it from its own environment (--expand-env)
    torchrun = ["torchrun", f"--nnodes={layout.trainer_nodes}", f"--nproc-per-node={layout.trainer_procs_per_node}",
                f"--rdzv-endpoint=${TRAINER_HEAD_VAR}:{c.rdzv_port}", NODE_RANK_ARG]
    t_args = trainer_args(SLURM_RECIPE_ARG, engine_urls, router_url, torchrun, health_timeout=c.health_timeout_s,
                          stop_file=stop_file)
    f_args = fleet_args(recipe, layout, backend=recipe.rollout.backend, model_path=engine_model_path(recipe),
                        hosts=hosts, bind_host=c.bind_host, stop_file=stop_file, health_timeout=c.health_timeout_s)
    if recipe.rollout.backend == "cpu":  # each CPU engine records the requests it served, beside the job's logs
        f_args[f_args.index("--stop-file"):f_args.index("--stop-file")] = ["--engine-log-dir", SLURM_RUNDIR]
    t_args = ["--expand-env", *t_args]
    trainer = run.Script(path="launch.health", entrypoint="python", m=True,
                         args=[shlex.quote(a) if a == NODE_RANK_ARG else sh(a) for a in t_args])
    fleet = run.Script(path="launch.supervisor", entrypoint="python", m=True, args=[sh(a) for a in f_args])

    if args.ssh:
        user, _, host = args.ssh.rpartition("@")
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=slurm_job_dir(recipe))
    else:
        # sbatch on this machine: nemo-run's local tunnel submits the experiment directory itself, so the
        # job directory is the experiment directory (under cluster.job_dir when set, see experiment_base)
        tunnel = run.LocalTunnel(job_dir=os.path.join(experiment_base(recipe, args), "experiments"))
    packager = run.GitArchivePackager() if args.packager == "git" else run.Packager()
    common = dict(account=c.account, partition=c.partition, time=c.time, qos=c.qos, ntasks_per_node=1,
                  gpus_per_node=c.gpus_per_node or None, container_image=c.container_image,
                  container_mounts=list(c.container_mounts), env_vars=dict(c.env_vars), heterogeneous=True,
                  exclusive=c.exclusive or None, job_name_prefix=f"{c.job_name}-", tunnel=tunnel,
                  packager=packager, monitor_group_job_wait_time=c.monitor_wait_s,
                  wait_time_for_group_job=c.group_start_gap_s,
                  # nemo-run's own start-time poller is a thread printing to stdout after we return (it broke
                  # --detach's last line, the job id, whenever the job was still PENDING); launch.status reports
                  poll_estimated_start_time=False)
    ex_trainer = run.SlurmExecutor(nodes=layout.trainer_nodes, setup_lines=slurm_setup_lines(layout.rollout_nodes),
                                   **common)
    # each group its own image: the trainer's (NGC PyTorch + megatron-core), SGLang's own for the fleet
    ex_fleet = run.SlurmExecutor(nodes=layout.rollout_nodes,
                                 **dict(common, container_image=c.rollout_container_image or c.container_image))
    for ex in (ex_trainer, ex_fleet):
        ex.launcher = None  # torchrun is in the trainer's command; the fleet is one process per node
    return [trainer, fleet], [ex_trainer, ex_fleet]


def experiment_base(recipe, args) -> str:
    """nemo-run's base directory (``<base>/experiments/<title>/<id>``): cluster.job_dir for a Slurm job
    submitted from this machine (a shared filesystem the nodes see), else $NEMORUN_HOME."""
    from nemo_run.config import get_nemorun_home

    if args.executor == "slurm" and not args.ssh and recipe.cluster.job_dir:
        return recipe.cluster.job_dir
    return get_nemorun_home()


def slurm_job_dir(recipe) -> str:
    return recipe.cluster.job_dir or os.path.join(
        os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")), "slurm_jobs")


LOCAL_TRAINER_TASK = "trainer"  # the local trainer task's name, and so its job directory's


def build_local(run, recipe, layout, exp_dir: str):
    c = recipe.cluster
    env = {"PYTHONPATH": os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x),
           **c.env_vars}
    if API_KEY_ENV not in env:  # a key per job, in the tasks' environment (not on a command line)
        env[API_KEY_ENV] = os.environ.get(API_KEY_ENV) or new_key()
    stop_file = os.path.join(exp_dir, STOP_FILE_NAME)
    hosts = ["127.0.0.1"]
    tasks, executors = [], []
    engine_urls, router_url = ([], None)
    if layout.engines:
        engine_urls, router_url = fleet_urls(layout, hosts)
        f_args = fleet_args(recipe, layout, backend="sglang" if layout.gpu else "cpu",
                            model_path=recipe.model.hf_path, hosts=hosts,
                            bind_host="127.0.0.1", stop_file=stop_file, health_timeout=c.health_timeout_s)
        tasks.append(run.Script(path="launch.supervisor", entrypoint=sys.executable, m=True, args=f_args))
        executors.append(run.LocalExecutor(ntasks_per_node=1, env_vars=env))
    # Not ``--standalone``: its rendezvous and agent stores listen on every interface. A file store for
    # the rendezvous, no shared agent store and MASTER_ADDR 127.0.0.1: rank 0's own store (see
    # megatron_a3po/platform/stores.py) then binds loopback only.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    rdzv_id = uuid.uuid4().hex[:12]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                f"--nproc-per-node={layout.trainer_procs_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={os.path.join(exp_dir, f'rdzv_{rdzv_id}.store')}", "--rdzv-conf=store_type=file",
                f"--rdzv-id={rdzv_id}", "--local-addr=127.0.0.1"]
    t_args = trainer_args(os.path.join(exp_dir, LOCAL_TRAINER_TASK, RECIPE_FILE_NAME), engine_urls, router_url,
                          torchrun, health_timeout=c.health_timeout_s, stop_file=stop_file)
    tasks.insert(0, run.Script(path="launch.health", entrypoint=sys.executable, m=True, args=t_args))
    executors.insert(0, run.LocalExecutor(ntasks_per_node=1, env_vars=env))
    return tasks, executors


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe name (recipes/NAME.yaml) or path")
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--dryrun", action="store_true", help="write the job (sbatch script) and print its path; "
                                                          "submit nothing")
    ap.add_argument("--cluster", help="YAML file of cluster.* settings (account, partition, container_image, ...)")
    ap.add_argument("--account")
    ap.add_argument("--partition")
    ap.add_argument("--time")
    ap.add_argument("--qos")
    ap.add_argument("--container-image", dest="container_image", help="the trainer group's image (and the fleet's, "
                                                                       "unless --rollout-container-image)")
    ap.add_argument("--rollout-container-image", dest="rollout_container_image",
                    help="the rollout group's image: SGLang's own, with this package installed --no-deps")
    ap.add_argument("--mount", action="append", default=[], help="SRC:DST container mount (repeatable; "
                                                                  "replaces cluster.container_mounts)")
    ap.add_argument("--job-dir", dest="job_dir", help="nemo-run job directory on the cluster's shared filesystem "
                                                      "(default cluster.job_dir or $NEMORUN_HOME/slurm_jobs)")
    ap.add_argument("--ssh", help="USER@HOST of the cluster's login node (default: sbatch on this machine)")
    ap.add_argument("--packager", choices=["git", "none"], default="git",
                    help="ship the repository's HEAD as a git archive (default), or nothing (code in the image)")
    ap.add_argument("--title", help="experiment title (default: cluster.job_name + recipe name)")
    ap.add_argument("--detach", action="store_true", help="Slurm: print the job id and return once submitted "
                                                          "(default: wait and exit with the trainer's status)")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. trainer.steps=10")
    return ap


def prepare(argv):
    """Parse, load and validate everything; no file is written. Returns (args, recipe, layout)."""
    from launch.layout import plan_layout
    from megatron_a3po.config import load_recipe

    args = build_parser().parse_args(argv)
    layers = []
    if args.cluster:
        layers += read_cluster_file(args.cluster)
    flags = flag_layer(args)
    if flags:
        layers.append({"cluster": flags})
    recipe = load_recipe(args.recipe, args.overrides, layers=layers)
    layout = plan_layout(recipe, args.executor)
    if args.executor == "slurm":  # the job runs elsewhere: its run dir must be the same for a resubmission
        recipe.trainer.log_dir = slurm_run_dir(recipe)
    return args, recipe, layout


def write_recipe_into_job_dir(job, recipe, argv: list[str]) -> None:
    """The merged, validated recipe the trainer reads, written once into ``job``'s directory.

    nemo-run makes that directory when the experiment runs (``Experiment.run`` refuses one that exists),
    then packages the job, copies the directory to the cluster (SSH tunnel) and submits it: the file is
    written right after the directory is made, from the job's ``create_job_dir``. That is done on the
    executor object the job prepares with (nemo-run's own clones are rebuilt from their config and would
    drop it)."""
    from megatron_a3po.config import recipe_yaml
    from megatron_a3po.io import atomic_write_text

    text = recipe_yaml(recipe, header="written by launch.run: recipe, cluster file, flags and overrides, merged "
                                      "and validated\nlaunch.run " + shlex.join(argv))
    ex = job.executor
    make_dir = ex.create_job_dir

    def create_job_dir():
        make_dir()
        atomic_write_text(Path(ex.job_dir) / RECIPE_FILE_NAME, text)

    ex.create_job_dir = create_job_dir


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, recipe, layout = prepare(argv)
    except A3POError as e:  # RecipeError, LayoutError, LaunchError, ...
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    import nemo_run as run

    title = args.title or f"{recipe.cluster.job_name}-{recipe.name}"
    print(f"[launch] recipe {recipe.name}: trainer {layout.trainer_nodes} node(s) x {layout.trainer_procs_per_node} "
          f"rank(s), TP={layout.tp} PP={layout.pp} DP={layout.dp}; {len(layout.engines)} engine(s) of TP "
          f"{layout.engine_tp} on {layout.rollout_nodes} node(s)" + (f"; router :{layout.router_port}"
                                                                    if layout.router_port else ""))
    if layout.memory:
        print(f"[launch] trainer memory estimate: {layout.memory}")
    with run.Experiment(title, base_dir=experiment_base(recipe, args)) as exp:
        if args.executor == "slurm":
            tasks, executors = build_slurm(run, recipe, layout, args)
            exp.add(tasks, executor=executors, name=recipe.name)
        else:
            tasks, executors = build_local(run, recipe, layout, exp._exp_dir)
            for name, t, ex in zip([LOCAL_TRAINER_TASK, "fleet"], tasks, executors):
                exp.add(t, executor=ex, name=name)
        write_recipe_into_job_dir(exp.jobs[0], recipe, argv)  # the trainer's job (the het job on Slurm)
        if args.dryrun:
            exp.dryrun(log=False, delete_exp_dir=False)
            if args.executor == "slurm":
                scripts = sorted(Path(exp._exp_dir).glob("*_sbatch.sh"))
                if not scripts:
                    print(f"error: nemo-run wrote no sbatch script under {exp._exp_dir}", file=sys.stderr)
                    return 1
                print(scripts[0])
            else:
                for t in tasks:
                    print(" ".join([t.entrypoint, "-m", t.path, *map(shlex.quote, t.args)]))
                print(exp._exp_dir)
            return 0
        if args.executor == "slurm":
            prepare_slurm_model(recipe)
            exp.run(sequential=False, detach=True, tail_logs=False)
            job = slurm_job_record(exp, recipe, exp.jobs[0].executor)
        else:
            exp.run(sequential=False, detach=False, tail_logs=True)
            return _local_exit_code(Path(exp._exp_dir) / STOP_FILE_NAME)
    from launch import status

    print(f"[launch] submitted Slurm job {job['job_id']}; logs in {job['job_dir']}; "
          f"status and logs: python -m launch.status {job['job_id']}", flush=True)
    if args.detach:
        print(job["job_id"])
        return 0
    return status.wait(job)


def slurm_job_record(exp, recipe, executor) -> dict:
    """Where a submitted job's pieces are, written to ``<experiment dir>/a3po_job.json`` for launch.status."""
    from megatron_a3po.io import write_json_atomic

    handles = [h for j in exp.jobs for h in ([j.handle] if getattr(j, "handle", None) else [])]
    if not handles:
        raise LaunchError("nemo-run returned no job handle: the job was not submitted")
    job_id = handles[0].rstrip("/").split("/")[-1]
    local = type(executor.tunnel).__name__ == "LocalTunnel"
    # the job's directory: the task's directory of the experiment (local tunnel) or its copy on the cluster
    job_dir = executor.job_dir if local else os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)
    rec = {"job_id": job_id, "job_dir": job_dir, "experiment_dir": exp._exp_dir, "title": exp._title,
           "stop_file": os.path.join(job_dir, STOP_FILE_NAME), "run_dir": slurm_run_dir(recipe),
           "ssh": None if local else f"{executor.tunnel.user}@{executor.tunnel.host}"}
    write_json_atomic(Path(exp._exp_dir) / "a3po_job.json", rec)
    from launch.status import index_path

    write_json_atomic(index_path(job_id), rec)
    return rec


def _local_exit_code(stop_file: Path) -> int:
    """The trainer's exit status, which launch.health writes into the stop file.

    nemo-run's local ``run`` can return while the job still runs: wait for the stop file for as long as
    the experiment is not done (nemo-run writes ``_DONE`` in the experiment dir), then a short grace.
    """
    import time

    done_marker = stop_file.parent / "_DONE"
    grace_until = None
    while not stop_file.exists():
        if done_marker.exists():
            grace_until = grace_until or time.monotonic() + 60
            if time.monotonic() > grace_until:
                break
        time.sleep(0.5)
    try:
        code = int(stop_file.read_text().strip())
    except (OSError, ValueError):
        print(f"[launch] the trainer left no exit status in {stop_file}", file=sys.stderr)
        return 1
    if code != 0:
        print(f"[launch] the trainer exited with status {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
