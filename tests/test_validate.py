"""The check before training: bad rows stop the run (all listed) or are skipped; long rows are dropped;
batches are grouped by length."""

import json

from ftloop.data.sampler import StepBatchSampler
from launch import check, forked_python_m, forked_torchrun, train_flags


def bundle_rows(bundle) -> list[dict]:
    return json.loads(open(bundle["train_json"]).read())


def write_with_bad_rows(bundle, tmp_path):
    rows = bundle_rows(bundle)
    image_row = next(r for r in rows if "image" in r)
    bad = [dict(image_row, image="missing.png"),
           {"conversations": [{"from": "robot", "value": "beep"}]},
           dict(image_row, conversations=[{"from": "human", "value": "no placeholder"},
                                          {"from": "gpt", "value": "x"}]),
           # Found only when one rank opens it: the ranks must share what they found.
           dict(image_row, image=str(tmp_path / "corrupt.png"))]
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows[:4] + bad + rows[4:]))
    return data, len(rows)


def test_every_bad_row_is_listed_by_the_ranks_together(tiny_bundle, tmp_path):
    data, _ = write_with_bad_rows(tiny_bundle, tmp_path)
    result = forked_torchrun(2, ["-m", "ftloop.train", *train_flags(tiny_bundle, tmp_path / "out", "--train-data",
                                                                    str(data), "--max-steps", "1")])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ftloop: error:")]
    assert [e.split(": row ")[1].split(":")[0] for e in errors[:-1]] == ["5", "6", "7", "8"], errors
    assert "cannot read image" in errors[3]
    assert "4 bad rows" in errors[-1] and "DataError" not in result.stderr  # (torchrun adds its own report)
    assert not (tmp_path / "out" / "final").exists()


def test_skip_bad_rows_trains_on_the_rest(tiny_bundle, tmp_path):
    data, good = write_with_bad_rows(tiny_bundle, tmp_path)
    result = check(forked_torchrun(2, ["-m", "ftloop.train", *train_flags(
        tiny_bundle, tmp_path / "out", "--train-data", str(data), "--max-steps", "1", "--skip-bad-rows")]))
    assert f"using {good} rows; skipped 4 bad rows" in result.stdout


def test_long_rows_are_dropped_and_counted_or_cut_after_the_image(tiny_bundle, tmp_path):
    # Image rows of the bundle are ~40 tokens, text rows ~30: a limit of 35 drops the image rows.
    flags = train_flags(tiny_bundle, tmp_path / "drop", "--max-steps", "1", "--max-seq-length", "35")
    result = check(forked_python_m("ftloop.train", flags))
    dropped = int(result.stdout.split("rows; skipped 0 bad rows and ")[1].split()[0])
    assert 0 < dropped < len(bundle_rows(tiny_bundle))
    # --truncation right keeps them, cut after the image: training runs on every row.
    flags = train_flags(tiny_bundle, tmp_path / "right", "--max-steps", "1", "--max-seq-length", "35",
                        "--truncation", "right")
    result = check(forked_python_m("ftloop.train", flags))
    assert "skipped" not in result.stdout


def test_padding_ratio_is_logged(tiny_bundle, tmp_path):
    check(forked_python_m("ftloop.train", train_flags(tiny_bundle, tmp_path, "--max-steps", "2",
                                                      "--per-device-train-batch-size", "4", "--logging-steps", "1")))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(0 <= r["padding_ratio"] < 1 for r in records)


def steps_of(sampler: StepBatchSampler) -> list[list[int]]:
    batches = list(sampler)
    return [sorted(i for b in batches[s * sampler.accumulation:(s + 1) * sampler.accumulation] for i in b)
            for s in range(sampler.steps_per_epoch)]


def padding(sampler: StepBatchSampler, lengths: list[int]) -> float:
    padded = real = 0
    for batch in sampler:
        padded += len(batch) * max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
    return 1 - real / padded


def test_length_grouping_keeps_steps_equal_across_world_sizes_and_cuts_padding():
    lengths = [(i * 7919) % 500 + 10 for i in range(400)]
    # world, micro-batch, accumulation: 16 rows a step. Buckets are micro-batches, so the order is the same for
    # one --per-device-train-batch-size (a resume keeps the first run's, test_sampler).
    layouts = [(1, 2, 8), (2, 2, 4), (4, 2, 2), (8, 2, 1)]
    grouped = [StepBatchSampler(400, w, r, b, a, seed=3, lengths=lengths, mega_steps=5)
               for w, b, a in layouts for r in range(w)]
    for epoch in (0, 1):
        per_layout = {}
        for sampler in grouped:
            sampler.set_epoch(epoch)
            steps = per_layout.setdefault((sampler.world_size, sampler.micro_batch), [[] for _ in range(25)])
            for step, rows in enumerate(steps_of(sampler)):
                steps[step] += rows
        reference = [sorted(rows) for rows in next(iter(per_layout.values()))]
        assert all([sorted(rows) for rows in steps] == reference for steps in per_layout.values())
        assert sorted(i for rows in reference for i in rows) == list(range(400))
    plain = StepBatchSampler(400, 1, 0, 4, 2, seed=3)
    assert padding(StepBatchSampler(400, 1, 0, 4, 2, seed=3, lengths=lengths, mega_steps=5), lengths) < \
        0.5 * padding(plain, lengths)
