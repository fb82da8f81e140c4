import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genforge.common.errors import DataError
from genforge.data.text import load_documents, split_text


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return str(path)


def test_txt_doc_splits(tmp_path):
    p = write(tmp_path / "a.txt", "first para\nstill first\n\n\n  \t\nsecond\r\n\r\nthird\n")
    assert load_documents(p) == ["first para\nstill first", "second", "third\n"]
    assert load_documents(p, doc_split="line") == ["first para", "still first", "second", "third"]
    assert load_documents(p, doc_split="file") == ["first para\nstill first\n\n\n  \t\nsecond\n\nthird\n"]


def test_split_text_drops_blank_pieces():
    assert split_text("\n\n  \n", "paragraph") == []
    assert split_text("a\n\n\nb", "line") == ["a", "b"]


def test_jsonl_csv_parquet(tmp_path):
    rows = [{"text": "héllo", "id": 1}, {"text": "wörld\nline two", "id": 2}]
    jl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_documents(jl, field="text") == ["héllo", "wörld\nline two"]

    cs = write(tmp_path / "d.csv", 'id,text\n1,héllo\n2,"wörld\nline two"\n')
    assert load_documents(cs, field="text") == ["héllo", "wörld\nline two"]

    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["héllo", None, "x"]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), field="text") == ["héllo", "", "x"]


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_missing_field_names_the_fields(tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        write(path, json.dumps({"body": "x", "id": 1}) + "\n")
    elif ext == "csv":
        write(path, "body,id\nx,1\n")
    else:
        pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body, id\)"):
        load_documents(str(path), field="text")
    with pytest.raises(DataError, match=r"set --field .*fields: body, id"):
        load_documents(str(path))


def test_jsonl_record_errors(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"other": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: no field 'text' \(fields: other\)"):
        load_documents(p, field="text")
    p = write(tmp_path / "e.jsonl", '{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"e.jsonl:2: not valid JSON"):
        load_documents(p, field="text")
    p = write(tmp_path / "f.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match="is int, not text"):
        load_documents(p, field="text")


def test_folder_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    write(tmp_path / "b" / "z.txt", "from b/z")
    write(tmp_path / "a.txt", "from a\n\nsecond of a")
    write(tmp_path / "c.jsonl", json.dumps({"t": "from c"}) + "\n")
    write(tmp_path / "README.md", "not data")
    write(tmp_path / ".hidden" / "x.txt", "never")
    assert load_documents(str(tmp_path), field="t") == ["from a", "second of a", "from b/z", "from c"]


def test_builtin_pydoc():
    from pydoc_data.topics import topics

    docs = load_documents("builtin:pydoc")
    assert docs == [topics[k] for k in sorted(topics)]
    with pytest.raises(DataError, match="available: builtin:pydoc"):
        load_documents("builtin:nope")


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="empty"):
        load_documents(write(tmp_path / "empty.txt", "\n  \n"))
    with pytest.raises(DataError, match="unsupported file type '.md'"):
        load_documents(write(tmp_path / "x.md", "hi"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="the folder is empty"):
        load_documents(str(tmp_path / "emptydir"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text"):
        load_documents(str(bad))
    with pytest.raises(DataError, match="unknown doc_split"):
        load_documents(write(tmp_path / "ok.txt", "hi"), doc_split="sentence")


def test_error_messages_are_one_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError) as e:
        load_documents(str(bad))
    assert "\n" not in str(e.value)
