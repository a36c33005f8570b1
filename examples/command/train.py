"""Train a small MLP on a noisy two-moons problem: a plain PyTorch script that knows nothing of
the search tuning it. Run it alone:

    python examples/command/train.py --lr 3.0e-3 --optimizer adam --epochs 10 --out /tmp/moons

or tune it (from the repository root; see examples/command/README.md):

    python parallel_search.py --command "python $PWD/examples/command/train.py --epochs 15" \\
        --space examples/command/space.yaml --metric val_acc --checkpoint_dir runs/moons \\
        --n_trials 20 --cpu_workers 2

What ties it to the search is only its output and two environment variables: after each epoch it
prints `psearch: epoch=E val_acc=A val_loss=L train_loss=T`; it writes into $PSEARCH_TRIAL_DIR
(the default --out) and, when $PSEARCH_RESUME_FROM names an interrupted run's folder, continues
from that run's last.pt.
"""
import argparse
import math
import os
import sys

import torch
from torch import nn

DATA_SEED = 1234  # fixed apart from --seed: every trial sees the same data set
N_TRAIN, N_VAL, NOISE = 2000, 500, 0.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2)")
    a("--weight_decay", type=float, default=0.0, help="weight decay (default: 0)")
    a("--hidden", type=int, default=64, help="width of the two hidden layers (default: 64)")
    a("--dropout", type=float, default=0.0, help="dropout after each hidden layer (default: 0)")
    a("--optimizer", choices=("sgd", "adam"), default="adam", help="optimizer (default: adam)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    a("--epochs", type=int, default=10, help="epochs to train (default: 10)")
    a("--batch_size", type=int, default=64, help="batch size (default: 64)")
    a("--seed", type=int, default=0, help="seed of the model's init and shuffling (default: 0)")
    a("--out", default=os.environ.get("PSEARCH_TRIAL_DIR", "."),
      help="folder for best_model.pt and last.pt (default: $PSEARCH_TRIAL_DIR, else .)")
    return p.parse_args(argv)


def two_moons(n, generator):
    """`n` points of two interleaved half circles with Gaussian noise, and their 0/1 labels."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(labels == 0, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(labels == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=1) + NOISE * torch.randn(n, 2, generator=generator)
    return points, labels


def make_model(hidden, dropout):
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 2))


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def train_epoch(model, optimizer, x, y, batch_size, generator):
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(x)


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), \
        nn.functional.cross_entropy(logits, y).item()


def save(obj, path):
    """torch.save through a temporary file, so a run killed mid-save leaves the old file whole."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_state(device):
    """The last.pt of the run named by $PSEARCH_RESUME_FROM, or None to start afresh."""
    folder = os.environ.get("PSEARCH_RESUME_FROM")
    path = os.path.join(folder, "last.pt") if folder else None
    if path is None or not os.path.isfile(path):
        return None
    print(f"resuming from {path}", file=sys.stderr, flush=True)
    return torch.load(path, map_location=device)


def main(argv=None):
    args = parse_args(argv)
    print(f"args: {vars(args)}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    data = torch.Generator().manual_seed(DATA_SEED)
    x_train, y_train = (t.to(device) for t in two_moons(N_TRAIN, data))
    x_val, y_val = (t.to(device) for t in two_moons(N_VAL, data))

    torch.manual_seed(args.seed)
    model = make_model(args.hidden, args.dropout).to(device)
    optimizer = make_optimizer(args, model.parameters())
    start, best_acc, best_model = 1, 0.0, None
    state = resume_state(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best_acc, best_model = state["epoch"] + 1, state["best_acc"], state["best_model"]
        # The resumed run has a folder of its own: it starts with the best model so far.
        save(best_model, os.path.join(args.out, "best_model.pt"))

    for epoch in range(start, args.epochs + 1):
        # Shuffling and dropout seeded per epoch: a resumed run goes on exactly as an unbroken one.
        torch.manual_seed(args.seed * 1000 + epoch)
        shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        train_loss = train_epoch(model, optimizer, x_train, y_train, args.batch_size, shuffle)
        val_acc, val_loss = evaluate(model, x_val, y_val)
        if best_model is None or val_acc > best_acc:
            best_acc = val_acc
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save(best_model, os.path.join(args.out, "best_model.pt"))
        save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
              "best_acc": best_acc, "best_model": best_model}, os.path.join(args.out, "last.pt"))
        print(f"psearch: epoch={epoch} val_acc={val_acc:.4f} val_loss={val_loss:.4f} "
              f"train_loss={train_loss:.4f}", flush=True)
    # The search takes the LAST val_acc printed as the trial's value: print the best epoch's, so
    # that a trial counts what its best_model.pt scores, not where its final epoch happened to land.
    print(f"psearch: val_acc={best_acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
