"""Reading and checking task files and Hub tables into ``Example``s.

Every bad input fails with a ``DataFormatError`` naming where it is: the file and line of a JSON lines, CSV or TSV
file, or the row of a Parquet file or a Hub dataset's split (``dataset[split] row N``), and the option to change;
nothing reaches ``datasets`` or the tokenizer unchecked.
"""
import csv
import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import datasets
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError


#: what a task is: single-label classification
ONE_CLASS_PER_EXAMPLE = "a task gives each example one class"


class DataFormatError(ValueError):
    """A task file that cannot be used, missing or malformed; the message names the file (and line) and option."""


class MissingDataFile(DataFormatError, FileNotFoundError):
    """A task file, corpus or predict file is not where the options put it; the message names the path and option."""


class Example(NamedTuple):
    """One example and where it was read from (the line of its file, or the 0-based row of a Parquet file or Hub
    split); ``label`` is None only in inputs to predict, ``text_pair`` only outside sentence-pair tasks."""

    line: int
    text: str
    label: Optional[str]
    text_pair: Optional[str] = None


class Fields(NamedTuple):
    """The fields (JSON keys or columns) an example is read from."""

    text: str = "text"
    text_pair: Optional[str] = None
    label: str = "label"
    #: the option that names ``text``, for messages
    text_option: str = "text_field"

    def inputs(self) -> list[str]:
        return [self.text] if self.text_pair is None else [self.text, self.text_pair]

    def required(self, require_label: bool) -> list[str]:
        return [*self.inputs(), self.label] if require_label else self.inputs()

    def option(self, field: str) -> str:
        """The option that names `field`, for messages."""
        return {self.text: self.text_option, self.text_pair: "text_pair_field", self.label: "label_field"}[field]


@dataclass(frozen=True)
class Source:
    """Where examples come from and how a message points at one: ``path:line`` in a text file, ``path row N`` or
    ``dataset[split] row N`` (0-based, as ``ds[split][N]`` shows it) in a table."""

    name: str
    rows: bool = False

    def at(self, line: int) -> str:
        return f"{self.name} row {line}" if self.rows else f"{self.name}:{line}"

    def lines(self, numbers: list[int]) -> str:
        return _lines(numbers, "row" if self.rows else "line")


@dataclass(frozen=True)
class Split:
    """A split's checked examples, their source and, for a ``ClassLabel`` label column, its names in id order."""

    source: Source
    examples: list[Example]
    class_names: Optional[list[str]] = None


#: what a JSON file that is one document (an array of examples, say) is told
JSON_LINES = (
    "; .json and .jsonl files are read as JSON Lines, one object per line (`jq -c '.[]' in.json > out.jsonl`"
    " converts an array)"
)
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+")


def check_file(path: Path, option: str) -> None:
    """`path`, which `option` names, exists and holds something."""
    if not path.is_file():
        raise MissingDataFile(f"{path} does not exist (check `data_dir` and `{option}`, or run `prepare_data()`)")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path} is empty")


def read_file(path: Path, fields: Fields, require_label: bool, option: str, cache_dir: Optional[str]) -> Split:
    """A labeled (or, without ``require_label``, a predict) file in the format its suffix names."""
    suffix = path.suffix.lower()
    check_file(path, option)
    if suffix == ".parquet":
        try:
            table = load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
        except DatasetGenerationError as err:
            raise DataFormatError(f"{path}: not a readable Parquet file ({err.__cause__ or err})") from None
        return read_table(table, Source(str(path), rows=True), fields, require_label, option)
    if suffix in (".csv", ".tsv"):
        return Split(Source(str(path)), _read_delimited(path, suffix == ".tsv", fields, require_label))
    return Split(Source(str(path)), _read_jsonl(path, require_label, fields))


