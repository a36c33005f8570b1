"""bench/RESULTS.md from the figures bench/run_all.py collected (pure: dicts in, markdown out)."""
from __future__ import annotations

from typing import Any, Sequence

CACHE_TARGET = 5.0


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> list[str]:
    """A markdown table of `rows`, one column per (key, heading); missing values show as '-'."""
    def cell(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    return ["| " + " | ".join(h for _, h in columns) + " |",
            "|" + "---|" * len(columns),
            *["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows], ""]


def machine_section(info: dict) -> list[str]:
    return ["## Machine", "", *table([info], [
        ("cpu", "CPU"), ("cores", "cores"), ("ram_gib", "RAM GiB"), ("python", "Python"),
        ("torch", "torch"), ("optuna", "Optuna"), ("gpu", "GPU"), ("date", "date"),
        ("load_before", "load avg. before (1/5/15 min)"), ("load_after", "after")]),
        "The machine may be shared: what other processes took of its CPU during each benchmark "
        "is under Run times; it lowers absolute rates more than side-by-side ratios.", ""]


def cache_section(f: dict) -> list[str]:
    met = f["ratio"] >= CACHE_TARGET
    verdict = (f"target >= {CACHE_TARGET:g}x: **met**" if met else
               f"target >= {CACHE_TARGET:g}x: **missed** (decoding is cheap here: small, fast-"
               "compressed PNGs from a warm page cache; real scans are larger and slower)")
    return ["## 1. Image cache against decoding every epoch (`bench/cache_vs_decode.py`)", "",
            f"The data part of an epoch: {f['lines']} synthetic line PNGs "
            f"{f['source_height']} px high, to {f['size']}, through the same DataLoader "
            f"(batch 16, {f['num_workers']} loader processes), median of {f['repeats']} "
            "alternating epochs each way.", "",
            *table([{"way": "image cache (memory-mapped uint8)",
                     "rate": f["cache_lines_per_s"]},
                    {"way": "decode + resize every image each epoch",
                     "rate": f["decode_lines_per_s"]},
                    {"way": "**ratio**", "rate": f"**{f['ratio']}x** ({verdict})"}],
                   [("way", "way"), ("rate", "lines/s")]),
            f"Building the cache once took {f['cache_build_s']} s for these {f['lines']} lines "
            "(one process); every later epoch of every trial reads it.", ""]


def augment_section(f: dict) -> list[str]:
    ratios = [r["ratio"] for r in f["rows"]]
    verdict = ("about as fast per core, so CPU training uses the batched path too: one code path "
               "on both devices" if min(ratios) >= 0.8 else
               "slower per core on the CPU here (see the ratio); the GPU is where it must run")
    return ["## 2. Augmentation on the CPU: per image (PIL/numpy) against batched (torch) "
            "(`bench/augment_cpu.py`)", "",
            f"One thread, batches of {f['batch']} synthetic lines; per image is how data-loader "
            "processes augmented before, batched is `psearch/writer_id/augment.py`, which "
            "training runs on its device (the GPU when there is one).", "",
            *table(f["rows"], [("size", "size"), ("per_image_pil_lines_per_s",
                                                   "per image, lines/s"),
                               ("batched_torch_lines_per_s", "batched, lines/s"),
                               ("ratio", "batched / per image")]),
            f"Batched is {verdict}.", ""]


def throughput_section(f: dict) -> list[str]:
    return ["## 3. Training throughput on the CPU (`bench/train_throughput.py`)", "",
            f"The real training step (uint8 batch, batched augmentation, forward, loss, backward, "
            f"clipping, AdamW), random weights, {f['threads']} torch threads, each model and size "
            "time-boxed after one warm-up step. GPU figures (AMP, peak memory): "
            "`bench/gpu_check.sh`, not run here (no GPU).", "",
            *table(f["rows"], [("model", "model"), ("size", "size"), ("batch", "batch"),
                               ("steps", "timed steps"), ("lines_per_s", "lines/s"),
                               ("precision", "precision"), ("cpu_share", "CPU share got")]),
            "CPU share got: the time its threads ran / (wall x threads); well below 1 means other "
            "processes took cores meanwhile and the rate understates the machine.", ""]


def pruner_section(f: dict) -> list[str]:
    s = f["settings"]
    return ["## 4. Pruners under one device-time budget (`bench/pruners.py`)", "",
            f"The built-in objective through the real launcher (`--cpu_workers 1`), synthetic data "
            f"of {s['writers']} similar writers (`--similarity 0.75`), model `small`, "
            f"{s['img_height']}x{s['img_width']}, {s['epochs']} epochs per trial, "
            f"{s['lines_per_writer']} lines per writer per epoch, seed {s['seed']}; each pruner "
            f"gets {s['budget_s']:g} device-seconds (the summed durations of its trials), then "
            "the run is stopped like a user stops it (the trial running then counts for "
            "nothing). Best value among complete trials; the curve of best value against "
            "device-seconds is `bench/pruner_curves.csv`. Other processes taking cores (Run "
            "times) slow the trials of whichever pruner runs then: compare the epochs trained.",
            "",
            *table(f["rows"], [("pruner", "pruner"), ("complete", "complete"),
                               ("pruned", "pruned"), ("epochs_trained", "epochs trained"),
                               ("best_val_page_top1", "best val page top-1"),
                               ("best_reached_at_s", "reached at device-s"),
                               ("trial0_val_page_top1", "trial 0's value")]),
            "Trial 0 has the same hyperparameters in every run (the sampler is seeded), so the "
            "spread of its value is the run-to-run noise of one training; differences of best "
            "values within that spread mean nothing. One seed and one small budget: the ranking "
            "of best values is indicative, not significant. What the table shows robustly is how "
            "many trials and epochs each pruner buys with the same device time.", ""]


def launcher_section(f: dict) -> list[str]:
    w = f["workers"]
    out = ["## 5. This launcher against plain Optuna (`bench/launcher_vs_optuna.py`)", "",
           f"Trials that only sleep, {f['workers']} workers on {f['cores']} cores, median of "
           f"{f['repeats']} interleaved runs (sequential: one run). `launcher`: "
           f"`parallel_search.py --cpu_workers {w}`; `plain`: {w} processes each "
           f"`optimize(n_trials=N/{w})` on one SQLite study; `n_jobs`: one process, "
           f"`optimize(n_jobs={w})` (threads); `sequential`: one "
           "process, one trial at a time. Effective parallelism = sum of trial durations / "
           "(wall x workers); wall includes starting the interpreters and imports; first trial = "
           "launch to the first trial's start. Ray Tune: " + f["ray_tune"] + ".", ""]
    for name, rows in f["scenarios"].items():
        columns = [("method", "method"), ("runs", "runs"), ("finished", "finished"),
                   ("wall_s", "wall s"), ("first_trial_s", "first trial after s"),
                   ("parallelism", "effective parallelism")]
        if any("speedup_vs_sequential" in r for r in rows):
            columns.append(("speedup_vs_sequential", "speed-up vs sequential"))
        out += [f"### {name} on {f['workers']} workers", "", *table(rows, columns)]
    out += ["Before its first trial the launcher validates the flags, checks the objective in a "
            "forked child, creates the study itself and forks its workers, which inherit its "
            "imports and take over its storage; `plain` pays an interpreter start and the Optuna "
            "imports in each of its processes, all competing for the cores. Threads (`n_jobs`) "
            "start at once but share one interpreter: fine for trials that wait on a device, not "
            "for trials that compute in Python.", ""]
    return out


def ddp_section(f: dict) -> list[str]:
    device = "CPU processes (gloo)" if f["device"] == "cpu" else "GPUs (NCCL)"
    out = ["## 6. One trial on two devices (`bench/ddp_scaling.py`)", "",
           f"The built-in objective through the launcher, `--gpus_per_trial 1` against `2`, on "
           f"{device}; model {f['model']} at {f['size']}, batch {f['batch']} per device, "
           f"{f['lines_per_epoch']} training lines per epoch, {f['epochs']} epochs, "
           f"{f['trials']} trials per run, {f['repeats']} interleaved runs each; medians over "
           "every trial. `other s` is a trial's wall time outside its epochs: for K = 2 mostly "
           "starting the ranks (each imports torch and opens the data).", ""]
    out += table(f["rows"], [("k", "devices per trial"), ("trials", "trials"),
                             ("wall_s", "trial wall s"), ("epochs_s", "in epochs s"),
                             ("other_s", "other s"), ("lines_per_s", "training lines/s"),
                             ("epoch_speedup", "epoch speed vs 1 device")])
    if f["device"] == "cpu":
        out += ["On the CPU both set-ups share the same cores (K = 1: one process with all of "
                "them as threads; K = 2: two single-threaded ranks), so an epoch-speed ratio here "
                "says how well this small model uses threads against processes, not what a second "
                "device buys. What carries over to GPUs is the cost per trial of starting the "
                "ranks (`other s`); the epoch speed-up on GPUs comes from `bench/ddp_scaling.py "
                "--device gpu` on a machine with two GPUs or more.", ""]
    return out


def trial_value_section(f: dict) -> list[str]:
    def fig(value: Any, digits: int = 3) -> Any:
        return None if value is None or value != value else round(value, digits)

    rows = [{"name": f"**`{name}`**" if name == f["winner"] else f"`{name}`",
             "summary": d["summary"], "agreement": fig(d["agreement"]),
             "agreement_own": fig(d["agreement_own"]),
             "pick": f"{fig(d['test_map_of_pick'])} / {fig(d['test_top1_of_pick'])}",
             "spearman": fig(d["spearman"]), "seed_sd": fig(d["seed_sd"]),
             "set_spread": fig(d["set_spread"]), "epoch": fig(d["mean_epoch"], 1)}
            for name, d in f["definitions"].items()]
    return ["## 7. Which trial value picks the hyperparameters that are best over seeds "
            "(`bench/trial_value.py`)", "",
            f"{f['sets']} sets of hyperparameters from the built-in space (model `small`, from "
            f"scratch), each trained under {f['seeds']} seeds for {f['epochs']} epochs (no "
            f"pruning, no early stopping) on synthetic similar writers (`--similarity 0.75`): "
            f"{f['writers']} writers, {f['val_pages']} validation and {f['test_pages']} test "
            f"pages, {f['size']}, {f['lines_per_writer']} training lines per writer per epoch. "
            "Truth of a set: the mean over its seeds of the test page mAP of its last third of "
            f"epochs. {f['searches']} simulated searches each compare {f['search_size']} sets, "
            "one seed run each, and keep the one the definition values most. Agreement: how "
            "often that is the set best by truth (chance: "
            f"{1 / f['search_size']:.2f}); own: best by the definition's mean over seeds. Pick: "
            "test page mAP / top-1 of the kept run's best_model.pth (the epoch the definition "
            "chose). Spearman: single-seed values against truth across sets, mean over seeds. "
            "Seed sd: spread of a set's value over seeds; set spread: of the sets' means.", "",
            *table(rows, [("name", "definition"), ("summary", "what it is"),
                          ("agreement", "agreement"), ("agreement_own", "agreement (own)"),
                          ("pick", "test mAP / top-1 of the pick"), ("spearman", "Spearman"),
                          ("seed_sd", "seed sd"), ("set_spread", "set spread"),
                          ("epoch", "mean chosen epoch")]),
            f"Winner: **`{f['winner']}`** (highest agreement; ties: higher test mAP of the pick), "
            f"from {f['sets']} x {f['seeds']} runs in {f['seconds']} s. The simulated searches "
            "all reuse these few runs: they are not independent, and other sets or seeds would "
            "move the agreements by more than the simulation's own error.", ""]


SECTIONS = (("cache", cache_section), ("augment", augment_section),
            ("throughput", throughput_section), ("pruners", pruner_section),
            ("launcher", launcher_section), ("ddp", ddp_section),
            ("trial_value", trial_value_section))


def render(info: dict, figures: dict, errors: dict, timings: Sequence[dict],
           quick: bool = False) -> str:
    """The whole RESULTS.md."""
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`bench/run_all.py`); rerun it rather than edit this file. "
             "Compare the side-by-side ratios; absolute rates depend on the machine and its load.",
             ""]
    if quick:
        lines += ["**A `--quick` smoke run: tiny settings, not figures to keep.**", ""]
    lines += machine_section(info)
    for name, section in SECTIONS:
        if figures.get(name) is not None:
            lines += section(figures[name])
        else:
            lines += [f"## {name}: failed", "", f"`{errors.get(name, 'no figures')}`", ""]
    lines += ["## Run times", "", *table(timings, [
        ("name", "benchmark"), ("seconds", "seconds"),
        ("others_cpu", "CPU taken by other processes meanwhile"), ("status", "status")])]
    return "\n".join(lines).rstrip() + "\n"
