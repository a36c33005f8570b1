"""A synthetic handwriting-like data set in the real layout, for tests and demos.

Each writer gets a fixed style (pen width, slant, letter spacing, baseline wobble, size, ink
darkness and an own set of glyphs made of curves and dots); each line is a fresh random sequence
of "words" written right to left in that style on noisy paper. The writer is therefore learnable
from style, not from any one line's content. Pure numpy + PIL: no fonts, no downloads.

    python dataset.py make-synthetic demo_data --writers 8            # train/val/test layout
    python dataset.py make-synthetic demo_flat --writers 8 --flat     # writer folders only

(`dataset.py` at the root runs this module's CLI without loading torch.)
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from psearch.engine import cli
from psearch.engine.errors import EXIT_USAGE, UsageError
from psearch.writer_id.data_index import split_counts

logger = logging.getLogger(__name__)

GLYPHS_PER_WRITER = 10
REFERENCE_HEIGHT = 64   # style sizes below are in pixels at this line height
MESSY_NAMES = ("Writer 03 (Ibn Muqla)", "kātib, al-", "O'Neill \"the scribe\"", "كاتب ٧",
               "Yāqūt al-Mustaʿṣimī; copy", "scribe #5 [unsure]")
MESSY_EXTENSIONS = (".png", ".PNG", ".jpg", ".png", ".JPEG", ".tif", ".Png")


@dataclass(frozen=True)
class Glyph:
    """One letter shape in x-height units: x in [0, width], y < 0 above the baseline."""

    width: float
    strokes: tuple[np.ndarray, ...]   # each [k, 2] polyline
    dots: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class WriterStyle:
    """Everything that stays fixed for one writer (sizes in pixels at REFERENCE_HEIGHT)."""

    pen: float
    slant: float
    spacing: float
    word_gap: float
    wobble_amp: float
    wobble_period: float
    x_height: float
    ink: int
    glyphs: tuple[Glyph, ...]
    frequencies: np.ndarray


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 9) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def random_glyph(rng: np.random.Generator) -> Glyph:
    """A glyph of 1-2 quadratic curves from its right baseline point to its left one, plus dots."""
    width = rng.uniform(0.35, 1.3)
    top = 2.4 if rng.random() < 0.25 else 1.0        # an ascender, like alif or lam
    bottom = 1.0 if rng.random() < 0.2 else 0.25     # a descender, like ra or mim
    anchors = [np.array([width, 0.0])]
    for _ in range(int(rng.integers(1, 3))):
        anchors.append(np.array([rng.uniform(0, width), rng.uniform(-top, bottom)]))
    anchors.append(np.array([0.0, 0.0]))
    strokes = []
    for a, b in zip(anchors[:-1], anchors[1:]):
        control = np.array([rng.uniform(0, width), rng.uniform(-top, bottom)])
        strokes.append(_bezier(a, control, b))
    n_dots = int(rng.choice([0, 0, 1, 2, 3]))
    side = -1.5 if rng.random() < 0.6 else 0.7
    dots = tuple((width * (0.3 + 0.2 * k), side) for k in range(n_dots))
    return Glyph(width, tuple(strokes), dots)


def random_style(rng: np.random.Generator) -> WriterStyle:
    """A writer's fixed style."""
    glyphs = tuple(random_glyph(rng) for _ in range(GLYPHS_PER_WRITER))
    return WriterStyle(pen=rng.uniform(1.4, 4.5), slant=rng.uniform(-0.4, 0.4),
                       spacing=rng.uniform(0.5, 8.0), word_gap=rng.uniform(8.0, 24.0),
                       wobble_amp=rng.uniform(0.0, 3.5), wobble_period=rng.uniform(60.0, 300.0),
                       x_height=rng.uniform(9.0, 15.0), ink=int(rng.integers(10, 120)),
                       glyphs=glyphs, frequencies=rng.dirichlet(np.ones(GLYPHS_PER_WRITER)))


