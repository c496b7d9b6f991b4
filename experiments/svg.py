"""Line plots and dot plots as SVG files, with no plotting library: enough for the study's figures (lines with
markers, linear or log axes, a legend, an optional horizontal reference line; dots with interval bars per category).
The runtime stays torch, numpy and tqdm.

    line_plot("loss.svg", [{"label": "LoRA-SB", "x": [1, 2, 3], "y": [1.2, 1.0, 0.9]}], "Training loss", "step", "loss")
    dot_plot("acc.svg", ["boolq", "piqa"], [{"label": "LoRA-SB", "y": [0.6, 0.5], "low": [0.5, 0.4],
             "high": [0.7, 0.6]}], "Accuracy", "accuracy")
"""

import math
from html import escape
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
PLOT_WIDTH, PLOT_HEIGHT = 460, 330
LEFT, TOP, BOTTOM = 70, 40, 50  # margins around the plot area; the legend sits in a right margin sized to its labels
LEGEND_CHAR_WIDTH = 7  # pixels per character at font-size 12, a little more than sans-serif needs on average


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (both > 0)."""
    return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:g}"


def line_plot(path, series: list[dict], title: str, xlabel: str, ylabel: str, logx: bool = False,
              logy: bool = False, hline: tuple[float, str] | None = None) -> None:
    """Write an SVG line plot. Each series is {"label", "x", "y"} and optionally "dashed": True and "color" (else
    the next of COLORS); points whose y is None are skipped. `hline` = (y, label) draws a grey reference line."""
    points = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if y is not None]
    ys = [y for _, y in points] + ([hline[0]] if hline else [])
    xs = [x for x, _ in points]
    xticks = log_ticks(min(xs), max(xs)) if logx else nice_ticks(min(xs), max(xs))
    yticks = log_ticks(min(ys), max(ys)) if logy else nice_ticks(min(ys), max(ys))
    fx = math.log10 if logx else float
    fy = math.log10 if logy else float
    x0, x1, y0, y1 = fx(xticks[0]), fx(xticks[-1]), fy(yticks[0]), fy(yticks[-1])
    plot_w, plot_h = PLOT_WIDTH, PLOT_HEIGHT
    width = LEFT + plot_w + 60 + LEGEND_CHAR_WIDTH * max(len(s["label"]) for s in series)
    height = TOP + plot_h + BOTTOM

    def px(x: float) -> float:
        return LEFT + (fx(x) - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (fy(y) - y0) / ((y1 - y0) or 1) * plot_h

    out = svg_open(width, height, plot_w, title)
    for x in xticks:
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP}" x2="{px(x):.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{tick_label(x)}</text>')
    out += y_grid(yticks, py, plot_w)
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(y_label(ylabel, plot_h))
    out += reference_line(hline, py, plot_w, label_below=True)
    for i, s in enumerate(series):
        color = s.get("color", COLORS[i % len(COLORS)])
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y is not None]
        dash = ' stroke-dasharray="6,4"' if s.get("dashed") else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        if len(pts) <= 30:  # markers only where they stay readable
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        ly = TOP + 14 + 18 * i
        out.append(f'<line x1="{LEFT + plot_w + 12}" y1="{ly - 4}" x2="{LEFT + plot_w + 36}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{LEFT + plot_w + 42}" y="{ly}">{escape(s["label"])}</text>')
    write(path, out)


def dot_plot(path, categories: list[str], series: list[dict], title: str, ylabel: str,
             hline: tuple[float, str] | None = None) -> None:
    """Write an SVG dot plot: for each category (an x position), one dot per series with a vertical bar from its
    low to its high value, the series side by side. Each series is {"label", "y", "low", "high"} (one value per
    category) and optionally "color". `hline` = (y, label) draws a grey reference line (e.g. chance)."""
    ys = [v for s in series for key in ("y", "low", "high") for v in s[key]] + ([hline[0]] if hline else [])
    yticks = nice_ticks(min(ys), max(ys))
    y0, y1 = yticks[0], yticks[-1]
    slot = max(60, 14 * len(series) + 20)  # pixels per category
    plot_w, plot_h = slot * len(categories), PLOT_HEIGHT
    width = LEFT + plot_w + 60 + LEGEND_CHAR_WIDTH * max(len(s["label"]) for s in series)
    height = TOP + plot_h + BOTTOM + 20

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    out = svg_open(width, height, plot_w, title)
    out += y_grid(yticks, py, plot_w)
    for c, name in enumerate(categories):
        cx = LEFT + slot * (c + 0.5)
        if c:
            out.append(f'<line x1="{LEFT + slot * c}" y1="{TOP}" x2="{LEFT + slot * c}" y2="{TOP + plot_h}" '
                       f'stroke="#ddd"/>')
        out.append(f'<text x="{cx:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{escape(name)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(y_label(ylabel, plot_h))
    out += reference_line(hline, py, plot_w, label_below=False)
    for i, s in enumerate(series):
        color = s.get("color", COLORS[i % len(COLORS)])
        offset = (i - (len(series) - 1) / 2) * 14
        for c, (y, low, high) in enumerate(zip(s["y"], s["low"], s["high"])):
            x = LEFT + slot * (c + 0.5) + offset
            out.append(f'<line x1="{x:.1f}" y1="{py(low):.1f}" x2="{x:.1f}" y2="{py(high):.1f}" stroke="{color}" '
                       f'stroke-width="2"/>')
            out.append(f'<circle cx="{x:.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/>')
        ly = TOP + 14 + 18 * i
        out.append(f'<circle cx="{LEFT + plot_w + 24}" cy="{ly - 4}" r="4" fill="{color}"/>')
        out.append(f'<text x="{LEFT + plot_w + 42}" y="{ly}">{escape(s["label"])}</text>')
    write(path, out)


# The parts both plots share, in the order they are drawn.

def svg_open(width: float, height: float, plot_w: float, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{LEFT + plot_w / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']


def y_grid(yticks: list[float], py, plot_w: float) -> list[str]:
    """A light horizontal line and a label at each y tick."""
    return [element for y in yticks for element in (
        f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + plot_w}" y2="{py(y):.1f}" stroke="#eee"/>',
        f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')]


def y_label(ylabel: str, plot_h: float) -> str:
    return (f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {TOP + plot_h / 2})">{escape(ylabel)}</text>')


def reference_line(hline: tuple[float, str] | None, py, plot_w: float, label_below: bool) -> list[str]:
    """A dashed grey line at y = hline[0], labelled hline[1] at its right end (below or above it); nothing if None."""
    if not hline:
        return []
    label_y = py(hline[0]) + (14 if label_below else -4)
    return [f'<line x1="{LEFT}" y1="{py(hline[0]):.1f}" x2="{LEFT + plot_w}" y2="{py(hline[0]):.1f}" '
            f'stroke="#888" stroke-dasharray="2,3"/>',
            f'<text x="{LEFT + plot_w - 4}" y="{label_y:.1f}" text-anchor="end" fill="#666">{escape(hline[1])}</text>']


def write(path, elements: list[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join([*elements, "</svg>"]) + "\n")
