"""Live progress from a study's kernel to the batch runner (core.progress)."""
import io
import os
import subprocess
import sys

from effllm_utils.core import progress


def test_a_stage_and_the_innermost_bar_are_published_as_one_line(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setattr(progress, "PUBLISH_EVERY_S", 0.0)
    progress.stage("mqa at tiny, seed 0", 2, 5)
    assert progress.read(path) == "mqa at tiny, seed 0 (2 of 5)"
    bar = progress.bar(total=40, desc="attention tiny mqa", file=io.StringIO(), mininterval=0)
    bar.update(3)
    bar.set_postfix(loss="5.104")
    line = progress.read(path)
    assert line.startswith("mqa at tiny, seed 0 (2 of 5) | attention tiny mqa 3/40 [") and "loss=5.104]" in line
    assert "\n" not in line and "|#" not in line  # the state, not the drawn bar
    quiet = progress.bar(total=5, desc="disabled", disable=True)
    quiet.update(1)
    assert "disabled" not in progress.read(path)  # a disabled bar (rank != 0, progress off) publishes nothing
    progress.stage("gqa at tiny, seed 0", 3, 5)  # a new stage drops the last run's bar
    assert progress.read(path) == "gqa at tiny, seed 0 (3 of 5)"
    assert sorted(os.listdir(tmp_path)) == ["progress.json"]  # written by rename: no temporary file left


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    progress.stage("mqa", 1, 1)
    progress.bar(total=2, file=io.StringIO(), mininterval=0).update(1)
    assert os.listdir(tmp_path) == [] and progress.read(tmp_path / "missing.json") == ""


def test_the_relay_shows_what_a_child_process_publishes(monkeypatch):
    """As a notebook's kernel does: a process started inside the relay inherits the variable and publishes."""
    monkeypatch.delenv(progress.ENV, raising=False)
    lines = []
    child = ("from effllm_utils.core import progress; import time\n"
             "progress.stage('moe_8x at tiny, seed 1', 3, 4); time.sleep(1.6)")
    with progress.relay(lines.append, period_s=0.2) as path:
        subprocess.run([sys.executable, "-c", child], check=True, env=os.environ.copy())
    assert lines == ["moe_8x at tiny, seed 1 (3 of 4)"]  # shown once, not at every poll
    assert progress.ENV not in os.environ and not os.path.exists(path)


def test_a_training_run_shows_live_progress_in_a_notebook_kernel():
    """In a Jupyter kernel (as in JupyterLab or under papermill) the run's bar reaches the notebook while the cell is
    still running: several progress messages arrive before the cell's reply, the last naming the final step."""
    import re
    import time

    from jupyter_client.manager import start_new_kernel

    code = ("import torch\n"
            "from effllm_utils import models\n"
            "from effllm_utils.engine.train import TrainConfig, train\n"
            "torch.manual_seed(0)\n"
            "m = models.EffLLMForCausalLM(models.config('test', hidden_size=128, intermediate_size=512))\n"
            "ids = torch.randint(0, 128, (40000,))\n"
            "cfg = TrainConfig(steps=150, batch_size=8, seq_len=64, eval_every=10**6, log_every=10,\n"
            "                  progress_desc='live run')\n"
            "import time\n"
            "from effllm_utils.core import progress\n"
            "_bar = progress.bar\n"
            "def slow_bar(**kw):  # redraw every 50 ms (1 s in a study) and take >= 10 ms a step, so any machine\n"
            "    b = _bar(**{**kw, 'mininterval': 0.05})  # spends >= 1.5 s in the steps and shows bars mid-run\n"
            "    update = b.update\n"
            "    b.update = lambda n=1: (time.sleep(0.01), update(n))[1]\n"
            "    return b\n"
            "progress.bar = slow_bar\n"
            "r = train(m, ids, ids, cfg)\n")
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(code)
        seen, replied = [], None
        deadline = time.monotonic() + 600  # a guard against a hung kernel, not a timing check
        while replied is None and time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty: poll the shell channel below
                msg = None
            if msg and msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                seen.append((time.monotonic(), msg["content"]["text"]))
            if msg and msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                    and msg["content"]["execution_state"] == "idle":
                replied = time.monotonic()
        bars = [(t, s) for t, s in seen if "live run" in s]
        assert replied is not None and len(bars) >= 3, seen[-5:]
        assert "150/150" in bars[-1][1] and "loss=" in bars[-1][1]
        done = next(t for t, s in bars if "150/150" in s)
        mid = [t for t, s in bars if re.search(r"\b([1-9]\d?|1[0-4]\d)/150\b", s)]  # a step between 1 and 149
        assert mid and mid[0] < done - 0.3, bars  # bars arrived while the steps ran, not all at the end
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
