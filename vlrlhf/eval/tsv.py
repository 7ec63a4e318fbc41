"""Benchmark files in the VLMEvalKit TSV layout.

One row per question; columns `index`, `image`, `question`, and per benchmark
`answer`, options `A`..`I`, `category`, `l2-category`, `hint`, ... An `image` cell
holds base64 image bytes, or, when 64 characters or fewer, the `index` of another row
whose image it reuses (MME's two questions per image, MMBench's rotations); a cell
that starts with `[` is a list of such cells (multi-image), parsed with
`ast.literal_eval`, never `eval`. Bad rows (a missing cell, corrupt base64, a
reference to no row) raise an error naming file, row and index, or are skipped and
counted under `on_bad_record: skip`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import pathlib
import sys

from vlrlhf.data.reader import BadRecords

OPTION_LETTERS = "ABCDEFGHI"
REFERENCE_MAX = 64


@dataclasses.dataclass
class BenchItem:
    """One benchmark question with its images resolved to bytes."""

    index: str
    row: int  # 1-based data row in the file
    question: str
    images: list[bytes]
    answer: str | None
    options: dict[str, str]  # letter -> text, the non-empty option columns in order
    fields: dict[str, str]  # every other column (category, l2-category, hint, split, ...)
    image_key: str = ""  # the row whose image this is (rows sharing a picture share it)

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)


class TSVError(ValueError):
    """A bad benchmark row under on_bad_record=raise: names file, row and index."""


def _is_empty(cell: str | None) -> bool:
    return cell is None or cell.strip() == "" or cell.strip().lower() == "nan"


def read_tsv(path: str | pathlib.Path, required: tuple[str, ...] = ("index", "question"),
             bad: BadRecords | None = None, needs_image: bool = True,
             drop_without_image: bool = False) -> list[BenchItem]:
    """All good rows of a VLMEvalKit TSV, images resolved; bad rows per `bad`'s policy.

    needs_image: the `image` column is required and an empty cell is a bad row; otherwise a row
    without an image is a text-only question. drop_without_image: rows whose image cell is empty
    are left out (VLMEvalKit's rule) and counted in `bad.dropped_by_rule`."""
    bad = bad or BadRecords()
    path = pathlib.Path(path)
    csv.field_size_limit(sys.maxsize)  # base64 image cells are megabytes
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = reader.fieldnames or []
        wanted = set(required) | ({"image"} if needs_image else set())
        missing = sorted(wanted - set(columns))
        if missing:
            raise TSVError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})")
        rows = list(reader)
    cells = {row["index"]: row.get("image") for row in rows}
    items = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}:row {number} (index {row.get('index')})"
        if drop_without_image and _is_empty(row.get("image")):
            bad.dropped_by_rule["no image (rules=vlmevalkit)"] += 1
            continue
        try:
            items.append(_item(row, number, cells, needs_image))
        except TSVError as error:
            bad.handle(where, error.args[0].split(":", 1)[0], str(error), stage="benchmark")
    return items


def _item(row: dict, number: int, cells: dict, needs_image: bool) -> BenchItem:
    for name in ("index", "question"):
        if _is_empty(row.get(name)):
            raise TSVError(f"empty_cell: the {name!r} cell is empty")
    images, key = [], row["index"]
    if needs_image or not _is_empty(row.get("image")):
        images, key = resolve_images(row["image"], row["index"], cells)
    options = {letter: row[letter].strip() for letter in OPTION_LETTERS
               if letter in row and not _is_empty(row[letter])}
    skip = {"index", "image", "question", "answer", *OPTION_LETTERS}
    fields = {name: (value or "").strip() for name, value in row.items() if name not in skip and name is not None}
    answer = None if _is_empty(row.get("answer")) else row["answer"].strip()
    return BenchItem(row["index"].strip(), number, row["question"].strip(), images, answer, options, fields, key)


def resolve_images(cell: str | None, index: str, cells: dict) -> tuple[list[bytes], str]:
    """Image bytes of a cell (base64, a row reference, or a list of those) and the key of
    the row that holds the (first) image."""
    if _is_empty(cell):
        raise TSVError("empty_cell: the 'image' cell is empty")
    cell = cell.strip()
    if cell.startswith("["):
        try:
            parts = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise TSVError("bad_image_list: the 'image' cell starts with '[' but is not a list literal") from None
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise TSVError("bad_image_list: the 'image' list must hold strings (base64 or row indices)")
    else:
        parts = [cell]
    images, keys = [], []
    for part in parts:
        part = part.strip()
        key = index
        if len(part) <= REFERENCE_MAX:  # the index of the row whose image this reuses
            if part not in cells:
                raise TSVError(f"dangling_reference: image cell {part!r} names no row's index")
            target = (cells[part] or "").strip()
            if len(target) <= REFERENCE_MAX:
                raise TSVError(f"dangling_reference: image cell {part!r} names a row without image data")
            key, part = part, target
        images.append(decode_base64(part))
        keys.append(key)
    return images, keys[0]


def decode_base64(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TSVError("corrupt_base64: the image cell is not valid base64") from None
    if not data:
        raise TSVError("corrupt_base64: the image cell decodes to nothing")
    return data


def write_tsv(path: str | pathlib.Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) as a VLMEvalKit-style TSV."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