def _deform(glyph: Glyph, amount: float, rng: np.random.Generator) -> Glyph:
    """The same letter in another hand: each stroke bent by a smooth random offset."""
    t = np.linspace(0.0, 1.0, 9)[:, None]
    bend = lambda: 4 * t * (1 - t) * rng.normal(0.0, amount, size=2)  # noqa: E731
    strokes = tuple(st + (bend() if len(st) == len(t) else 0.0) for st in glyph.strokes)
    dots = tuple((x + rng.normal(0, amount / 2), y + rng.normal(0, amount / 2))
                 for x, y in glyph.dots)
    return Glyph(glyph.width * float(np.exp(rng.normal(0, amount / 2))), strokes, dots)


def shared_script_style(script: WriterStyle, own: WriterStyle, similarity: float,
                        rng: np.random.Generator) -> WriterStyle:
    """A writer of a shared script: the script's letters, deformed, and a style drawn
    `similarity` of the way from the writer's own towards the script's common one."""
    mix = lambda a, b: (1 - similarity) * a + similarity * b  # noqa: E731
    freq = mix(own.frequencies, script.frequencies)
    return WriterStyle(pen=mix(own.pen, script.pen), slant=mix(own.slant, script.slant),
                       spacing=mix(own.spacing, script.spacing),
                       word_gap=mix(own.word_gap, script.word_gap),
                       wobble_amp=mix(own.wobble_amp, script.wobble_amp),
                       wobble_period=mix(own.wobble_period, script.wobble_period),
                       x_height=mix(own.x_height, script.x_height),
                       ink=int(mix(own.ink, script.ink)),
                       glyphs=tuple(_deform(g, 0.35 * (1 - similarity), rng)
                                    for g in script.glyphs),
                       frequencies=freq / freq.sum())


def render_line(style: WriterStyle, rng: np.random.Generator, height: int = 64) -> np.ndarray:
    """uint8 [height, W] line of random words in `style`, dark ink on light paper, W ~ 300-900."""
    s = height / REFERENCE_HEIGHT
    width = int(rng.integers(300, 901) * s)
    x_height = style.x_height * s * rng.uniform(0.93, 1.07)
    strokes, dots = _layout(style, rng, width, x_height, s)
    slant = style.slant + rng.uniform(-0.04, 0.04)
    phase = rng.uniform(0, 2 * np.pi)

    def place(points: np.ndarray) -> np.ndarray:
        # slant shears around the baseline; the baseline itself wobbles along the line
        px = points[:, 0] - slant * points[:, 1] * x_height
        wobble = style.wobble_amp * s * np.sin(2 * np.pi * px / (style.wobble_period * s) + phase)
        return np.stack([px, 0.62 * height + points[:, 1] * x_height + wobble], axis=1)

    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    pen = max(1, round(style.pen * s * rng.uniform(0.9, 1.1)))
    ink = int(np.clip(style.ink + rng.integers(-12, 13), 0, 200))
    lengths = [len(p) for p in strokes]
    placed = place(np.concatenate(strokes)) if strokes else np.zeros((0, 2))
    for line in np.split(placed, np.cumsum(lengths)[:-1]):
        draw.line(line.ravel().tolist(), fill=ink, width=pen, joint="curve")
    r = max(1.0, pen * 0.8)
    for cx, cy in (place(np.array(dots)).tolist() if dots else []):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    return _on_paper(np.asarray(canvas), rng)


