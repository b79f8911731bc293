"""scripts/gpu_smoke.py, the prepared check for a GPU slot, runs here in its `--size tiny` mode (the demo model on the
CPU, the same runs, plans and table as `--size 3b`), so that a renamed flag, a metrics key or a refused plan breaks
the suite and not the GPU slot."""

import json
import os
import re
import subprocess
import sys

from launch import REPO, env

SCRIPT = os.path.join(REPO, "scripts", "gpu_smoke.py")
RUNS = {"sdpa-acc1": 1, "sdpa-acc2": 2, "save": 1, "resume": 1}  # the tiny mode's runs and their accumulation
NUMBER = r"-?\d+(?:\.\d+)?"


def test_tiny_smoke_runs_and_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--size", "tiny", "--workdir", str(tmp_path)], env=env(),
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out[-4000:]}\n{result.stderr[-8000:]}"
    probe = re.search(rf"mem_get_info after init: (n/a \(no CUDA\)|{NUMBER} GiB free of {NUMBER} GiB)$", out, re.M)
    assert probe, out[-3000:]  # the child that reads the GPU's memory ran
    cpu = probe[1].startswith("n/a")
    lines = out[out.index("gpu_smoke summary:"):].splitlines()

    # One row per run: attention, accumulation, then 14 figures (step time, tokens/s, allocated, reserved, plan,
    # reserve, the 7 plan terms, reserved / plan).
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[3:] == ["step_s", "tok/s", "alloc", "reserv", "plan", "reserve", "params", "grads",
                                  "optim", "largest", "root", "activ", "logits", "res/plan"]
    rows = {}
    for line in lines:
        match = re.fullmatch(rf"(\S+)\s+(?:sdpa|flash)\s+(\d+)((?:\s+{NUMBER}){{14}})", line)
        if match:
            rows[match[1]] = (int(match[2]), [float(x) for x in match[3].split()])
    flash = {"flash-acc1": 1, "flash-acc2": 2} if "flash-acc1" in rows else {}  # on CUDA, where flash-attn imports
    assert {name: acc for name, (acc, _) in rows.items()} == RUNS | flash, out
    for name, (_, figures) in rows.items():
        step_s, tokens_s, allocated, reserved, plan, reserve, *terms, ratio = figures
        assert step_s > 0 and tokens_s > 0 and allocated > 0 and reserved >= allocated, name
        assert plan > 0 and reserve > 0 and all(t > 0 for t in terms), name
        assert abs(ratio - reserved / (plan + reserve)) < 0.02, name

    for name in RUNS | flash:  # a verdict per run (on the CPU RSS is above the plan: said, not judged)
        assert re.search(rf"^{name}: (plan covers the measured peak|PLAN TOO LOW by {NUMBER} GiB)", out, re.M), name
    save = re.search(rf"^save/resume, window of steps 2-2 \(sdpa, accumulation 1\): uninterrupted {NUMBER}/{NUMBER} "
                     rf"MiB loss ({NUMBER}); holding the save {NUMBER}/{NUMBER} MiB loss ({NUMBER}); first after "
                     rf"the resume {NUMBER}/{NUMBER} MiB loss ({NUMBER}); checkpoint_save_s ({NUMBER})$", out, re.M)
    assert save, out[-3000:]
    assert not cpu or save[1] == save[2] == save[3]  # on the CPU the resumed run continues the others exactly
    assert float(save[4]) > 0
    profiled = re.search(r"^profile_step: (\{.*\})$", out, re.M)  # the profiled steps' counts
    assert profiled, out[-3000:]
    counts = json.loads(profiled[1])
    assert counts["optimizer_launches"] > 0 and counts["vision_launches"] > 0 and counts["host_syncs"] >= 1
    assert counts["optimizer_s"] > 0 and counts["step_s"] > counts["optimizer_s"] and counts["mfu"] > 0
    assert counts["launch_unit"] == ("aten op" if cpu else "cudaLaunchKernel")
    assert out.rstrip().endswith("gpu_smoke: OK")
