"""launch.forked_torchrun, which most multi-process tests use instead of torchrun, starts what torchrun starts: the
same script as __main__ with the same arguments, working folder and launcher variables (the ones ftloop reads), a
fresh interpreter's multiprocessing default, and, what makes it fast, the imports already done. Run as a script,
this file is the worker: it writes what it sees."""

import json
import multiprocessing
import os
import sys

from launch import REPO, check, forked_torchrun, torchrun

READ_BY_FTLOOP = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                  "WANDB_MODE"]
"""What ftloop reads of its environment under a launcher (grep `environ` in ftloop/), less TORCHELASTIC_ERROR_FILE
and TORCHELASTIC_USE_AGENT_STORE: the error file is the launcher's summary, and the agent's store is met only
after a restart; tests of those use torchrun."""
PER_LAUNCH = {"MASTER_PORT", "TORCHELASTIC_RUN_ID"}


def seen(prefix: str) -> list[dict]:
    return [json.load(open(f"{prefix}.rank{rank}.json")) for rank in range(2)]


def test_a_forked_rank_sees_what_a_torchrun_rank_sees(tmp_path):
    script = os.path.abspath(__file__)
    check(torchrun(2, [script, str(tmp_path / "torchrun"), "--flag", "value"]))
    check(forked_torchrun(2, [script, str(tmp_path / "forked"), "--flag", "value"]))
    real, forked = seen(str(tmp_path / "torchrun")), seen(str(tmp_path / "forked"))
    for rank in range(2):
        a, b = real[rank], forked[rank]
        assert {k: v for k, v in a["environment"].items() if k not in PER_LAUNCH} == \
               {k: v for k, v in b["environment"].items() if k not in PER_LAUNCH}, (a, b)
        assert a["environment"].keys() == b["environment"].keys() == set(READ_BY_FTLOOP)
        assert a["argv"][0] == b["argv"][0] == script and a["argv"][2:] == b["argv"][2:] == ["--flag", "value"]
        assert a["name"] == b["name"] == "__main__"
        assert a["cwd"] == b["cwd"] == REPO and a["start_method"] == b["start_method"] == "fork"
        assert not a["preloaded"] and b["preloaded"]  # the forked rank did not import ftloop and transformers again


if __name__ == "__main__":
    preloaded = {"ftloop.fsdp.wrap", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"} <= sys.modules.keys()
    prefix = sys.argv[1]
    with open(f"{prefix}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump({"environment": {k: os.environ[k] for k in READ_BY_FTLOOP if k in os.environ},
                   "argv": sys.argv, "name": __name__, "cwd": os.getcwd(),
                   "start_method": multiprocessing.get_start_method(), "preloaded": preloaded}, f)
