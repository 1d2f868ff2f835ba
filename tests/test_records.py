"""companion.records: JSON-lines files survive torn writes, glued lines and two writers."""

import multiprocessing
import time

import pytest

from companion import records
from companion.data import DataError, read_jsonl


def test_append_then_read_round_trip(tmp_path):
    path = tmp_path / "results.jsonl"
    records.append_record(path, {"a": 1})
    records.append_record(path, {"b": "é"})
    assert records.read_records(path) == [{"a": 1}, {"b": "é"}]
    assert path.read_bytes().endswith(b"\n")


def test_a_torn_last_line_is_set_aside_and_the_run_resumes(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": 1}\n{"key": 2}\n{"key": 3, "to')
    with pytest.warns(RuntimeWarning, match=r"results.jsonl:3: the last line .* was cut off"):
        rows = records.read_records(path)
    assert rows == [{"key": 1}, {"key": 2}]
    assert path.read_text() == '{"key": 1}\n{"key": 2}\n'
    assert (tmp_path / "results.jsonl.torn").read_text() == '{"key": 3, "to\n'
    records.append_record(path, {"key": 3})
    assert [row["key"] for row in records.read_records(path)] == [1, 2, 3]


def test_a_last_line_without_newline_is_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": 1}')  # a hand edit that dropped the final newline
    records.append_record(path, {"key": 2})
    assert records.read_records(path) == [{"key": 1}, {"key": 2}]


def test_a_damaged_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": 1}\nnot json\n{"key": 3}\n')
    with pytest.raises(records.RecordsError, match=r"results.jsonl:2: damaged line in the middle"):
        records.read_records(path)


def test_non_utf8_data_file_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: not UTF-8"):
        read_jsonl(path)


def _hold_lock(folder, seconds):
    with records.locked(folder):
        time.sleep(seconds)


def test_a_second_writer_waits_for_the_lock_and_says_so(tmp_path, capsys):
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(tmp_path, 1.0))
    holder.start()
    time.sleep(0.3)
    with pytest.raises(BlockingIOError, match="another run is writing"):
        with records.locked(tmp_path, wait=False):
            pass
    start = time.perf_counter()
    with records.locked(tmp_path):
        waited = time.perf_counter() - start
    holder.join()
    assert waited > 0.3
    assert "waiting for it to finish" in capsys.readouterr().err
