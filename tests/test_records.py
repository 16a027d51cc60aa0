"""Every typed record reads back from the JSON it writes, field for field and key order included."""

import json
from dataclasses import asdict

import pytest

from rmexport.records import (
    CutRecord,
    Evaluation,
    FoldParity,
    GuardRecord,
    ModelInfo,
    PruneRecord,
    Quality,
    RepairedBlock,
    RepairRecord,
    SourceQuality,
    TensorRefit,
    from_jsonable,
    jsonable,
)


def _prune_record() -> PruneRecord:
    return PruneRecord(
        model=ModelInfo("smollm2-135m", "gguf", "/x.gguf", "LlamaForCausalLM", "llama", 576),
        L=30,
        n=8,
        N=22,
        ratio=0.25,
        kept_layers=[0, 1, *range(10, 30)],
        cuts=[CutRecord([2, 10], list(range(2, 10)), {"solver": "lstsq", "ridge": 0.1}, {"distance": 0.25})],
        selection={"rule": "distance", "scores": {"2": 0.123457}},
        solver={"name": "lstsq", "map": "hidden"},
        calibration={"source": "builtin", "samples": 512, "hash": "abc"},
        evaluation=Evaluation("builtin", 4096, 512),
        fold_parity=FoldParity(1e-5, 12.5, 1e-3, 64, True),
        quality=Quality(15.0, 50.0, 27.35, [SourceQuality("docs", 4096, 10.0, 30.0, 20.0)], True),
        guard=GuardRecord(
            "64 set-aside documents",
            "repair 1",
            {"builtin": {"fitted": 3.5, "repair 1": 3.25, "plain_removal": 4.0}},
            {"fitted": 3.5, "repair 1": 3.25, "plain_removal": 4.0},
        ),
        tokenizer_parity={"method": "transformers", "verdict": "identical"},
        memory={"budget_bytes": None},
        saved_dtype="bfloat16",
        versions={"torch": "2.4"},
        compute={"device": "cpu"},
        timings_s={"load": 1.5, "save": 0.25},
        peak_rss_mib=900.5,
        peak_rss_mib_after_stage={"load": 800.0, "save": 900.5},
        repair=RepairRecord(
            [
                RepairedBlock(
                    10,
                    "model.layers.2.mlp.down_proj.weight",
                    0.01,
                    0.0025,
                    0.003,
                    attention=TensorRefit("model.layers.2.self_attn.o_proj.weight", 0.1, 0.002, 0.0031),
                ),
                RepairedBlock(11, "model.layers.3.mlp.down_proj.weight", None, 0.004, 0.004),
            ],
            1,
            20.5,
        ),
    )


RECORDS = {
    "prune": (PruneRecord, _prune_record()),
    "source quality": (SourceQuality, SourceQuality("wiki", 1024, 1.0, 2.0, 1.5)),
    "quality without out-of-domain text": (Quality, Quality(1.0, 2.0, 1.5)),
    "guard off": (GuardRecord, GuardRecord(None, "fitted")),
    "no repair": (RepairRecord, RepairRecord([], 0, 0.0, note="no block follows the cut")),
}


@pytest.mark.parametrize("kind, record", RECORDS.values(), ids=RECORDS)
def test_a_record_round_trips_through_json(kind, record):
    text = json.dumps(jsonable(asdict(record)), indent=2)
    back = from_jsonable(kind, json.loads(text))
    assert back == record
    assert json.dumps(jsonable(asdict(back)), indent=2) == text


def test_prune_record_reads_back_from_prune_json():
    record = _prune_record()
    data = json.loads(json.dumps(record.to_json()))
    back = PruneRecord.from_json(data)
    assert back == record and isinstance(back.quality.out_of_domain[0], SourceQuality)
    assert back.to_json() == data and list(back.to_json()) == list(data)


def test_an_unknown_field_is_an_error():
    with pytest.raises(TypeError):
        from_jsonable(Evaluation, {"source": "builtin", "tokens": 1, "window": 1, "renamed": 2})