def _read_jsonl(path: Path, require_label: bool = True, fields: Fields = Fields()) -> list[Example]:
    """Check every line in plain Python, so a bad file fails with its line number instead of inside `datasets`.

    Blank lines are skipped (as the JSON loader does); texts may be empty (the caller decides). Without
    ``require_label``, a line may lack the label (its Example's label is None).
    """
    examples = []
    first_of_kind: dict[str, tuple[int, Any]] = {}  # label kind -> its first line and label
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            line = decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                hint = JSON_LINES if line.strip() in ("[", "{") else ""  # a whole file of indented JSON
                where = f"{path}:{lineno}"
                raise DataFormatError(f"{where}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
            if not isinstance(record, dict):
                hint = JSON_LINES if isinstance(record, list) else ""
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}{hint}")
            for key in fields.required(require_label):
                if key not in record:
                    raise DataFormatError(
                        f"{path}:{lineno}: no {key!r} field (its fields: {names(record)}; see `{fields.option(key)}`)"
                    )
            examples.append(_example(record, f"{path}:{lineno}", lineno, fields, require_label))
            kind = _label_kind(record.get(fields.label))
            if kind:
                first_of_kind.setdefault(kind, (lineno, record[fields.label]))
    if not examples:
        raise DataFormatError(f"{path} holds no examples")
    if len(first_of_kind) > 1:
        (kind, (line, label)), (other, (other_line, other_label)) = sorted(first_of_kind.items(), key=lambda k: k[1])
        raise DataFormatError(
            f"{path}: labels are {kind}s ({label!r} at line {line}) and {other}s ({other_label!r} at line "
            f"{other_line}): each would be a class of its own; write every label as a class name, or every one as an "
            "integer id"
        )
    return examples


def _label_kind(label: Any) -> Optional[str]:
    """What a JSON label's type makes it: an integer id, a boolean or a class name. A string of digits (or "true",
    "false") names the class its number (or boolean) does, so it has no kind of its own."""
    if isinstance(label, bool):
        return "boolean"
    if isinstance(label, int):
        return "integer"
    if not isinstance(label, str) or not label or label in ("true", "false"):
        return None
    return None if label.strip().lstrip("-").isdecimal() else "name"


def _read_delimited(path: Path, tsv: bool, fields: Fields, require_label: bool) -> list[Example]:
    """A CSV (standard quoting) or TSV (IANA: tab-delimited, no quoting) file with a header row, checked row by row
    with the ``csv`` module so every error names the line a record starts on."""
    # skipinitialspace: a CSV written "text, label" (a space after each comma), whose quoted fields then still parse
    csv_options = {"strict": True, "skipinitialspace": True}
    kind, options = ("TSV", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}) if tsv else ("CSV", csv_options)
    examples = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:  # utf-8-sig: a spreadsheet's byte-order mark
            reader = csv.reader(file, **options)
            try:
                header = next(reader, [])
                if not any(name.strip() for name in header):
                    raise DataFormatError(f"{path}:1: no header row; the first line names the columns, e.g. text,label")
                # a spreadsheet's export may end each line with unnamed, empty columns ("text,label,,")
                duplicates = sorted({name for name in header if name.strip() and header.count(name) > 1})
                if duplicates:
                    raise DataFormatError(f"{path}:1: the header names {names(duplicates)} more than once")
                for field in fields.required(require_label):
                    if field not in header:
                        raise DataFormatError(
                            f"{path}:1: no {field!r} column (columns: {names(header)}; see `{fields.option(field)}`;"
                            " the first line names the columns)"
                        )
                start = reader.line_num + 1
                for row in reader:
                    line, start = start, reader.line_num + 1
                    if not any(cell.strip() for cell in row):
                        continue  # a blank line, or a spreadsheet's row of empty cells (",,")
                    if len(row) != len(header):
                        hint = "a tab inside a text?" if tsv else "quote a text holding a comma"
                        raise DataFormatError(
                            f"{path}:{line}: {len(row)} fields where the header has {len(header)} ({hint})"
                        )
                    record: dict[str, Optional[str]] = dict(zip(header, row))
                    if not require_label and record.get(fields.label) == "":
                        record[fields.label] = None  # an input to predict without a known label
                    where = f"{path}:{line}"
                    examples.append(_example(record, where, line, fields, require_label, numbers_as_text=True))
            except csv.Error as err:
                raise DataFormatError(f"{path}:{reader.line_num}: malformed {kind} ({err})") from None
    except UnicodeDecodeError:
        check_utf8(path)  # names the line
        raise
    if not examples:
        raise DataFormatError(f"{path} holds no examples")
    if tsv:
        _warn_quoted_texts(path, examples)
    return examples


