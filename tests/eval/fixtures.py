"""Hand-made benchmark files in the VLMEvalKit TSV layout."""

from __future__ import annotations

import base64
import io

from PIL import Image

from vlrlhf.eval.tsv import write_tsv


def png_b64(colour=(200, 30, 30), size=(8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write(path, rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_tsv(path, [{column: row.get(column, "") for column in columns} for row in rows])
    return str(path)
