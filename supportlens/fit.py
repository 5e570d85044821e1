"""Tables that fit the terminal they are printed on, and never cut an id.

Support copies a request or report id from one lookup into the next, so an id column is
never wrapped or shortened. Every other column may wrap between words, never inside one
(a word longer than :data:`LONGEST_WORD` folds, and Chinese text between any two
characters), and keeps at least :data:`MIN_CELL` characters a line. What does not fit the
width the table gets is given up in this order: its borders, then the columns it names as
optional (said in its caption), and last the table itself: it is printed vertically, one
block per row and a line per column. The choice is made when the table is rendered, so
one table uses a wide terminal and stays readable on a narrow one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Sequence

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text

MIN_CELL = 8  # characters a line a wrapped cell keeps (fewer is a column nobody can read)
LONGEST_WORD = 24  # a longer word (a URL, a stack frame) may fold inside itself


def fit(table: Table, ids: Collection[str] = (), optional: Sequence[str] = ()) -> "Fitted":
    """``table`` as a renderable that fits its width. ``ids`` are the headers of columns that
    print whole on one line (ids, and bars such as a waterfall); ``optional`` those of
    columns to leave out, first named first, when the width is short."""
    return Fitted(table, frozenset(ids), tuple(optional))


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # "table", "borderless" or "vertical"
    hidden: tuple[str, ...] = ()


class Fitted:
    def __init__(self, table: Table, ids: frozenset[str], optional: tuple[str, ...] = ()) -> None:
        self.table = table
        self.ids = ids
        self.optional = optional
        self._minimum: dict[str, int] = {}
        self._natural: dict[str, int] = {}
        for column in table.columns:
            header = str(column.header)
            lines = [line for cell in column.cells for line in _plain(cell).splitlines()]
            longest = max((cell_len(line) for line in lines), default=0)
            word = max((_unbroken(w) for line in lines for w in line.split()), default=0)
            if header in ids:
                column.no_wrap = True
                column.overflow = "ignore"
                need = longest
            else:
                column.overflow = "fold"
                need = min(longest, max(MIN_CELL, min(word, LONGEST_WORD)))
            need = max(need, min(_longest_word(header), LONGEST_WORD), column.min_width or 0)
            column.min_width = need
            self._minimum[header] = need
            self._natural[header] = max(need, longest, cell_len(_plain(column.header)))

    def minimum_width(self, box: bool = True, hidden: Collection[str] = ()) -> int:
        """The narrowest the table can be with every id whole and no word broken, with its
        borders or without, and without the columns ``hidden``."""
        table = self.table
        shown = [i for i, column in enumerate(table.columns) if str(column.header) not in hidden]
        width = sum(self._minimum[str(table.columns[i].header)] + table._get_padding_width(i) for i in shown)
        if box and table.box is not None:
            width += len(shown) - 1 + (2 if table.show_edge else 0)
        return width

    def layout(self, width: int) -> Layout:
        """What fits ``width``: the table, without borders, without optional columns, or vertical."""
        for count in range(len(self.optional) + 1):
            hidden = self.optional[:count]
            for box in (True, False):
                if self.minimum_width(box, hidden) <= width:
                    return Layout("table" if box else "borderless", hidden)
                if self.table.box is None:
                    break
        return Layout("vertical")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        if self.layout(options.max_width) == Layout("table"):
            return Measurement.get(console, options, self.table)
        return Measurement(min(options.max_width, 20), options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        layout = self.layout(options.max_width)
        if layout.kind == "vertical":
            yield from self.vertical()
        else:
            yield self._shown(layout, options.max_width)

    def _widths(self, layout: Layout, width: int) -> dict[str, int] | None:
        """Column widths that fit ``width``, narrowing first the columns with the most to give
        above their minimum (rich would narrow the widest, below any minimum); ``None`` when
        the table fits as it is."""
        borders = layout.kind == "table"
        natural = {h: w for h, w in self._natural.items() if h not in layout.hidden}
        frame = self.minimum_width(borders, layout.hidden) - sum(self._minimum[h] for h in natural)
        excess = frame + sum(natural.values()) - width
        if excess <= 0:
            return None
        widths = dict(natural)
        while excess > 0:
            header = max(widths, key=lambda h: widths[h] - self._minimum[h])
            if widths[header] <= self._minimum[header]:
                break  # cannot happen: the layout was chosen to fit the minimums
            widths[header] -= 1
            excess -= 1
        return widths

    def _shown(self, layout: Layout, width: int) -> Table:
        """The table as ``layout`` says, in ``width`` (a copy, unless it is the table itself)."""
        table = self.table
        widths = self._widths(layout, width)
        if layout == Layout("table") and widths is None:
            return table
        columns = [dataclasses.replace(c, _cells=list(c._cells), width=widths[str(c.header)] if widths else c.width)
                   for c in table.columns if str(c.header) not in layout.hidden]
        caption = table.caption
        if layout.hidden:
            note = f"({', '.join(layout.hidden)} left out at this width)"
            caption = f"{caption}\n{note}" if isinstance(caption, str) and caption else (caption or note)
        borders = layout.kind == "table"
        shown = Table(*columns, title=table.title, caption=caption, title_justify=table.title_justify,
                      caption_justify=table.caption_justify, box=table.box if borders else None,
                      show_edge=table.show_edge if borders else False, padding=table.padding,
                      show_header=table.show_header, header_style=table.header_style, expand=table.expand)
        shown.rows = list(table.rows)  # per-row styles and separators, the cells are in the columns
        return shown

    def vertical(self) -> Iterator[RenderableType]:
        """One block per row, ``header  value`` a line, ids unwrapped."""
        table = self.table
        if table.title:
            yield Text.from_markup(table.title, style="bold") if isinstance(table.title, str) else table.title
        headers = [str(column.header) for column in table.columns]
        label = max((cell_len(h) for h in headers), default=0)
        rows = list(zip(*(list(column.cells) for column in table.columns)))
        for number, cells in enumerate(rows):
            block = Table.grid(padding=(0, 2))
            block.add_column(style="bold", min_width=label, no_wrap=True)
            block.add_column(overflow="fold")
            for header, cell in zip(headers, cells):
                if header in self.ids:
                    cell = Text(_plain(cell), no_wrap=True, overflow="ignore")
                block.add_row(header, cell)
            if number:
                yield Text("")
            yield block
        if table.caption:
            yield Text.from_markup(table.caption, style="dim") if isinstance(table.caption, str) else table.caption


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return ""


def _unbroken(word: str) -> int:
    """How wide ``word`` must print unbroken. Chinese and Japanese text has no spaces between
    words and may break between any two characters, so a run of wide characters needs none."""
    width = cell_len(word)
    return min(width, MIN_CELL) if width > len(word) else width


def _longest_word(header: object) -> int:
    return max((cell_len(word) for word in _plain(header).split()), default=0)