def _warn_quoted_texts(path: Path, examples: list[Example]) -> None:
    """A TSV file written with CSV quoting (pandas' ``to_csv(sep="\\t")`` quotes every text holding a quote) keeps
    its quotes as text; a text may also be a quotation, so this warns rather than fails."""
    quoted = [
        example.line
        for example in examples
        if any(len(text) > 1 and text[0] == text[-1] == '"' for text in (example.text, example.text_pair or ""))
    ]
    if quoted:
        warnings.warn(
            f"{path}: {len(quoted)} of {len(examples)} examples have a text wrapped in double quotes"
            f" ({_lines(quoted)}); a .tsv file is read without quoting (IANA TSV), so the quotes, and any doubled"
            " inside, stay in the text. Write the file without quoting, or as .csv (standard quoting), unless the"
            " texts are quotations"
        )


def read_table(table: Dataset, source: Source, fields: Fields, require_label: bool, option: str) -> Split:
    """The examples of a ``datasets`` table (a Parquet file, a Hub split), by 0-based row. A ``ClassLabel`` label
    column gives its names as labels; its -1 (no label) is an error in a labeled split."""
    for field in fields.required(require_label):
        if field not in table.column_names:
            raise DataFormatError(
                f"{source.name}: no {field!r} column (columns: {names(table.column_names)}; see"
                f" `{fields.option(field)}`)"
            )
    feature = table.features.get(fields.label)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    present = [field for field in (*fields.inputs(), fields.label) if field in table.column_names]
    data = table.select_columns(present).to_dict()
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):  # checked as a column
        data[fields.label] = _float_labels(data[fields.label], source, fields.label, require_label)
    examples = []
    for row in range(len(table)):
        record = {field: data[field][row] for field in present}
        label = record.get(fields.label)
        if class_names is not None and isinstance(label, int):
            if label < 0 and require_label:
                what = "split" if option.endswith("_split") else "file"
                raise DataFormatError(
                    f"{source.at(row)}: label {label} marks an unlabeled example: the {what} has no labels; choose a"
                    f" labeled {what} with --data.init_args.{option}"
                )
            record[fields.label] = None if label < 0 else class_names[label]
        examples.append(_example(record, source.at(row), row, fields, require_label))
    if not examples:
        raise DataFormatError(f"{source.name} holds no examples")
    return Split(source, examples, class_names)


def _float_labels(labels: list[Optional[float]], source: Source, field: str, require_label: bool) -> list[None]:
    """A float label column: class ids pandas stored as floats because some are missing (NaN), or no class ids at
    all. Missing labels are an error in a labeled split, naming their rows (in predict inputs, unknown labels); a
    float label is an error, as ``1.0`` is in a CSV file."""
    missing = {row for row, label in enumerate(labels) if label is None or math.isnan(label)}
    if missing and require_label:
        raise DataFormatError(
            f"{source.name}: {field!r} is missing (NaN) in {source.lines(sorted(missing))}; label every example or"
            " drop those rows (pandas stores an integer column with a missing value as floats)"
        )
    present = [row for row in range(len(labels)) if row not in missing]
    if present:
        row = present[0]
        raise DataFormatError(
            f"{source.at(row)}: {field!r} is a float column ({labels[row]} here): labels are class names or integer"
            " ids, so store class ids as integers"
        )
    return [None] * len(labels)


def _example(
    record: Mapping[str, Any],
    where: str,
    line: int,
    fields: Fields,
    require_label: bool,
    numbers_as_text: bool = False,
) -> Example:
    """One checked example: string texts, and a label that is a non-empty string, an integer (kept as its digits)
    or a boolean (``true``/``false``, as JSON spells them; a Parquet or Hub column of booleans, say).
    ``numbers_as_text``: labels are text (CSV, TSV), where a decimal number such as ``1.0`` is an error."""
    texts = []
    for field in fields.inputs():
        text = record[field]
        if not isinstance(text, str):
            raise DataFormatError(f"{where}: {field!r} must be a string, got {_show(text)}")
        texts.append(text)
    pair = texts[1] if len(texts) > 1 else None
    label = record.get(fields.label)
    if label is None and not require_label:
        return Example(line, texts[0], None, pair)
    if isinstance(label, bool):
        label = "true" if label else "false"
    elif isinstance(label, int):
        label = str(label)  # class ids as labels: their names are the numbers
    if not isinstance(label, str) or not label:
        task = {float: "regression", list: "multi-label"}
        unsupported = f" ({ONE_CLASS_PER_EXAMPLE}: no {task[type(label)]})" if type(label) in task else ""
        raise DataFormatError(
            f"{where}: {fields.label!r} must be a non-empty string, an integer or a boolean, got "
            f"{_show(label)}{unsupported}"
        )
    if numbers_as_text and _DECIMAL.fullmatch(label.strip()):
        raise DataFormatError(
            f"{where}: {fields.label!r} is {label!r}, a decimal number: labels are class names or integer ids "
            f"({ONE_CLASS_PER_EXAMPLE}: no regression)"
        )
    return Example(line, texts[0], label, pair)


