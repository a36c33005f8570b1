#!/usr/bin/env python3
"""A training program of our own, tuned with --command: it takes its parameters as `--name value`
flags or `name=value` overrides (whichever it is given), writes what it got to
$PSEARCH_TRIAL_DIR/got.json (with its pid and the PSEARCH_* variables), then "trains" for
--epochs epochs of SLEEPY_SECONDS/epochs each, printing `psearch: epoch=E val_acc=V loss=L`.
val_acc rises towards `x`. Its `mode` parameter (else PROGRAM_MODE): ok (default), fail (exit 1
with a last stderr line), nometric (prints no val_acc), nan (prints val_acc=nan). As one of
several ranks (RANK set) rank r > 0 writes got_rank{r}.json. SIGTERM ends it at once."""
import json
import math
import os
import sys
import time


def parse(args):
    """{name: value} from `--name value` pairs and `name=value` words; the rest positional."""
    got, rest, i = {}, [], 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args):
            got[args[i][2:]] = args[i + 1]
            i += 2
        elif "=" in args[i]:
            name, _, value = args[i].partition("=")
            got[name] = value
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return got, rest


def main():
    got, rest = parse(sys.argv[1:])
    trial_dir = os.environ["PSEARCH_TRIAL_DIR"]
    torchrun = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    record = {"params": got, "positional": rest, "pid": os.getpid(), "argv": sys.argv[1:],
              "env": {k: v for k, v in os.environ.items()
                      if k.startswith("PSEARCH_") or k in torchrun}}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(trial_dir, "got.json" if rank == 0 else f"got_rank{rank}.json"),
              "w") as f:
        json.dump(record, f)
    mode = got.get("mode", os.environ.get("PROGRAM_MODE", "ok"))
    epochs = int(got.get("epochs", 4))
    x = float(got.get("x", 0.5))
    for epoch in range(1, epochs + 1):
        time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.4")) / epochs)
        acc = x * (1 - math.exp(-epoch))
        if mode == "nometric":
            print(f"psearch: epoch={epoch} loss={1 - acc:.4f}", flush=True)
        elif mode == "nan" and epoch == 2:
            print(f"psearch: epoch={epoch} val_acc=nan", flush=True)
        else:
            print(f"psearch: epoch={epoch} val_acc={acc:.4f} loss={1 - acc:.4f}", flush=True)
        print(f"epoch {epoch} done", file=sys.stderr, flush=True)
    if mode == "fail":
        print("Traceback (most recent call last):\nValueError: the data ran out", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(trial_dir, "model.txt"), "w") as f:
        f.write(f"trained with x={x}\n")


if __name__ == "__main__":
    main()
