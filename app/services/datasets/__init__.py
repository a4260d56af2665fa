"""Dataset validation and reading, shared by the upload route and the training process.

Files are read row by row (never whole in memory). The first row decides the format; each
format has one row checker that either normalises the row or says in words what is wrong, and
one statistics accumulator. A problem is reported with the number of the first bad line (or
"row N" for Parquet). Pure Python (pyarrow only for Parquet): no torch here.

Encoding: UTF-8, with or without a byte-order mark (stripped, like CRLF line ends); a UTF-16 or
UTF-32 file is refused with a message that says so. No line may be longer than
``DatasetLimits.max_line_bytes`` (lines are read at most that long, so one huge line never fills
the memory). ``DatasetLimits`` also holds the fewest rows a file needs and the fewest examples a
label needs; the upload route fills it from the settings, other readers keep the defaults.

Sources: JSONL, CSV/TSV (a header line), Parquet (detected by its ``PAR1`` magic bytes), and
plain text (a ``.txt`` upload, stored with format ``text``: every blank-line-separated paragraph
is one ``{"text": ...}`` row). Plain text cannot be told from CSV by its content, so readers pass
the stored format back: ``iter_examples(path, fmt=file.format)``.

The rooms: ``checks`` (a row checker per format), ``formats`` (the registry that pairs each
with its keys and ``statistics``), ``lines``, ``jsonl``, ``plain_text``, ``tables`` (CSV) and
``parquet`` (the readers), ``sources`` (which reader a file needs), ``validation`` (the whole
file, once).
"""

from app.services.datasets.errors import DatasetError
from app.services.datasets.limits import DEFAULT_MAX_LINE_BYTES, DatasetLimits
from app.services.datasets.validation import DatasetInfo, iter_examples, validate_dataset

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "DatasetError",
    "DatasetInfo",
    "DatasetLimits",
    "iter_examples",
    "validate_dataset",
]
