import pytest

from companion.data import (
    SCHEMAS, DataError, available_datasets, dataset_spec, load_data, load_jsonl, read_jsonl,
)

EXPECTED = {"short_qa", "chatterbot_qa", "mmlu", "sentiment", "books"}


def test_registry_names():
    assert EXPECTED <= set(available_datasets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_dataset_loads_offline_with_disjoint_fixed_splits(name):
    spec = dataset_spec(name)
    data = load_data(name)
    assert len(data["validation"]) == spec.validation_size
    assert len(data["test"]) == spec.test_size
    assert len(data["train"]) > 0
    assert set(data["train"].column_names) == set(SCHEMAS[spec.kind])
    ids = [set(data[split]["id"]) for split in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == sum(len(data[s]) for s in data)  # ids are unique
    assert load_data(name)["test"]["id"] == data["test"]["id"]  # same split every time
    if spec.kind == "classification":
        assert set(data["train"]["label"]) == set(spec.labels)


def test_mmlu_rows_are_well_formed():
    row = load_data("mmlu")["test"][0]
    assert len(row["choices"]) == 4 and 0 <= row["label"] < 4 and row["subject"]


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "1", "question": "q", "answer": "a", "category": "c"}\n{oops\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"rows\.jsonl:2"):
        load_jsonl(path, "qa")


def test_missing_field_and_bad_label_are_named(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "1", "question": "q", "answer": "a", "category": "c"}\n'
                    '{"id": "2", "question": "q", "category": "c"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing field 'answer'"):
        load_jsonl(path, "qa")
    path.write_text('{"id": "1", "text": "nice", "label": "great"}\n')
    with pytest.raises(DataError, match="label 'great' is not one of"):
        load_jsonl(path, "classification", labels=["negative", "positive"])


def test_unknown_dataset_and_source():
    with pytest.raises(DataError, match="unknown dataset 'arc'; known: books"):
        load_data("arc")
    with pytest.raises(DataError, match="source must be"):
        load_data("mmlu", source="s3")
    with pytest.raises(DataError, match="no Hub source"):
        load_data("books", source="hub")


def test_hub_failure_points_to_offline_copy(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(DataError, match=r"use load_data\('short_qa'\) for the offline copy"):
        load_data("short_qa", source="hub")
