"""Drawing Figure 4 (Section 4.1): groups of generated sequences, in the terminal or a PNG.

For each model (one κ), the paper shows three groups of sequences generated from one
prompt: a blue group where every sequence draws its own latent Z, then two green groups
where one Z is drawn and shared by the whole group. What to look for is whether the green
groups agree with themselves (same target position, same noise) more than the blue one.
Both renderings keep one character per cell so columns line up and positions can be
compared by eye: the target letter in the group colour, ``'!'`` in red, ``'_'`` faint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from freeformer.data.synthetic import LETTERS, PROMPT_LEN, SEQ_LEN
from freeformer.errors import ConfigError, DataError, UserError

GROUP_COLOURS = ("blue", "green")

_ANSI_LETTER = {"blue": "\x1b[1;34m", "green": "\x1b[1;32m"}  # bold + colour
_ANSI_NOISE = "\x1b[31m"  # red
_ANSI_BLANK = "\x1b[2m"  # dim
_ANSI_RESET = "\x1b[0m"

# RGB cell colours for the PNG.
_RGB = {
    "blue": (0.16, 0.38, 0.82),
    "green": (0.13, 0.60, 0.27),
    "noise": (0.86, 0.16, 0.16),
    "blank": (0.93, 0.93, 0.93),
    "prompt": (0.35, 0.35, 0.35),
    "foreign": (1.00, 0.60, 0.00),  # a character that should not be there (malformed output)
    "empty": (1.00, 1.00, 1.00),  # past the end of a short string, and between groups
}


def _check_colour(colour: str) -> str:
    if colour not in GROUP_COLOURS:
        raise ConfigError(f"group colour must be one of {GROUP_COLOURS}, got {colour!r}")
    return colour


def render_ansi(s: str, colour: str = "blue") -> str:
    """``s`` with ANSI colours: letters bold in ``colour``, ``'!'`` red, ``'_'`` dim."""
    _check_colour(colour)
    out: list[str] = []
    style_of_run, run = None, []

    def flush() -> None:
        if run:
            text = "".join(run)
            out.append(f"{style_of_run}{text}{_ANSI_RESET}" if style_of_run else text)
            run.clear()

    for c in s:
        if c in LETTERS:
            style = _ANSI_LETTER[colour]
        elif c == "!":
            style = _ANSI_NOISE
        elif c == "_":
            style = _ANSI_BLANK
        else:
            style = ""
        if style != style_of_run:
            flush()
            style_of_run = style
        run.append(c)
    flush()
    return "".join(out)


def render_group_ansi(strings: Sequence[str], colour: str) -> str:
    """One coloured line per string (``colour``: ``"blue"`` = independent Z, ``"green"`` =
    shared Z, as in the paper)."""
    _check_colour(colour)
    return "\n".join(render_ansi(s, colour) for s in strings)


def _check_strings(label: str, what: str, strings: object) -> list[str]:
    if (
        isinstance(strings, str)
        or not isinstance(strings, Sequence)
        or not all(isinstance(s, str) for s in strings)
    ):
        raise DataError(f"panel {label!r}: {what} must be a list of strings")
    return list(strings)


def _groups_of(label: str, panel: object) -> list[tuple[str, str, list[str]]]:
    """(name, colour, strings) for each group of a panel, in drawing order."""
    if not isinstance(panel, Mapping) or "independent" not in panel or "shared" not in panel:
        raise DataError(f"panel {label!r} must be a dict with keys 'independent' and 'shared'")
    groups = [
        ("independent Z", "blue", _check_strings(label, "'independent'", panel["independent"]))
    ]
    shared = panel["shared"]
    if isinstance(shared, str) or not isinstance(shared, Sequence):
        raise DataError(f"panel {label!r}: 'shared' must be a list of groups (lists of strings)")
    for k, group in enumerate(shared):
        groups.append(
            (f"shared Z #{k + 1}", "green", _check_strings(label, "each 'shared' group", group))
        )
    return groups


def _cell_colour(c: str, index: int, letter: str | None, colour: str) -> tuple[float, float, float]:
    if index < PROMPT_LEN:
        return _RGB["prompt"]
    if c == "_":
        return _RGB["blank"]
    if c == "!":
        return _RGB["noise"]
    if c == letter:
        return _RGB[colour]
    return _RGB["foreign"]


def plot_figure4(
    panels: Mapping[str, Mapping], path: str | Path, *, show_text: bool = True, dpi: int = 150
) -> Path:
    """Draw Figure 4 to a PNG at ``path`` and return the path.

    ``panels`` maps a model label (e.g. ``"κ = 1/8 bit"``) to ``{"prompt": "K>",
    "independent": [strings], "shared": [[strings], [strings], ...]}``. Models are stacked
    vertically; each shows its independent-Z group (blue) then its shared-Z groups (green),
    one row of cells per string, one column per character: body letters equal to the prompt
    letter in the group colour, ``'!'`` red, ``'_'`` light grey, the prompt dark grey and
    any other character orange (malformed output). With ``show_text`` the characters are
    also written in the cells. Uses matplotlib's Agg canvas directly: no window, no pyplot
    global state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'freeformer[plot]'") from None
    if not isinstance(panels, Mapping) or not panels:
        raise DataError("plot_figure4 needs a non-empty dict of panels {model label: groups}")

    laid_out = []  # per model: (label, prompt, rows); a row is (group name, colour, string) or None
    width = SEQ_LEN
    for label, panel in panels.items():
        groups = _groups_of(str(label), panel)
        rows: list[tuple[str, str, str] | None] = []
        for g, (name, colour, strings) in enumerate(groups):
            if g:
                rows.append(None)  # a blank row between groups
            rows.extend((name, colour, s) for s in strings)
            width = max([width, *map(len, strings)])
        prompt = panel.get("prompt") or next((r[2][:PROMPT_LEN] for r in rows if r), "")
        laid_out.append((str(label), str(prompt), rows))

    cell_in = 0.12  # inches per character cell
    heights = [max(len(rows), 1) for _, _, rows in laid_out]
    fig = Figure(
        figsize=(width * cell_in + 1.6, sum(heights) * cell_in + 0.55 * len(laid_out) + 0.6),
        dpi=dpi,
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(laid_out), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[
        :, 0
    ]
    fig.suptitle(
        "blue: Z drawn per sequence; green: one Z shared by the group; red: '!' noise",
        fontsize=8,
    )
    for ax, (label, prompt, rows) in zip(axes, laid_out):
        image = [[_RGB["empty"]] * width for _ in range(max(len(rows), 1))]
        for i, row in enumerate(rows):
            if row is None:
                continue
            _, colour, s = row
            letter = s[0] if s and s[0] in LETTERS else None
            for j, c in enumerate(s):
                image[i][j] = _cell_colour(c, j, letter, colour)
                if show_text:
                    dark = image[i][j] not in (_RGB["blank"], _RGB["empty"], _RGB["foreign"])
                    ax.text(
                        j,
                        i,
                        c,
                        ha="center",
                        va="center",
                        family="monospace",
                        fontsize=5.5,
                        color="white" if dark else "0.35",
                    )
        ax.imshow(image, interpolation="nearest", aspect="equal")
        # One y label per group, at the group's middle row, in the group's colour.
        starts = [
            i for i, r in enumerate(rows) if r is not None and (i == 0 or rows[i - 1] is None)
        ]
        ticks, names, colours = [], [], []
        for i0 in starts:
            i1 = i0
            while i1 + 1 < len(rows) and rows[i1 + 1] is not None:
                i1 += 1
            ticks.append((i0 + i1) / 2)
            names.append(rows[i0][0])
            colours.append(_RGB[rows[i0][1]])
        ax.set_yticks(ticks, names, fontsize=7)
        for tick, colour in zip(ax.get_yticklabels(), colours):
            tick.set_color(colour)
        ax.set_xticks([])
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"{label}   (prompt {prompt!r})", fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
