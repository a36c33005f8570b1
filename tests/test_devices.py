"""Device discovery, pinning and the CPU-core split, with plain data and no GPU."""
import pytest

from psearch.engine import devices
from psearch.engine.config import UsageError
from psearch.engine.devices import WorkerSlot


def no_probe():
    raise AssertionError("the machine must not be probed when the devices are given")


# ---------------------------------------------------------------- discovery

@pytest.mark.parametrize("value, expected", [
    ("0,1,3", ["0", "1", "3"]),
    (" 2 , 5 ", ["2", "5"]),
    ("", []),
    ("  ", []),
    ("-1", []),
    ("GPU-8f3e0c1a-aaaa-bbbb-cccc-0123456789ab", ["GPU-8f3e0c1a-aaaa-bbbb-cccc-0123456789ab"]),
    ("MIG-4b1c2d3e-1111-2222-3333-444455556666,MIG-GPU-8f3e/1/0",
     ["MIG-4b1c2d3e-1111-2222-3333-444455556666", "MIG-GPU-8f3e/1/0"]),
])
def test_cuda_visible_devices_ids_pass_through_as_given(value, expected):
    assert devices.visible_from_env({"CUDA_VISIBLE_DEVICES": value}) == expected


def test_unset_cuda_visible_devices_is_not_an_empty_list():
    assert devices.visible_from_env({}) is None


def test_gpus_flag_wins_over_the_probe():
    assert devices.resolve_gpus("2,0", {}, no_probe) == ["2", "0"]


def test_cuda_visible_devices_wins_over_the_probe():
    assert devices.resolve_gpus(None, {"CUDA_VISIBLE_DEVICES": "0,1,3"}, no_probe) == \
        ["0", "1", "3"]


def test_probe_is_used_when_nothing_is_given():
    assert devices.resolve_gpus(None, {}, lambda: ["0", "1"]) == ["0", "1"]


def test_gpus_flag_may_pick_a_subset_of_the_visible_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,7"}
    assert devices.resolve_gpus("7,4", env, no_probe) == ["7", "4"]


def test_more_gpus_than_visible_is_refused_with_both_counts():
    with pytest.raises(UsageError, match="3 gpus requested .* only 2 were specified visible"):
        devices.resolve_gpus("0,1,3", {"CUDA_VISIBLE_DEVICES": "0,1"}, no_probe)


def test_a_gpu_outside_cuda_visible_devices_is_refused_naming_it():
    with pytest.raises(UsageError, match=r"GPU 2 is not in CUDA_VISIBLE_DEVICES=0,1,3"):
        devices.resolve_gpus("2", {"CUDA_VISIBLE_DEVICES": "0,1,3"}, no_probe)


@pytest.mark.parametrize("text, match", [("0,0", "GPU 0 more than once"),
                                         ("0,,1", "empty entry"), ("", "empty entry")])
def test_bad_gpu_lists_are_refused(text, match):
    with pytest.raises(UsageError, match=match):
        devices.resolve_gpus(text, {}, no_probe)


def test_parse_nvidia_smi_keeps_indices_only():
    assert devices.parse_nvidia_smi("0\n1\n\n3\nNo devices were found\n") == ["0", "1", "3"]


def test_probe_without_nvml_or_nvidia_smi_finds_nothing(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import fails
    assert devices.probe_gpus() == []


# ---------------------------------------------------------------- planning the workers

def test_one_worker_per_gpu_labelled_by_its_real_id():
    slots = devices.plan_workers(["0", "1", "3"])
    assert [(s.label, s.rank, s.device) for s in slots] == \
        [("gpu0", 0, "0"), ("gpu1", 1, "1"), ("gpu3", 2, "3")]


def test_workers_per_gpu_numbers_the_workers_on_each_gpu():
    slots = devices.plan_workers(["3", "5"], workers_per_gpu=2)
    assert [s.label for s in slots] == ["gpu3w0", "gpu3w1", "gpu5w0", "gpu5w1"]
    assert [s.rank for s in slots] == [0, 1, 2, 3]
    assert [s.device for s in slots] == ["3", "3", "5", "5"]


def test_uuid_labels_are_safe_file_names_and_keep_the_id():
    slot = devices.plan_workers(["MIG-GPU-8f3e/1/0"])[0]
    assert slot.label == "gpu-MIG-GPU-8f3e-1-0"
    assert slot.device == "MIG-GPU-8f3e/1/0"


def test_cpu_workers():
    slots = devices.plan_workers([], cpu_workers=3)
    assert [(s.label, s.device) for s in slots] == [("cpu0", None), ("cpu1", None), ("cpu2", None)]


def test_describe():
    assert WorkerSlot("gpu3", 0, "3").describe() == "GPU 3"
    assert WorkerSlot("gpu3w1", 1, "3").describe() == "GPU 3 (gpu3w1)"
    assert WorkerSlot("cpu0", 0, None).describe() == "CPU (cpu0)"


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpus_flag=None, cpu_workers=0, workers_per_gpu=1), "--cpu_workers must be at least 1"),
    (dict(gpus_flag="0", cpu_workers=None, workers_per_gpu=0), "--workers_per_gpu must be"),
    (dict(gpus_flag="0,1", cpu_workers=2, workers_per_gpu=1), "conflicts with --cpu_workers"),
])
def test_device_flags_are_validated(kwargs, match):
    with pytest.raises(UsageError, match=match):
        devices.choose_workers(environ={}, probe=no_probe, **kwargs)


