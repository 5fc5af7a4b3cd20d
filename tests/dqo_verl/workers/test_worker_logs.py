"""A stage's copy of the workers' output: only what they wrote during the stage."""

from dqo_verl.workers import groups
from dqo_verl.workers.groups import WorkerLogs


def test_each_stage_gets_what_the_workers_wrote_while_it_ran(tmp_path, monkeypatch):
    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    monkeypatch.setattr(groups, "_SESSION_LOGS", logs)
    monkeypatch.setattr(groups.ray, "is_initialized", lambda: True)
    (logs / "worker-a.out").write_text("before\n")
    (logs / "raylet.out").write_text("not a worker's\n")
    worker_logs = WorkerLogs()
    worker_logs.mark()
    with open(logs / "worker-a.out", "a") as f:
        f.write("INFO vllm engine up\n")
    (logs / "worker-b.err").write_text("UserWarning: FSDP\n")
    out = worker_logs.copy(tmp_path / "root" / "logs" / "corpus.log")
    text = out.read_text()
    assert "INFO vllm engine up" in text and "UserWarning: FSDP" in text
    assert "before" not in text and "not a worker's" not in text
    worker_logs.mark()
    assert worker_logs.copy(tmp_path / "root" / "logs" / "score.log") is None  # nothing new: no file
    assert not (tmp_path / "root" / "logs" / "score.log").exists()


def test_nothing_is_copied_when_ray_prints_worker_output_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(groups, "_SESSION_LOGS", None)
    worker_logs = WorkerLogs()
    worker_logs.mark()
    assert worker_logs.copy(tmp_path / "x.log") is None