def is_empty(example: Example) -> bool:
    return not example.text.strip() and not (example.text_pair or "").strip()


def _show(value: Any) -> str:
    return json.dumps(value, default=repr)[:40]


def names(names: Any) -> str:
    return ", ".join(repr(name) for name in names) or "none"


def label_order(label: str) -> tuple[int, int, str]:
    """Numbers first, in numeric order, then the other labels alphabetically; numbers written alike ("1", "01")
    by their text, so the class ids never depend on the order the labels were seen in."""
    digits = label.strip()
    number = digits.isdecimal() or (digits.startswith("-") and digits[1:].isdecimal())
    return (0, int(digits), label) if number else (1, 0, label)


def label_key(label: str) -> str:
    """What a person reads as the same label: ``"Positive"``, ``"positive "`` and ``"positive"`` alike, and one
    written with composed or decomposed accents (Unicode NFC, NFD) or with invisible characters (a zero-width
    space, say)."""
    visible = "".join(char for char in unicodedata.normalize("NFKC", label) if unicodedata.category(char) != "Cf")
    return " ".join(visible.split()).casefold()


def check_distinct_labels(source: Source, examples: list[Example]) -> None:
    """No two labels differ only in case or spaces: a stray ``"positive "`` would silently be a class of its own,
    trained and scored apart from ``"positive"``."""
    first_line: dict[str, int] = {}
    for example in examples:
        first_line.setdefault(example.label, example.line)
    spellings: dict[str, list[str]] = {}
    for label in first_line:
        spellings.setdefault(label_key(label), []).append(label)
    for variants in spellings.values():
        if len(variants) > 1:
            listed = ", ".join(f"{label!r} ({source.at(first_line[label])})" for label in variants)
            raise DataFormatError(
                f"{source.name}: the labels {listed} differ only in case, spaces or how their characters are encoded,"
                " so they would be separate classes; write each class one way"
            )


def check_known_labels(
    source: Source, examples: list[Example], classes: Sequence[str], given: bool = False
) -> None:
    """Every example's label is one of `classes`: the train split's, or with `given` those of the `label_names`
    option (a trained model's)."""
    known, keys = set(classes), {label_key(label): label for label in classes}
    for example in examples:
        if example.label in known:
            continue
        similar = keys.get(label_key(example.label))
        holder = "`label_names`" if given else "the train split"
        if similar:
            hint = f" ({holder} has {similar!r}: write each class one way)"
        else:
            hint = "" if given else "; a class no training example has is kept by listing every class in `label_names`"
        what = f"never occurs in {holder}"
        if given:
            what = f"is not one of the model's classes {list(classes)} (`label_names`)"
        raise DataFormatError(f"{source.at(example.line)}: label {example.label!r} {what}{hint}")


def decode(line: bytes, path: Path, lineno: int) -> str:
    """A line of a UTF-8 file; the first line's byte-order mark, which editors such as Notepad write, is dropped."""
    try:
        return line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} of the line);"
            " save the file as UTF-8, e.g. `iconv -f <its encoding> -t UTF-8`"
        ) from None


def check_utf8(path: Path) -> None:
    """Raise a `DataFormatError` naming the first line of `path` that is not UTF-8, if any."""
    with path.open("rb") as lines:
        for lineno, line in enumerate(lines, start=1):
            decode(line, path, lineno)


def _lines(numbers: list[int], noun: str = "line", shown: int = 10) -> str:
    """'line 22', 'lines 3, 6', or the first `shown` and how many more."""
    listed = ", ".join(map(str, numbers[:shown]))
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"{noun}{'' if len(numbers) == 1 else 's'} {listed}{more}"