@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {}])
def test_no_gpu_and_no_cpu_workers_says_so_with_the_hint(env):
    with pytest.raises(UsageError, match="No GPUs available.*--cpu_workers"):
        devices.choose_workers(None, None, 1, env, lambda: [])


def test_cpu_fallback_is_used_only_without_gpus():
    fallback = devices.choose_workers(None, None, 1, {"CUDA_VISIBLE_DEVICES": ""}, no_probe,
                                      cpu_fallback=2)
    assert [s.label for s in fallback] == ["cpu0", "cpu1"]
    gpus = devices.choose_workers(None, None, 1, {}, lambda: ["0"], cpu_fallback=2)
    assert [s.label for s in gpus] == ["gpu0"]


def test_cpu_workers_ignore_visible_gpus():
    slots = devices.choose_workers(None, 2, 1, {"CUDA_VISIBLE_DEVICES": "0,1"}, no_probe)
    assert [s.device for s in slots] == [None, None]


# ---------------------------------------------------------------- pinning and cores

def test_each_worker_gets_its_own_device_id_never_renumbered():
    base = {"CUDA_VISIBLE_DEVICES": "0,1,3", "PATH": "/bin"}
    slots = devices.choose_workers(None, None, 1, base, no_probe)
    envs = [devices.worker_env(base, s, len(slots), parent_pid=99, threads=2) for s in slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "3"]
    assert [e["PARALLEL_SEARCH_WORKER"] for e in envs] == ["gpu0", "gpu1", "gpu3"]
    assert base == {"CUDA_VISIBLE_DEVICES": "0,1,3", "PATH": "/bin"}  # not mutated


def test_uuids_are_pinned_exactly_as_given():
    uuid = "GPU-8f3e0c1a-aaaa-bbbb-cccc-0123456789ab"
    slot = devices.choose_workers(None, None, 1, {"CUDA_VISIBLE_DEVICES": uuid}, no_probe)[0]
    assert devices.worker_env({}, slot, 1, 1, 1)["CUDA_VISIBLE_DEVICES"] == uuid


def test_worker_env_identity_threads_and_cpu_pinning():
    env = devices.worker_env({"PATH": "/bin", "OMP_NUM_THREADS": "64"},
                             WorkerSlot("cpu1", 1, None), n_workers=4, parent_pid=1234, threads=3)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] == "/bin"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "PARALLEL_SEARCH_CPU_THREADS"):
        assert env[name] == "3"
    assert env["PARALLEL_SEARCH_RANK"] == "1"
    assert env["PARALLEL_SEARCH_N_WORKERS"] == "4"
    assert env["PARALLEL_SEARCH_MANAGED"] == "1"
    assert env["PARALLEL_SEARCH_PARENT_PID"] == "1234"
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("cores, workers, threads", [(16, 4, 4), (2, 4, 1), (10, 3, 3), (1, 1, 1)])
def test_cores_are_split_among_workers(cores, workers, threads):
    assert devices.threads_per_worker(cores, workers) == threads


@pytest.mark.parametrize("requested, threads, loaders", [(4, 4, 3), (4, 16, 4), (4, 1, 0),
                                                         (0, 8, 0), (2, 2, 1)])
def test_loader_processes_fit_the_workers_cores(requested, threads, loaders):
    assert devices.loader_processes(requested, threads) == loaders
