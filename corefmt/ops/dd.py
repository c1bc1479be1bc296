"""Copying part of an image into a new one, dd style (qemu-img dd).

The arithmetic is qemu-img 7.2's, quirks included, so scripts get the same
image: ``count`` blocks are counted from the start of the input, not from
``skip`` (``bs=1k skip=2 count=3`` copies 1 KiB), a skip past that end makes
an empty output (a warning, exit 0), and the output is created with exactly
the size to copy. Every block is written, zeros too, as qemu-img does (a
qcow2 output is fully allocated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from corefmt import plugins
from corefmt.block.chain import open_chain
from corefmt.block.node import BlockNode
from corefmt.errors import CorefmtError, OptionError
from corefmt.ops.create import create
from corefmt.ops.measure import SIZE_SUFFIX_HINT, MeasureError, strtosz

#: qemu-img dd's defaults and limits.
DEFAULT_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2**31 - 1
MAX_COUNT = 2**63 - 1
#: Blocks are copied this many bytes at a time (rounded to whole blocks): the
#: same bytes land in the same places as block by block, in far fewer requests.
COPY_CHUNK = 4 * 1024 * 1024
OPERANDS = ("bs", "count", "if", "of", "skip")

ProgressFn = Callable[[int, int], None]


@attrs.define
class DdArgs:
    """The operands (``None``: not given)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    count: int | None = None
    skip: int | None = None
    input: str | None = None
    output: str | None = None


@attrs.frozen
class DdPlan:
    """What gets copied: input bytes [start, end) to output offset 0; the
    output is created ``out_size`` bytes long."""

    start: int
    end: int
    out_size: int
    skip_past_end: bool


def cvtnum(name: str, text: str, low: int, high: int) -> int:
    """qemu-img's cvtnum_full, with its messages."""
    try:
        value = strtosz(text)
    except ValueError:
        first, second = SIZE_SUFFIX_HINT
        raise MeasureError(first.format(what=name), second) from None
    except Exception:  # measure's _Range: past 2**64 - 1
        value = high + 1
    if not low <= value <= high:
        raise OptionError(f"Invalid {name} specified. Must be between {low} and {high}.")
    return value


def parse_operands(words: Sequence[str]) -> DdArgs:
    """``bs=`` ``count=`` ``skip=`` ``if=`` ``of=`` in order, as qemu-img
    checks them (the first bad one is reported; a repeated one: the last)."""
    args = DdArgs()
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name not in OPERANDS:
            raise OptionError(f"unrecognized operand {name}")
        if name == "bs":
            args.block_size = cvtnum("bs", value, 1, MAX_BLOCK_SIZE)
        elif name == "count":
            args.count = cvtnum("count", value, 0, MAX_COUNT)
        elif name == "skip":
            args.skip = cvtnum("skip", value, 0, MAX_COUNT)
        elif name == "if":
            args.input = value
        else:
            args.output = value
    if args.input is None or args.output is None:
        raise OptionError("Must specify both input and output files")
    return args


def plan(size: int, args: DdArgs) -> DdPlan:
    """qemu-img dd's size arithmetic for an input of ``size`` bytes."""
    bs = args.block_size
    end = size
    if args.count is not None and args.count <= MAX_COUNT // bs and args.count * bs < end:
        end = args.count * bs
    skip = args.skip or 0
    past = args.skip is not None and (skip > MAX_COUNT // bs or end < skip * bs)
    if past:
        return DdPlan(end, end, 0, True)
    return DdPlan(skip * bs, end, end - skip * bs, False)


def copy_blocks(source: BlockNode, target: BlockNode, layout: DdPlan, block_size: int,
                progress: ProgressFn | None = None) -> None:
    """Input [start, end) to the output from offset 0, whole blocks at a time."""
    chunk = max(block_size, COPY_CHUNK - COPY_CHUNK % block_size)
    total = layout.end - layout.start
    buffer = memoryview(bytearray(min(chunk, total) if total else 0))
    done = 0
    if progress is not None:
        progress(0, total)
    while done < total:
        step = min(chunk, total - done)
        source.readinto(layout.start + done, buffer[:step])
        target.write(done, buffer[:step])
        done += step
        if progress is not None:
            progress(done, total)


def dd(args: DdArgs, *, source_format: str | None = None, output_format: str = "raw",
       force_share: bool = False, allow_protocols: Sequence[str] = (),
       source: object | None = None, progress: ProgressFn | None = None,
       warn: Callable[[str], None] | None = None) -> DdPlan:
    """Run a parsed qemu-img dd: open the input, create and fill the output.
    ``source`` replaces ``args.input`` as what is opened (a spec for
    --image-opts); ``warn`` gets the skip-past-the-end warning."""
    with open_chain(source if source is not None else args.input, source_format,
                    read_only=True, force_share=force_share,
                    allow_protocols=allow_protocols) as node:
        if output_format not in plugins.registry().formats:
            raise CorefmtError("Unknown file format")
        layout = plan(node.virtual_size, args)
        try:
            create(args.output, output_format, layout.out_size)
        except CorefmtError as error:
            raise CorefmtError(f"{args.output}: error while creating output image: "
                               f"{error}") from error
        with open_chain(args.output, output_format, backing=False) as target:
            if layout.skip_past_end and warn is not None:
                warn(f"{args.input}: cannot skip to specified offset")
            copy_blocks(node, target, layout, args.block_size, progress)
    return layout