def _layout(style: WriterStyle, rng: np.random.Generator, width: int, x_height: float,
            s: float) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Random words right to left (as Arabic runs): strokes with x in pixels, y in x-heights."""
    strokes: list[np.ndarray] = []
    dots: list[tuple[float, float]] = []
    x = width - 6 * s
    while x > 20 * s:
        word = rng.choice(len(style.glyphs), size=int(rng.integers(2, 7)), p=style.frequencies)
        for k, g in enumerate(word):
            glyph = style.glyphs[g]
            left = x - glyph.width * x_height
            if left < 4 * s:
                break
            strokes += [np.column_stack([left + st[:, 0] * x_height, st[:, 1]])
                        for st in glyph.strokes]
            dots += [(left + dx * x_height, dy) for dx, dy in glyph.dots]
            x = left
            if k < len(word) - 1:  # the joining stroke along the baseline (kashida)
                strokes.append(np.array([[x, 0.0], [x - style.spacing * s, 0.0]]))
                x -= style.spacing * s
        x -= style.word_gap * s * rng.uniform(0.7, 1.3)
    return strokes, dots


def _on_paper(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Put the drawn ink on paper of a random tone with a soft gradient and sensor noise."""
    h, w = ink.shape
    tone = rng.uniform(205, 245) + np.linspace(0, rng.uniform(-15, 15), w)[None, :]
    noise = rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(1, 5)
    out = ink.astype(np.float32) * (tone / 255.0).astype(np.float32) + noise
    return np.clip(out, 0, 255).astype(np.uint8)


def writer_names(n: int, mess: bool = False) -> list[str]:
    """Folder names "writer_00"...; with `mess` every other one has spaces, punctuation, Arabic."""
    names = []
    for w in range(n):
        if mess and w % 2 == 1:
            k = w // 2
            base = MESSY_NAMES[k % len(MESSY_NAMES)]
            names.append(base if k < len(MESSY_NAMES) else f"{base} {k // len(MESSY_NAMES) + 1}")
        else:
            names.append(f"writer_{w:02d}")
    return names


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


def _page_dirs(writer_dir: Path, n_pages: int, flat: bool, nested: bool) -> list[Path]:
    """One writer's page folders: in train/val/test by split_counts unless flat; maybe in books."""
    counts = split_counts(n_pages)
    splits = [s for s, c in zip(("train", "val", "test"), counts) for _ in range(c)]
    dirs = []
    for p, split in enumerate(splits):
        base = writer_dir if flat else writer_dir.parent / split / writer_dir.name
        if nested:
            base = base / f"book {p // 3 + 1}"
        dirs.append(base / f"page_{p + 1:03d}")
    return dirs


def _save_line(pixels: np.ndarray, stem: Path, mess: bool, k: int) -> None:
    """Save as PNG; with `mess`, vary extension case/format and colour mode like real scans."""
    if not mess:
        Image.fromarray(pixels).save(stem.with_name(stem.name + ".png"), compress_level=1)
        return
    ext = MESSY_EXTENSIONS[k % len(MESSY_EXTENSIONS)]
    if k % 11 == 1:    # ink as alpha over transparent paper
        img = Image.fromarray(np.dstack([np.zeros_like(pixels)] * 3 + [255 - pixels]), "RGBA")
        ext = ".png"
    elif k % 11 == 2:  # a 16-bit grayscale scan
        img = Image.fromarray(pixels.astype(np.uint16) * 257)
        ext = ".png"
    elif k % 4 == 0:   # a colour scan with yellowed paper
        sepia = np.dstack([pixels, pixels * 0.94, pixels * 0.8]).astype(np.uint8)
        img = Image.fromarray(sepia, "RGB")
    else:
        img = Image.fromarray(pixels)
    ext_kwargs = {".png": {"compress_level": 1}, ".jpg": {"quality": 92}, ".jpeg": {"quality": 92}}
    img.save(stem.with_name(stem.name + ext), **ext_kwargs.get(ext.lower(), {}))


def _add_mess(writer_dir: Path, page_dir: Path, pixels: np.ndarray) -> None:
    """Add what real folders hold: corrupt files, an empty page, hidden and non-image files."""
    (page_dir / "line_900.png").write_bytes(b"")                       # zero bytes
    whole = page_dir / ".whole.png"
    Image.fromarray(pixels).save(whole)
    (page_dir / "line_901.png").write_bytes(whole.read_bytes()[:200])  # truncated mid-data
    whole.unlink()
    (writer_dir / "page_empty").mkdir(parents=True, exist_ok=True)
    (writer_dir / ".thumbnails").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(writer_dir / ".thumbnails" / "thumb.png")
    (page_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (page_dir / "notes.txt").write_text("transcription pending\n", encoding="utf-8")


def _check_args(out: Path, writers: int, pages_per_writer: int, lines_per_page: int,
                height: int) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder {str(out)!r} exists and is not empty; "
                                "choose a new folder")
    for name, value, low in (("writers", writers, 2), ("pages-per-writer", pages_per_writer, 2),
                             ("lines-per-page", lines_per_page, 1), ("height", height, 16)):
        if value < low:
            raise UsageError(f"--{name} must be at least {low}, got {value}")


def make_synthetic(out: str | Path, writers: int = 8, pages_per_writer: int = 10,
                   lines_per_page: int = 8, seed: int = 0, height: int = 64, flat: bool = False,
                   mess: bool = False, similarity: float = 0.0) -> Path:
    """Write a synthetic data set to `out` (train/val/test, or writer folders when `flat`).

    similarity 0: every writer has letters of their own (easy); towards 1, all writers write
    one shared script in ever more similar hands (harder, like real manuscripts).
    """
    out = Path(out)
    _check_args(out, writers, pages_per_writer, lines_per_page, height)
    if not 0.0 <= similarity < 1.0:
        raise UsageError(f"--similarity must be in [0, 1), got {similarity}")
    names = writer_names(writers, mess)
    script = random_style(_rng(seed, 2**32))
    first_page = first_pixels = None
    for w, name in enumerate(names):
        style = random_style(_rng(seed, w))
        if similarity > 0:
            style = shared_script_style(script, style, similarity, _rng(seed, w, 2**33))
        nested = mess and w % 3 == 0
        for p, page_dir in enumerate(_page_dirs(out / name, pages_per_writer, flat, nested)):
            page_dir.mkdir(parents=True, exist_ok=True)
            for line in range(lines_per_page):
                pixels = render_line(style, _rng(seed, w, p, line), height)
                _save_line(pixels, page_dir / f"line_{line + 1:03d}", mess, w + p * 3 + line)
                if first_page is None:
                    first_page, first_pixels = page_dir, pixels
    if mess:
        _add_mess(out / names[0] if flat else out / "train" / names[0], first_page, first_pixels)
    logger.info("Wrote %d writers x %d pages x %d lines (%s%s, similarity %.2f) to %s", writers,
                pages_per_writer, lines_per_page, "flat" if flat else "train/val/test",
                ", messy" if mess else "", similarity, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `python dataset.py make-synthetic` command line (every help states its default)."""
    parser = cli.Parser(short_usage="make-synthetic OUT_DIR [options]", description="Data tools for the writer-identification search.")
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("make-synthetic", help="write a synthetic handwriting-like data set")
    syn.add_argument("out", help="output folder; must not exist or be empty (required)")
    syn.add_argument("--writers", type=int, default=8, help="number of writers (default: 8)")
    syn.add_argument("--pages-per-writer", type=int, default=10, help="pages per writer, split "
                     "~70/15/15 (at least 2 validation pages from 4 pages on) into "
                     "train/val/test unless --flat (default: 10: 6/2/2 pages)")
    syn.add_argument("--lines-per-page", type=int, default=8, help="lines per page (default: 8)")
    syn.add_argument("--seed", type=int, default=0, help="random seed of styles and lines "
                     "(default: 0)")
    syn.add_argument("--height", type=int, default=64, help="line height in pixels (default: 64)")
    syn.add_argument("--similarity", type=float, default=0.0, help="0: every writer has letters "
                     "of their own (easy); towards 1: one shared script in ever more similar "
                     "hands (harder) (default: 0)")
    syn.add_argument("--flat", action="store_true", help="write writer folders directly, without "
                     "train/val/test (default: off)")
    syn.add_argument("--mess", action="store_true", help="add what real data has: odd extensions "
                     "and names, colour/16-bit/RGBA images, corrupt files, an empty page, a book "
                     "level, hidden files (default: off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 on a usage error."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        make_synthetic(args.out, writers=args.writers, pages_per_writer=args.pages_per_writer,
                       lines_per_page=args.lines_per_page, seed=args.seed, height=args.height,
                       flat=args.flat, mess=args.mess, similarity=args.similarity)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
